#!/usr/bin/env bash
# Runs every Kiln test: the Rust workspace tests, then the official E2B SDKs
# (Python conformance suite, JS smoke test) against a real envd on
# 127.0.0.1:49983. Exits non-zero if anything failed.
#
# Environment:
#   KILN_SKIP_CARGO_TESTS=1   skip `cargo test` (SDK suites only)
#   PYTEST_ARGS="-k pty"      extra pytest arguments
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root
cd "$KILN_ROOT" || exit 1

ENVD_PORT=49983
ENVD_URL="http://127.0.0.1:$ENVD_PORT"
# The suites choose their own servers: a caller's E2B settings must not leak in.
unset E2B_API_URL E2B_SANDBOX_URL E2B_API_KEY E2B_DOMAIN E2B_DEBUG
OUT_DIR="$KILN_ROOT/target/kiln-test"
mkdir -p "$OUT_DIR"
ENVD_LOG="$OUT_DIR/envd.log"
ENVD_PID=""
REGISTRY_STARTED=""
PG_DIR=""

cleanup() {
  if declare -F serve_teardown >/dev/null; then serve_teardown || true; fi
  if [[ -n "$PG_DIR" ]]; then
    stop_test_postgres "$PG_DIR" || true
  fi
  if [[ -n "$REGISTRY_STARTED" ]]; then
    bash "$KILN_ROOT/scripts/test-registry.sh" stop || true
  fi
  if [[ -n "$ENVD_PID" ]] && kill -0 "$ENVD_PID" 2>/dev/null; then
    kill -TERM "$ENVD_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$ENVD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$ENVD_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

declare -A STAGE_RC=()
STAGES=()
TOTAL_PASSED=0
TOTAL_FAILED=0

# count_results STAGE LOGFILE RC: adds the stage's passed/failed counts to the
# totals; a failed stage that reported no failing test counts as one failure.
count_results() {
  local stage="$1" logfile="$2" rc="$3" counts passed failed
  case "$stage" in
    cargo) # "test result: ok. 5 passed; 0 failed; ..." once per test binary
      counts="$(awk '/^test result: /{for(i=1;i<NF;i++){if($(i+1)~/^passed/)p+=$i; if($(i+1)~/^failed/)f+=$i}} END{print p+0, f+0}' "$logfile")" ;;
    python*) # pytest's last line: "3 failed, 120 passed, 1 error in 30.1s"
      counts="$(grep -E '[0-9]+ (passed|failed|errors?)' "$logfile" | tail -n1 |
        awk '{for(i=1;i<NF;i++){if($(i+1)~/^passed/)p+=$i; if($(i+1)~/^(failed|error)/)f+=$i}} END{print p+0, f+0}' || true)" ;;
    js* | cli*) # smoke.mjs's and cli-test.sh's last line: "12 passed, 0 failed"
      counts="$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$logfile" | tail -n1 | awk '{print $1+0, $3+0} END{if(NR==0)print 0, 0}' || true)" ;;
    *) # one check: its exit code
      if [[ "$rc" == 0 ]]; then counts="1 0"; else counts="0 1"; fi ;;
  esac
  read -r passed failed <<<"${counts:-0 0}"
  if [[ "$rc" != 0 && "$failed" == 0 ]]; then failed=1; fi
  TOTAL_PASSED=$((TOTAL_PASSED + passed))
  TOTAL_FAILED=$((TOTAL_FAILED + failed))
  STAGE_RC[$stage]="exit $rc: $passed passed, $failed failed"
  STAGES+=("$stage")
}

# --- prerequisites -----------------------------------------------------------
ensure_base_tools
ensure_sandbox_user
ensure_python_venv
ensure_node_modules
ensure_runtime_packages

# The runtime tests boot real gVisor sandboxes from the base image, with a
# static envd as their init.
log "base rootfs ($BASE_ROOTFS)"
bash "$KILN_ROOT/scripts/build-base-rootfs.sh" "$BASE_ROOTFS" >&2
log "static envd"
KILN_TEST_ENVD="$(bash "$KILN_ROOT/scripts/build-envd.sh")"
export KILN_TEST_ENVD KILN_TEST_BASE_ROOTFS="$BASE_ROOTFS"

