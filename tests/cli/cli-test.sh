#!/usr/bin/env bash
# The `kiln` CLI and the official e2b CLI (npm @e2b/cli, pinned in
# tests/sdk/js/package.json) against a running kiln serve. Needs E2B_API_URL,
# E2B_API_KEY and KILN_BIN. Interactive terminals are driven through
# script(1), which gives them a real pty. Last line: "N passed, N failed".
set -uo pipefail
: "${E2B_API_URL:?}" "${E2B_API_KEY:?}" "${KILN_BIN:?}"
E2B="$(cd "$(dirname "$0")/../sdk/js" && pwd)/node_modules/.bin/e2b"
passed=0
failed=0
check() { # check NAME CMD...: runs CMD, counts it
  local name="$1"
  shift
  if "$@"; then
    passed=$((passed + 1))
    echo "ok   $name"
  else
    failed=$((failed + 1))
    echo "FAIL $name"
  fi
}
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# An interactive session: type LINES into COMMAND's terminal, keep its output.
terminal() { # terminal OUT COMMAND LINE...
  local out="$1" cmd="$2"
  shift 2
  {
    sleep 3
    for line in "$@"; do
      printf '%s\r' "$line"
      sleep 1
    done
    sleep 2
  } | timeout 60 script -qfec "$cmd" /dev/null >"$out" 2>&1
}

id="$("$KILN_BIN" sandbox create --detach --metadata suite=cli --timeout 300)"
check "kiln sandbox create --detach prints an id" grep -qE '^[a-z0-9]{20}$' <<<"$id"
check "kiln sandbox list shows it" bash -c "'$KILN_BIN' sandbox list | grep -q '$id.*running.*suite=cli'"
check "kiln sandbox list --json" bash -c "'$KILN_BIN' sandbox list --json | python3 -c 'import json,sys; assert \"$id\" in [s[\"sandboxID\"] for s in json.load(sys.stdin)]'"
check "kiln sandbox info" bash -c "'$KILN_BIN' sandbox info '$id' | grep -q 'state *running'"
check "kiln sandbox exec output" bash -c "[ \"\$('$KILN_BIN' sandbox exec '$id' -- 'echo hello \$(whoami)')\" = 'hello user' ]"
check "kiln sandbox exec passes arguments as they are" bash -c "[ \"\$('$KILN_BIN' sandbox exec '$id' -- python3 -c 'print(6*7)')\" = 42 ]"
"$KILN_BIN" sandbox exec "$id" -- 'exit 7'
check "kiln sandbox exec exit code" test $? -eq 7
terminal "$tmp/kiln-connect" "$KILN_BIN sandbox connect $id" 'echo kiln-$((6*7)); stty size' 'exit'
check "kiln sandbox connect: a real terminal" grep -aq 'kiln-42' "$tmp/kiln-connect"
# Ctrl-C reaches the remote process, not the CLI.
terminal "$tmp/kiln-ctrlc" "$KILN_BIN sandbox connect $id" 'sleep 30; echo after-sleep' $'\003' 'echo still-here' 'exit'
check "kiln sandbox connect: Ctrl-C interrupts the remote command" bash -c "grep -aq 'still-here' '$tmp/kiln-ctrlc' && ! grep -aq '^after-sleep' '$tmp/kiln-ctrlc'"
check "kiln sandbox logs" bash -c "'$KILN_BIN' sandbox logs '$id' | grep -q 'created from template'"
check "kiln sandbox metrics" bash -c "'$KILN_BIN' sandbox metrics '$id' | grep -q 'MEM'"
check "kiln sandbox pause" "$KILN_BIN" sandbox pause "$id"
check "paused in the list" bash -c "'$KILN_BIN' sandbox list --state paused | grep -q '$id'"
check "kiln sandbox resume" "$KILN_BIN" sandbox resume "$id"

check "e2b sandbox list shows it" bash -c "'$E2B' sandbox list 2>&1 | grep -q '$id'"
terminal "$tmp/e2b-connect" "$E2B sandbox connect $id" 'echo e2b-$((6*7))' 'exit'
check "e2b sandbox connect: a real terminal" grep -aq 'e2b-42' "$tmp/e2b-connect"
check "e2b sandbox kill" bash -c "'$E2B' sandbox kill '$id' 2>&1 | grep -q 'killed'"
check "gone after e2b kill" bash -c "! '$KILN_BIN' sandbox info '$id' >/dev/null 2>&1"
check "kiln template list shows base" bash -c "'$KILN_BIN' template list | grep -q '^base'"
echo "$passed passed, $failed failed"
((failed == 0))
