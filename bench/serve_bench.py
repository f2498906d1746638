"""Figures of kiln serve through the official Python SDK (see bench/serve.sh)."""

import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from e2b import Sandbox

N = int(os.environ.get("BENCH_N", "50"))
SANDBOXES = int(os.environ.get("BENCH_SANDBOXES", "100"))
PID = int(os.environ["KILN_SERVE_PID"])
killers = ThreadPoolExecutor(4)


def rss_mib() -> float:
    for line in open(f"/proc/{PID}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def create_to_first_command() -> float:
    t = time.perf_counter()
    sbx = Sandbox.create(timeout=120, request_timeout=300)
    sbx.commands.run("true")
    took = time.perf_counter() - t
    killers.submit(sbx.kill)
    return took * 1000


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def report(name, values, p50_target, p99_target):
    p50, p99 = pct(values, 50), pct(values, 99)
    print(
        f"{name}: n={len(values)} p50 {p50:.1f} ms (target {p50_target} ms, ratio {p50 / p50_target:.2f}) "
        f"p99 {p99:.1f} ms (target {p99_target} ms, ratio {p99 / p99_target:.2f}) mean {statistics.mean(values):.1f} ms"
    )


def settle():
    # Let the warm pool refill and kills finish between phases.
    time.sleep(8)


Sandbox.create(timeout=30).kill()  # warm up the SDK's connections
settle()
idle = rss_mib()
print(f"kiln serve RSS idle: {idle:.1f} MiB")

c1 = []
for _ in range(N):
    c1.append(create_to_first_command())
    time.sleep(0.3)  # a user's pace: lets the pool refill
report("create -> first command, concurrency 1", c1, 50, 200)
settle()

c20 = []
lock = threading.Lock()


def worker():
    for _ in range(3):
        v = create_to_first_command()
        with lock:
            c20.append(v)


threads = [threading.Thread(target=worker) for _ in range(20)]
for t in threads:
    t.start()
for t in threads:
    t.join()
report("create -> first command, concurrency 20", c20, 50, 200)
settle()

# Idle gVisor sandboxes are not free on 2 cores: create them 4 at a time.
t = time.perf_counter()
with ThreadPoolExecutor(4) as pool:
    sandboxes = list(pool.map(lambda _: Sandbox.create(timeout=1800, request_timeout=600), range(SANDBOXES)))
print(f"{SANDBOXES} sandboxes created in {time.perf_counter() - t:.1f} s")
time.sleep(6)  # a metrics sample of each
busy = rss_mib()
print(f"kiln serve RSS with {SANDBOXES} running sandboxes: {busy:.1f} MiB ({(busy - idle) * 1024 / SANDBOXES:.0f} KiB per sandbox)")
with ThreadPoolExecutor(10) as pool:
    list(pool.map(lambda s: s.kill(), sandboxes))
killers.shutdown(wait=True)
