#!/usr/bin/env bash
# envd benchmark: starts a release envd on a spare loopback port (or uses the
# one at $ENVD_URL) and prints
#   * commands.run("true") p50/p99 through the official Python SDK (as `user`),
#   * raw Connect Start of /bin/true p50/p99 over one kept-alive HTTP/1.1
#     connection, and its ratio to spawning /bin/true directly,
#   * 1 GiB upload (octet-stream) and download throughput through /files with curl,
#   * envd's peak RSS (VmHWM).
# Figures go to stdout and bench/out/ (gitignored).
#
# Environment: ENVD_URL (use a running envd instead of starting one; give its
# pid in ENVD_PID to get its peak RSS), BENCH_N (iterations, default 300),
# BENCH_GIB (transfer size in GiB, default 1), BENCH_DIR (where the transfer file
# lives; default /dev/shm when it has room, else /var/tmp).
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
require_root
cd "$KILN_ROOT" || exit 1

N="${BENCH_N:-300}"
GIB="${BENCH_GIB:-1}"
OUT_DIR="$KILN_ROOT/bench/out"
mkdir -p "$OUT_DIR"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
REPORT="$OUT_DIR/envd-$STAMP.txt"
TRANSFER_FILES=()
OWN_PID="" # the envd this script started (and stops)

cleanup() {
  local f
  for f in "${TRANSFER_FILES[@]}"; do rm -f -- "$f"; done
  if [[ -n "$OWN_PID" ]] && kill -0 "$OWN_PID" 2>/dev/null; then
    kill -TERM "$OWN_PID" 2>/dev/null || true
    wait "$OWN_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

ensure_base_tools
ensure_sandbox_user
ensure_python_venv

RSS_PID=""
if [[ -n "${ENVD_URL:-}" ]]; then
  URL="$ENVD_URL"
  RSS_PID="${ENVD_PID:-}" # a borrowed envd is not ours to stop
  log "using the envd at $URL"
else
  BIN="$(build_envd release)"
  PORT="$("$KILN_VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  URL="http://127.0.0.1:$PORT"
  "$BIN" --addr 127.0.0.1 --port "$PORT" >"$OUT_DIR/envd-$STAMP.log" 2>&1 </dev/null &
  OWN_PID=$!
  RSS_PID="$OWN_PID"
  wait_for_health "$URL" "$OWN_PID" 30 || die "envd did not start; see $OUT_DIR/envd-$STAMP.log"
  log "release envd on $URL (pid $OWN_PID)"
fi

# --- latency -------------------------------------------------------------------
log "latency: $N iterations each (SDK commands.run, raw Connect Start, direct spawn)"
LAT_JSON="$OUT_DIR/latency-$STAMP.json"
"$KILN_VENV/bin/python" "$KILN_ROOT/bench/envd_bench.py" --url "$URL" -n "$N" >"$LAT_JSON"

# --- throughput ------------------------------------------------------------------
BYTES=$((GIB * 1024 * 1024 * 1024))
need_kib=$((GIB * 1024 * 1024 * 2 + 262144))
pick_dir() {
  local d
  for d in ${BENCH_DIR:-/dev/shm /var/tmp}; do
    [[ -d "$d" ]] || continue
    if (($(df -Pk "$d" | awk 'NR==2{print $4}') > need_kib)); then
      echo "$d"
      return 0
    fi
  done
  return 1
}
UP_MIBS="skipped" DOWN_MIBS="skipped" TDIR=""
if TDIR="$(pick_dir)"; then
  SRC="$TDIR/kiln-bench-src-$$.bin"
  DST="$TDIR/kiln-bench-dst-$$.bin"
  TRANSFER_FILES+=("$SRC" "$DST")
  log "throughput: ${GIB} GiB through /files (files in $TDIR)"
  head -c "$BYTES" /dev/urandom >"$SRC"
  # Upload as root so any directory works; octet-stream body streamed from the
  # file (`--data-binary @file` would first load all of it into curl's memory,
  # which curl refuses at this size).
  read -r up_t up_code < <(curl -sS -o /dev/null -w '%{time_total} %{http_code}\n' \
    -X POST -H 'Content-Type: application/octet-stream' -T "$SRC" \
    "$URL/files?path=$DST&username=root")
  [[ "$up_code" == 200 ]] || die "upload answered HTTP $up_code"
  read -r down_t down_code < <(curl -sS -o /dev/null -w '%{time_total} %{http_code}\n' \
    "$URL/files?path=$DST&username=root")
  [[ "$down_code" == 200 ]] || die "download answered HTTP $down_code"
  cmp -s "$SRC" "$DST" || die "uploaded file differs from the source"
  UP_MIBS="$(awk -v b="$BYTES" -v t="$up_t" 'BEGIN{printf "%.0f", b/1048576/t}')"
  DOWN_MIBS="$(awk -v b="$BYTES" -v t="$down_t" 'BEGIN{printf "%.0f", b/1048576/t}')"
else
  warn "not enough free space in /dev/shm or /var/tmp for the ${GIB} GiB transfer; skipped"
fi

# --- peak RSS ----------------------------------------------------------------------
HWM="unknown"
if [[ -n "$RSS_PID" && -r "/proc/$RSS_PID/status" ]]; then
  HWM="$(awk '/^VmHWM:/{print $2, $3}' "/proc/$RSS_PID/status")"
fi

# --- report ------------------------------------------------------------------------
"$KILN_VENV/bin/python" - "$LAT_JSON" "$UP_MIBS" "$DOWN_MIBS" "$HWM" "$GIB" "$TDIR" >"$REPORT" <<'EOF'
import json, platform, os, sys
lat = json.load(open(sys.argv[1]))
up, down, hwm, gib, tdir = sys.argv[2:7]
def row(name, key):
    r = lat[key]
    return f"{name:<44} p50 {r['p50_ms']:8.3f} ms   p99 {r['p99_ms']:8.3f} ms   (n={r['n']})"
print(f"envd benchmark  ({platform.node()}, {os.cpu_count()} cpus, {platform.release()})")
print(row('SDK commands.run("true") as user', "sdk_commands_run_true"))
print(row("raw Connect Start /bin/true (keep-alive)", "raw_connect_start_true"))
print(row("direct spawn /bin/true (python subprocess)", "direct_spawn_true"))
print(f"{'ratio raw / direct':<44} p50 {lat['ratio_raw_over_direct_p50']:8.2f} x    p99 {lat['ratio_raw_over_direct_p99']:8.2f} x")
print(f"{'upload ' + gib + ' GiB /files (curl -T, octet-stream)':<44} {up} MiB/s" + (f"   [{tdir}]" if tdir else ""))
print(f"{'download ' + gib + ' GiB /files (curl)':<44} {down} MiB/s")
print(f"{'envd peak RSS (VmHWM)':<44} {hwm}")
EOF
cat "$REPORT"
log "report: $REPORT (raw latency JSON: $LAT_JSON)"
