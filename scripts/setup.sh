#!/usr/bin/env bash
# Kiln quick start: installs what is missing (build tools, gVisor's runsc from
# bookworm-backports, debootstrap, nftables), builds the Debian base image, a
# static envd and `kiln` (release), then runs `kiln serve` in the foreground
# with the `base` template ready.
#
# Environment: KILN_LISTEN (default 127.0.0.1:3000), KILN_DATA_DIR (default
# /var/lib/kiln), KILN_API_KEY (use this key instead of generating one),
# RUST_LOG. Extra arguments go to `kiln serve` (see `kiln serve --help`).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root
cd "$KILN_ROOT" || exit 1

ensure_base_tools
ensure_runtime_packages

log "base image ($BASE_ROOTFS)"
bash "$KILN_ROOT/scripts/build-base-rootfs.sh" "$BASE_ROOTFS" >&2
log "static envd"
ENVD_BIN="$(bash "$KILN_ROOT/scripts/build-envd.sh")"
log "kiln (release)"
cargo build --release --locked -p kiln-cli >&2
install -D -m 0755 "$KILN_ROOT/target/release/kiln" /usr/local/bin/kiln
install -D -m 0755 "$ENVD_BIN" /usr/local/lib/kiln/envd

LISTEN="${KILN_LISTEN:-127.0.0.1:3000}"
if port_in_use "${LISTEN##*:}"; then
  die "port ${LISTEN##*:} is already in use; stop what listens there or set KILN_LISTEN"
fi

cat >&2 <<INFO

  kiln serve is starting on http://$LISTEN (Ctrl-C stops it; sandboxes keep running
  and are adopted at the next start). The first start prints an API key: keep it.

  Then, from another shell, the official SDKs work unchanged:
    export E2B_API_URL=http://$LISTEN E2B_SANDBOX_URL=http://$LISTEN E2B_API_KEY=<the key>
    python3 -m venv /tmp/e2b && /tmp/e2b/bin/pip install e2b==2.63.0
    /tmp/e2b/bin/python -c 'from e2b import Sandbox; print(Sandbox.create().commands.run("whoami").stdout)'

  Or the kiln CLI:  kiln sandbox create      (a terminal in a new sandbox)
                    kiln sandbox list | info ID | exec ID -- CMD | kill ID

INFO
exec env RUST_LOG="${RUST_LOG:-info}" /usr/local/bin/kiln serve --listen "$LISTEN" \
  --envd /usr/local/lib/kiln/envd --base-rootfs "$BASE_ROOTFS" "$@"