# kiln-oci's tests pull from local registries (an open one and one with auth).
REGISTRY_STARTED=1
bash "$KILN_ROOT/scripts/test-registry.sh" start
export KILN_TEST_REGISTRY=127.0.0.1:5000 KILN_TEST_AUTH_REGISTRY=127.0.0.1:5001

# --- 1. Rust tests -----------------------------------------------------------
if [[ "${KILN_SKIP_CARGO_TESTS:-0}" != 1 ]]; then
  log "cargo test --workspace --locked --no-fail-fast"
  set +e
  cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$OUT_DIR/cargo-test.log"
  rc="${PIPESTATUS[0]}"
  set -e
  count_results cargo "$OUT_DIR/cargo-test.log" "$rc"
  # What the runtime tests leave: their node directories and firewall table.
  rm -rf /var/tmp/kiln-rt-test-*
  nft delete table inet kiln_rt_test 2>/dev/null || true
else
  log "skipping cargo tests (KILN_SKIP_CARGO_TESTS=1)"
fi

# --- 2. envd for the SDK suites ----------------------------------------------
ENVD_BIN="$(build_envd debug)"
export KILN_ENVD_BIN="$ENVD_BIN"
if port_in_use "$ENVD_PORT"; then
  die "port $ENVD_PORT is already in use (another envd? try: ss -ltnp 'sport = :$ENVD_PORT'); stop it and re-run"
fi
log "starting envd on 127.0.0.1:$ENVD_PORT (log: $ENVD_LOG)"
NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$ENVD_BIN" --addr 127.0.0.1 --port "$ENVD_PORT" >"$ENVD_LOG" 2>&1 </dev/null &
ENVD_PID=$!
if ! wait_for_health "$ENVD_URL" "$ENVD_PID" 30; then
  tail -n 50 "$ENVD_LOG" >&2 || true
  die "envd did not become healthy on $ENVD_URL"
fi
log "envd is up (pid $ENVD_PID)"

# --- 3. Python SDK conformance suite -----------------------------------------
log "python SDK suite (e2b $(grep -E '^e2b==' "$KILN_PY_REQUIREMENTS" | cut -d= -f3), E2B_DEBUG=true)"
set +e
(
  cd "$KILN_ROOT/tests/sdk/python"
  # shellcheck disable=SC2086
  E2B_DEBUG=true "$KILN_VENV/bin/python" -m pytest -p no:cacheprovider -q ${PYTEST_ARGS:-} 2>&1
) | tee "$OUT_DIR/pytest.log"
rc="${PIPESTATUS[0]}"
set -e
count_results python "$OUT_DIR/pytest.log" "$rc"

# --- 4. JS SDK smoke test ----------------------------------------------------
log "JS SDK smoke test (E2B_DEBUG=true)"
set +e
(cd "$KILN_JS_DIR" && E2B_DEBUG=true timeout 300 node smoke.mjs 2>&1) | tee "$OUT_DIR/js-smoke.log"
rc="${PIPESTATUS[0]}"
set -e
count_results js "$OUT_DIR/js-smoke.log" "$rc"

# --- 5. kiln serve through the official SDKs: SQLite, a restart, PostgreSQL ---
log "building kiln"
cargo build --locked -p kiln-cli >&2
KILN_BIN="$KILN_ROOT/target/debug/kiln"
SERVE_PORT=3000
SERVE_ROOT=/var/tmp/kiln-test-serve
SERVE_PID=""
SERVE_NAME=""
SERVE_DB_ARGS=()
SERVE_START_ARGS=()
port_in_use "$SERVE_PORT" && die "port $SERVE_PORT is in use; stop what listens there and re-run"
SERVE_KEY="e2b_$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')"

