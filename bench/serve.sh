#!/usr/bin/env bash
# kiln serve benchmark (root): through the official Python SDK, the time from
# Sandbox.create() until the first commands.run() returned, at concurrency 1
# and 20, and the server's resident memory idle and with 100 running
# sandboxes. Prints figures and their ratio to the targets; also saved under
# bench/out/. Starts its own release `kiln serve` on 127.0.0.1:3300.
#
# Environment: BENCH_N (creates at concurrency 1, default 50), BENCH_POOL
# (warm pool size, default 4), BENCH_SANDBOXES (for the memory figure, 100).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
require_root
ensure_runtime_packages
ensure_python_venv
bash scripts/build-base-rootfs.sh "$BASE_ROOTFS" >&2
envd=$(bash scripts/build-envd.sh)
cargo build --release --locked -q -p kiln-cli
dir=/var/tmp/kiln-bench-serve
rm -rf "$dir"
mkdir -p "$dir" bench/out
key="e2b_$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')"
KILN_API_KEY="$key" RUST_LOG=warn target/release/kiln serve --listen 127.0.0.1:3300 \
  --data-dir "$dir/data" --run-dir "$dir/run" --envd "$envd" --base-rootfs "$BASE_ROOTFS" \
  --subnet 10.221.0.0/16 --nft-table kiln_bench --iface-prefix kbn --pool-size "${BENCH_POOL:-4}" \
  --concurrency 1000 >"$dir/serve.log" 2>&1 </dev/null &
pid=$!
cleanup() {
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  pkill -KILL -f -- "--root=$dir/run/runsc" 2>/dev/null || true
  sleep 0.5
  ip netns list 2>/dev/null | awk '/^kbn/{print $1}' | xargs -r -n1 ip netns delete 2>/dev/null || true
  nft delete table inet kiln_bench 2>/dev/null || true
  # Writable layers (their loop devices detach once unmounted).
  awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 600); do
  [[ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:3300/health)" == 200 ]] && break
  sleep 0.1
done
E2B_API_URL=http://127.0.0.1:3300 E2B_SANDBOX_URL=http://127.0.0.1:3300 E2B_API_KEY="$key" \
  KILN_SERVE_PID="$pid" "$KILN_VENV/bin/python" bench/serve_bench.py |
  tee "bench/out/serve-$(date +%Y%m%d-%H%M%S).txt"
