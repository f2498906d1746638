#!/usr/bin/env bash
# Runtime benchmark (root): prints template snapshot, create, pause/resume and
# memory figures; also saved under bench/out/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_runtime_packages
bash scripts/build-base-rootfs.sh "$BASE_ROOTFS"
envd=$(bash scripts/build-envd.sh)
mkdir -p bench/out
cargo build --release --locked -q -p kiln-runtime --example bench_runtime
KILN_TEST_ENVD="$envd" KILN_TEST_BASE_ROOTFS="$BASE_ROOTFS" \
  target/release/examples/bench_runtime | tee "bench/out/runtime-$(date +%Y%m%d-%H%M%S).txt"
