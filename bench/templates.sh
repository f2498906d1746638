#!/usr/bin/env bash
# Template benchmark (root): the base image from nothing (debootstrap), the
# `base` template (boot + snapshot, at a fresh `kiln serve`'s first start), a
# Dockerfile template built cold, rebuilt unchanged (all cached) and rebuilt
# with its last step changed, and the size on disk of a template and of its
# snapshot. Prints figures; also saved under bench/out/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
require_root
ensure_runtime_packages
envd=$(bash scripts/build-envd.sh)
cargo build --release --locked -q -p kiln-cli
dir=/var/tmp/kiln-bench-templates
rm -rf "$dir"
mkdir -p "$dir" bench/out
out="bench/out/templates-$(date +%Y%m%d-%H%M%S).txt"
now() { date +%s.%N; }
secs() { echo "scale=2; ($2 - $1) / 1" | bc; }
pid=""
cleanup() {
  if [[ -n "$pid" ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  pkill -KILL -f -- "--root=$dir/run/runsc" 2>/dev/null || true
  sleep 0.5
  ip netns list 2>/dev/null | awk '/^kbt/{print $1}' | xargs -r -n1 ip netns delete 2>/dev/null || true
  nft delete table inet kiln_bench_tpl 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
# Everything below also goes to $out (no pipeline: `pid` must stay in this shell).
exec > >(tee "$out")
  t0=$(now)
  bash scripts/build-base-rootfs.sh "$dir/base-rootfs" >/dev/null 2>&1
  [[ -n "${BENCH_STOP_AFTER_BASE:-}" ]] && exit 0
  t1=$(now)
  echo "base image from nothing (debootstrap + setup): $(secs "$t0" "$t1") s, $(du -sh "$dir/base-rootfs" | cut -f1)"

  key="e2b_$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  t0=$(now)
  KILN_API_KEY="$key" RUST_LOG=warn target/release/kiln serve --listen 127.0.0.1:3301 \
    --data-dir "$dir/data" --run-dir "$dir/run" --envd "$envd" --base-rootfs "$dir/base-rootfs" \
    --subnet 10.222.0.0/16 --nft-table kiln_bench_tpl --iface-prefix kbt --pool-size 0 \
    >"$dir/serve.log" 2>&1 </dev/null &
  pid=$!
  until [[ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:3301/health)" == 200 ]]; do sleep 0.05; done
  t1=$(now)
  echo "base template (first start of kiln serve until /health is 200: hard links, boot, snapshot): $(secs "$t0" "$t1") s"
  base=$(ls -d "$dir"/data/templates/base-* | head -1)
  echo "base template on disk: rootfs $(du -sh "$base/rootfs" | cut -f1) (hard links to the image), snapshot $(du -sh "$base/snapshot" | cut -f1)"

  ctx="$dir/context"
  mkdir -p "$ctx"
  head -c 20000000 /dev/urandom >"$ctx/data.bin"
  write_dockerfile() {
    cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM base
USER root
ENV APP_HOME=/opt/app
WORKDIR /opt/app
COPY data.bin /opt/app/data.bin
RUN python3 -c "import os; [open(f'/opt/app/f{i}', 'w').write('x' * 10000) for i in range(2000)]"
RUN useradd -m builder && echo built > /opt/app/marker
RUN echo "$1" > /opt/app/last-step
DOCKERFILE
  }
  export E2B_API_URL=http://127.0.0.1:3301 E2B_API_KEY="$key"
  build() {
    local t0 t1
    t0=$(now)
    if ! target/release/kiln template build "$ctx" --name bench-app >"$dir/build.log" 2>&1; then
      tail -n 30 "$dir/build.log" >&2
      return 1
    fi
    t1=$(now)
    echo "$1: $(secs "$t0" "$t1") s ($(grep -c CACHED "$dir/build.log" || true) steps cached)"
  }
  write_dockerfile one
  build "Dockerfile template (8 steps, 20 MB COPY, 2000 files) cold"
  build "rebuilt unchanged"
  write_dockerfile two
  build "rebuilt with the last step changed"
  tpl=$(ls -dt "$dir"/data/templates/*-* | grep -v '/base-' | head -1)
  echo "that template on disk: rootfs $(du -sh "$tpl/rootfs" | cut -f1), snapshot $(du -sh "$tpl/snapshot" | cut -f1); layer cache $(du -sh "$dir/data/cache" 2>/dev/null | cut -f1)"
