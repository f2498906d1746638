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
OUT_DIR="$KILN_ROOT/target/kiln-test"
mkdir -p "$OUT_DIR"
ENVD_LOG="$OUT_DIR/envd.log"
ENVD_PID=""
REGISTRY_STARTED=""

cleanup() {
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
TOTAL_PASSED=0
TOTAL_FAILED=0

# count_results STAGE LOGFILE RC: adds the stage's passed/failed counts to the
# totals; a failed stage that reported no failing test counts as one failure.
count_results() {
  local stage="$1" logfile="$2" rc="$3" counts passed failed
  case "$stage" in
    cargo) # "test result: ok. 5 passed; 0 failed; ..." once per test binary
      counts="$(awk '/^test result: /{for(i=1;i<NF;i++){if($(i+1)~/^passed/)p+=$i; if($(i+1)~/^failed/)f+=$i}} END{print p+0, f+0}' "$logfile")" ;;
    python) # pytest's last line: "3 failed, 120 passed, 1 error in 30.1s"
      counts="$(grep -E '[0-9]+ (passed|failed|errors?)' "$logfile" | tail -n1 |
        awk '{for(i=1;i<NF;i++){if($(i+1)~/^passed/)p+=$i; if($(i+1)~/^(failed|error)/)f+=$i}} END{print p+0, f+0}' || true)" ;;
    js) # smoke.mjs's last line: "12 passed, 0 failed"
      counts="$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$logfile" | tail -n1 | awk '{print $1+0, $3+0} END{if(NR==0)print 0, 0}' || true)" ;;
  esac
  read -r passed failed <<<"${counts:-0 0}"
  if [[ "$rc" != 0 && "$failed" == 0 ]]; then failed=1; fi
  TOTAL_PASSED=$((TOTAL_PASSED + passed))
  TOTAL_FAILED=$((TOTAL_FAILED + failed))
  STAGE_RC[$stage]="exit $rc: $passed passed, $failed failed"
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

# --- summary -----------------------------------------------------------------
if ! kill -0 "$ENVD_PID" 2>/dev/null; then
  warn "envd exited during the tests"
  TOTAL_FAILED=$((TOTAL_FAILED + 1))
fi
echo
log "summary:"
for stage in cargo python js; do
  [[ -n "${STAGE_RC[$stage]:-}" ]] && printf '  %-8s %s\n' "$stage" "${STAGE_RC[$stage]}" >&2
done
if ((TOTAL_FAILED > 0)); then
  echo "----- envd log tail ($ENVD_LOG) -----" >&2
  tail -n 80 "$ENVD_LOG" >&2 || true
  echo "-------------------------------------" >&2
fi
echo "kiln: $TOTAL_PASSED passed, $TOTAL_FAILED failed"
((TOTAL_FAILED == 0))