# serve_start NAME [kiln serve args...]: starts kiln serve on $SERVE_PORT with
# its state under $SERVE_ROOT/NAME and waits until the base template is ready.
serve_start() {
  SERVE_NAME="$1"
  shift
  local dir="$SERVE_ROOT/$SERVE_NAME" code i
  mkdir -p "$dir"
  log "kiln serve ($SERVE_NAME) on 127.0.0.1:$SERVE_PORT (log: $OUT_DIR/serve-$SERVE_NAME.log)"
  KILN_API_KEY="$SERVE_KEY" RUST_LOG="${RUST_LOG:-info}" "$KILN_BIN" serve \
    --listen "127.0.0.1:$SERVE_PORT" --data-dir "$dir/data" --run-dir "$dir/run" \
    --envd "$KILN_TEST_ENVD" --base-rootfs "$BASE_ROOTFS" --subnet 10.220.0.0/16 \
    --nft-table kiln_serve_test --iface-prefix kst --pool-size 2 "$@" \
    >>"$OUT_DIR/serve-$SERVE_NAME.log" 2>&1 </dev/null &
  SERVE_PID=$!
  for ((i = 0; i < 1800; i++)); do
    kill -0 "$SERVE_PID" 2>/dev/null || break
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$SERVE_PORT/health" || true)"
    [[ "$code" == 200 ]] && return 0
    sleep 0.1
  done
  tail -n 40 "$OUT_DIR/serve-$SERVE_NAME.log" >&2 || true
  return 1
}

# serve_stop: a clean stop (SIGTERM); sandboxes keep running for the next start.
serve_stop() {
  [[ -n "$SERVE_PID" ]] || return 0
  kill -TERM "$SERVE_PID" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SERVE_PID" 2>/dev/null || true
  wait "$SERVE_PID" 2>/dev/null || true
  SERVE_PID=""
}

# serve_teardown: kills the instance's sandboxes, stops it, removes its state.
serve_teardown() {
  [[ -n "$SERVE_NAME" ]] || return 0
  local dir="$SERVE_ROOT/$SERVE_NAME" key
  if [[ -n "$SERVE_PID" ]]; then
    for key in "$SERVE_KEY" "${KILN_TEST_OTHER_KEY:-}" "${KILN_TEST_LIMITED_KEY:-}"; do
      [[ -n "$key" ]] && E2B_API_KEY="$key" "$KILN_BIN" sandbox kill --all \
        --api-url "http://127.0.0.1:$SERVE_PORT" >/dev/null 2>&1 || true
    done
  fi
  serve_stop
  # Anything a failed run left: gVisor processes, namespaces, firewall table.
  pkill -KILL -f -- "--root=$dir/run/runsc" 2>/dev/null || true
  sleep 0.5
  ip netns list 2>/dev/null | awk '/^kst/{print $1}' | xargs -r -n1 ip netns delete 2>/dev/null || true
  nft delete table inet kiln_serve_test 2>/dev/null || true
  # Writable layers (their loop devices detach once unmounted).
  awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$dir"
  SERVE_NAME=""
}

