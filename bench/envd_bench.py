"""Latency figures for bench/envd.sh (run inside the SDK venv).

Measures, against the envd at --url:
  * `commands.run("true")` through the official Python SDK (as the default user);
  * a raw Connect `process.Process/Start` of /bin/true: one hand-made Connect JSON
    envelope over a kept-alive HTTP/1.1 connection (http.client), read to the
    end-of-stream envelope;
  * spawning /bin/true directly from Python (fork/exec + wait), the floor the
    raw figure is compared with.
Prints one JSON object on stdout.
"""

import argparse
import http.client
import json
import os
import statistics
import struct
import subprocess
import sys
import time
import urllib.parse


def percentiles(samples_s):
    ms = sorted(s * 1000 for s in samples_s)

    def pct(p):
        return ms[min(len(ms) - 1, int(round(p / 100 * (len(ms) - 1))))]

    return {
        "n": len(ms),
        "p50_ms": round(pct(50), 3),
        "p99_ms": round(pct(99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "min_ms": round(ms[0], 3),
    }


def timed(fn, n, warmup):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return samples


def bench_sdk(url, n, warmup):
    os.environ["E2B_DEBUG"] = "true"
    os.environ["E2B_SANDBOX_URL"] = url
    from e2b import Sandbox

    sbx = Sandbox.create()

    def run():
        r = sbx.commands.run("true")
        assert r.exit_code == 0

    return timed(run, n, warmup)


def envelope(obj, flags=0):
    body = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">BI", flags, len(body)) + body


def read_envelopes(data):
    out, i = [], 0
    while i + 5 <= len(data):
        flags, length = struct.unpack(">BI", data[i : i + 5])
        out.append((flags, json.loads(data[i + 5 : i + 5 + length] or b"{}")))
        i += 5 + length
    return out


def bench_raw(url, n, warmup):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body = envelope({"process": {"cmd": "/bin/true", "args": []}, "stdin": False})
    headers = {
        "Content-Type": "application/connect+json",
        "Connect-Protocol-Version": "1",
        "Connect-Timeout-Ms": "30000",
    }

    def start():
        conn.request("POST", "/process.Process/Start", body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"Start answered {resp.status}: {data[:200]!r}")
        frames = read_envelopes(data)
        end = [f for flags, f in frames if not flags & 2 and "end" in f.get("event", {})]
        trailer = [f for flags, f in frames if flags & 2]
        if not end or not trailer or "error" in trailer[-1]:
            raise RuntimeError(f"unexpected Start stream: {frames}")

    samples = timed(start, n, warmup)
    conn.close()
    return samples


def bench_direct(n, warmup):
    def spawn():
        subprocess.run(["/bin/true"], check=True)

    return timed(spawn, n, warmup)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()

    result = {
        "sdk_commands_run_true": percentiles(bench_sdk(args.url, args.n, args.warmup)),
        "raw_connect_start_true": percentiles(bench_raw(args.url, args.n, args.warmup)),
        "direct_spawn_true": percentiles(bench_direct(args.n, args.warmup)),
    }
    raw, direct = result["raw_connect_start_true"], result["direct_spawn_true"]
    result["ratio_raw_over_direct_p50"] = round(raw["p50_ms"] / direct["p50_ms"], 2)
    result["ratio_raw_over_direct_p99"] = round(raw["p99_ms"] / direct["p99_ms"], 2)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
