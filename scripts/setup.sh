#!/usr/bin/env bash
# Kiln quick start: installs the build dependencies, creates the sandbox user,
# builds envd (release) and runs it in the foreground on port 49983.
# (For now Kiln is just envd; this will become `kiln serve`.)
#
# Environment: ENVD_ADDR (default 0.0.0.0), ENVD_PORT (default 49983), RUST_LOG.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root

# Loopback by default: envd without an access token must not face a network.
ADDR="${ENVD_ADDR:-127.0.0.1}"
PORT="${ENVD_PORT:-49983}"

ensure_base_tools
ensure_sandbox_user
ENVD_BIN="$(build_envd release)"

if port_in_use "$PORT"; then
  die "port $PORT is already in use (another envd?); stop it or set ENVD_PORT"
fi

cat >&2 <<INFO

  envd $("$ENVD_BIN" --version | awk '{print $2}') is starting on $ADDR:$PORT (Ctrl-C stops it).

  Try it from another shell:
    curl -i http://localhost:$PORT/health
    curl -s -X POST http://localhost:$PORT/process.Process/List \\
         -H 'Content-Type: application/json' -H 'Connect-Protocol-Version: 1' -d '{}'

  Or with the official E2B Python SDK in debug mode (no control plane needed):
    python3 -m venv /tmp/e2b && /tmp/e2b/bin/pip install e2b==2.63.0
    E2B_DEBUG=true /tmp/e2b/bin/python -c \\
      'from e2b import Sandbox; print(Sandbox.create().commands.run("whoami").stdout)'

  Run the test suites with: bash scripts/test.sh (stop this envd first: it uses the same port)

INFO
exec env RUST_LOG="${RUST_LOG:-info}" "$ENVD_BIN" --addr "$ADDR" --port "$PORT"
