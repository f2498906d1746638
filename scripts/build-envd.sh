#!/usr/bin/env bash
# Builds envd as one static binary (no interpreter, no shared libraries), so it
# can be placed into any root filesystem. Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -q -p kiln-envd --bin envd --target "$target" >&2
bin="$PWD/target/$target/release/envd"
if readelf -l "$bin" | grep -q INTERP || readelf -d "$bin" | grep -q NEEDED; then
  echo "envd is not static: $bin" >&2
  exit 1
fi
echo "$bin"