# serve_suites NAME: the Python server suite and the JS server smoke test
# against the running instance.
serve_suites() {
  local name="$1" rc
  export E2B_API_URL="http://127.0.0.1:$SERVE_PORT" E2B_SANDBOX_URL="http://127.0.0.1:$SERVE_PORT"
  export E2B_API_KEY="$SERVE_KEY"
  KILN_TEST_OTHER_KEY="$("$KILN_BIN" keys "${SERVE_DB_ARGS[@]}" create --team other 2>/dev/null)"
  KILN_TEST_LIMITED_KEY="$("$KILN_BIN" keys "${SERVE_DB_ARGS[@]}" create --team limited --concurrency 2 2>/dev/null)"
  export KILN_TEST_OTHER_KEY KILN_TEST_LIMITED_KEY KILN_BIN
  log "python SDK against kiln serve ($name)"
  set +e
  (
    cd "$KILN_ROOT/tests/sdk/server"
    # shellcheck disable=SC2086
    env -u E2B_DEBUG "$KILN_VENV/bin/python" -m pytest -p no:cacheprovider -q ${SERVER_PYTEST_ARGS:-} 2>&1
  ) | tee "$OUT_DIR/pytest-server-$name.log"
  rc="${PIPESTATUS[0]}"
  set -e
  count_results "python-server-$name" "$OUT_DIR/pytest-server-$name.log" "$rc"
  log "JS SDK against kiln serve ($name)"
  set +e
  (cd "$KILN_JS_DIR" && env -u E2B_DEBUG timeout 300 node server-smoke.mjs 2>&1) | tee "$OUT_DIR/js-server-$name.log"
  rc="${PIPESTATUS[0]}"
  set -e
  count_results "js-server-$name" "$OUT_DIR/js-server-$name.log" "$rc"
  log "kiln and e2b CLIs against kiln serve ($name)"
  set +e
  KILN_BIN="$KILN_BIN" bash "$KILN_ROOT/tests/cli/cli-test.sh" 2>&1 | tee "$OUT_DIR/cli-server-$name.log"
  rc="${PIPESTATUS[0]}"
  set -e
  count_results "cli-server-$name" "$OUT_DIR/cli-server-$name.log" "$rc"
}

# serve_restart_check: state made before a restart is all there after it.
serve_restart_check() {
  local name="$1" state="$OUT_DIR/restart-$1.json" rc
  log "restart check ($name)"
  set +e
  (
    cd "$KILN_ROOT/tests/sdk/server" &&
      env -u E2B_DEBUG "$KILN_VENV/bin/python" restart_check.py prepare "$state" &&
      serve_stop && serve_start "$name" "${SERVE_START_ARGS[@]}" &&
      env -u E2B_DEBUG "$KILN_VENV/bin/python" restart_check.py verify "$state"
  ) 2>&1 | tee "$OUT_DIR/restart-$name.log"
  rc="${PIPESTATUS[0]}"
  set -e
  count_results "restart-$name" "$OUT_DIR/restart-$name.log" "$rc"
}

SERVE_DB_ARGS=(--data-dir "$SERVE_ROOT/sqlite/data")
SERVE_START_ARGS=()
if serve_start sqlite; then
  serve_suites sqlite
  # The restart happens in a subshell: find the new server by its port.
  serve_restart_check sqlite
  SERVE_PID="$(ss -Hltnp "sport = :$SERVE_PORT" | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2 || true)"
else
  count_results server-sqlite /dev/null 1
fi
serve_teardown

log "PostgreSQL for kiln serve"
ensure_postgres
PG_DIR=/var/tmp/kiln-test-pg
start_test_postgres "$PG_DIR" 55432
PG_URL="postgres://postgres@127.0.0.1:55432/kiln"
SERVE_DB_ARGS=(--database-url "$PG_URL")
SERVE_START_ARGS=(--database-url "$PG_URL")
if serve_start postgres "${SERVE_START_ARGS[@]}"; then
  serve_suites postgres
  serve_restart_check postgres
  SERVE_PID="$(ss -Hltnp "sport = :$SERVE_PORT" | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2 || true)"
else
  count_results server-postgres /dev/null 1
fi
serve_teardown
stop_test_postgres "$PG_DIR"
rm -rf "$PG_DIR" "$SERVE_ROOT"
PG_DIR=""

# --- summary -----------------------------------------------------------------
if ! kill -0 "$ENVD_PID" 2>/dev/null; then
  warn "envd exited during the tests"
  TOTAL_FAILED=$((TOTAL_FAILED + 1))
fi
echo
log "summary:"
for stage in "${STAGES[@]}"; do
  printf '  %-22s %s\n' "$stage" "${STAGE_RC[$stage]}" >&2
done
if ((TOTAL_FAILED > 0)); then
  echo "----- envd log tail ($ENVD_LOG) -----" >&2
  tail -n 80 "$ENVD_LOG" >&2 || true
  echo "-------------------------------------" >&2
fi
echo "kiln: $TOTAL_PASSED passed, $TOTAL_FAILED failed"
((TOTAL_FAILED == 0))
