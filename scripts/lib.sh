# shellcheck shell=bash
# Shared helpers for Kiln's scripts. Source it: `source scripts/lib.sh`.
#
# Everything here must work on a fresh Debian bookworm machine as root with
# only rustup's toolchain, python3 and node preinstalled: whatever else is
# needed is installed on the fly, and every step is safe to repeat.

set -euo pipefail

KILN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KILN_ROOT

# Pinned SDK test dependencies (see tests/sdk/python/requirements.txt and
# tests/sdk/js/package-lock.json for the full, exact sets).
KILN_PY_REQUIREMENTS="$KILN_ROOT/tests/sdk/python/requirements.txt"
KILN_JS_DIR="$KILN_ROOT/tests/sdk/js"
KILN_VENV="${KILN_VENV:-$KILN_ROOT/.venv}"

# The sandbox's default user (E2B templates: `user`, home /home/user).
KILN_SANDBOX_USER="user"

if [[ -d "$HOME/.cargo/bin" && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi

log() { printf '\033[1;34m[kiln]\033[0m %s\n' "$*" >&2; }
warn() { printf '\033[1;33m[kiln] warning:\033[0m %s\n' "$*" >&2; }
die() {
  printf '\033[1;31m[kiln] error:\033[0m %s\n' "$*" >&2
  exit 1
}

require_root() {
  [[ "$(id -u)" == 0 ]] || die "this script must run as root (it installs packages and runs envd, which switches users)"
}

_KILN_APT_UPDATED=0

# apt_install PKG...: installs the packages that are not installed yet,
# running `apt-get update` at most once per script run.
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$pkg")
    fi
  done
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null || die "apt-get not found; install these by hand: ${missing[*]}"
  if ((_KILN_APT_UPDATED == 0)); then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >/dev/null
    _KILN_APT_UPDATED=1
  fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
}

# Tools every script needs: a C toolchain for linking Rust, curl, ps/kill.
ensure_base_tools() {
  apt_install ca-certificates curl gcc libc6-dev pkg-config procps
  command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (~/.cargo/bin is searched)"
}

# The gVisor release this runtime is tested with (Debian bookworm-backports).
KILN_RUNSC_VERSION="0.0~20240729.0-4~bpo12+2"
# The offline default base image, made with debootstrap.
BASE_ROOTFS="${KILN_BASE_ROOTFS:-/var/lib/kiln/cache/base-rootfs}"

# ensure_runtime_packages: gVisor's runsc (pinned, from bookworm-backports),
# debootstrap for the base image, nftables, iproute2 and conntrack for sandbox
# networks, e2fsprogs (mkfs.ext4) for writable layers.
ensure_runtime_packages() {
  local sources=/etc/apt/sources.list.d/kiln-bookworm-backports.sources
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding the bookworm-backports apt source (for runsc)"
    cat >"$sources" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    _KILN_APT_UPDATED=0
  fi
  apt_install debootstrap nftables iproute2 conntrack binutils e2fsprogs
  if [[ "$(dpkg-query -W -f='${Version}' runsc 2>/dev/null || true)" != "$KILN_RUNSC_VERSION" ]]; then
    if ((_KILN_APT_UPDATED == 0)); then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >/dev/null
      _KILN_APT_UPDATED=1
    fi
    log "apt-get install runsc=$KILN_RUNSC_VERSION"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "runsc=$KILN_RUNSC_VERSION" </dev/null >/dev/null
  fi
}

# ensure_sandbox_user: the sandbox's default user `user` (home /home/user,
# bash). Its uid is whatever is free: 1000 may be taken.
ensure_sandbox_user() {
  if ! id -u "$KILN_SANDBOX_USER" >/dev/null 2>&1; then
    log "creating user '$KILN_SANDBOX_USER'"
    local group_opt=(--user-group)
    # A leftover group of that name makes --user-group fail: join it instead.
    getent group "$KILN_SANDBOX_USER" >/dev/null && group_opt=(--gid "$KILN_SANDBOX_USER")
    useradd --create-home --home-dir "/home/$KILN_SANDBOX_USER" --shell /bin/bash "${group_opt[@]}" "$KILN_SANDBOX_USER"
  fi
  local home
  home="$(getent passwd "$KILN_SANDBOX_USER" | cut -d: -f6)"
  [[ "$home" == "/home/$KILN_SANDBOX_USER" ]] || warn "user '$KILN_SANDBOX_USER' has home $home, tests expect /home/$KILN_SANDBOX_USER"
  if [[ ! -d "$home" ]]; then
    mkdir -p "$home"
    chown "$KILN_SANDBOX_USER:" "$home"
  fi
}

# A python3 (>= 3.11, as the e2b SDK needs) with a working venv module.
_kiln_python() {
  local py
  for py in "${KILN_PYTHON:-}" python3.11 python3 /usr/bin/python3; do
    [[ -n "$py" ]] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      command -v "$py"
      return 0
    fi
  done
  return 1
}

# ensure_python_venv: $KILN_VENV with the pinned e2b SDK and pytest. Reused as
# long as requirements.txt and the interpreter are unchanged.
ensure_python_venv() {
  local py stamp want
  py="$(_kiln_python)" || {
    apt_install python3 python3-venv
    py="$(_kiln_python)" || die "no python3 >= 3.11 found"
  }
  want="$(sha256sum "$KILN_PY_REQUIREMENTS" | cut -d' ' -f1) $("$py" -c 'import sys; print(sys.version)' | head -n1)"
  stamp="$KILN_VENV/.kiln-stamp"
  if [[ -x "$KILN_VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log "python venv up to date ($KILN_VENV)"
    return 0
  fi
  # Debian's python3 needs python3-venv for ensurepip.
  if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    apt_install python3-venv
  fi
  log "creating python venv $KILN_VENV with $py"
  rm -rf "$KILN_VENV"
  "$py" -m venv "$KILN_VENV"
  "$KILN_VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$KILN_PY_REQUIREMENTS"
  echo "$want" >"$stamp"
}

# ensure_node_modules: tests/sdk/js/node_modules from the committed lock file.
ensure_node_modules() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt_install nodejs npm
  fi
  local major
  major="$(node -p 'process.versions.node.split(".")[0]')"
  ((major >= 20)) || warn "node $(node --version) is older than the v20 the e2b JS SDK is tested with"
  local want stamp="$KILN_JS_DIR/node_modules/.kiln-stamp"
  want="$(sha256sum "$KILN_JS_DIR/package-lock.json" | cut -d' ' -f1) $(node --version)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log "node_modules up to date"
    return 0
  fi
  log "npm ci in tests/sdk/js"
  (cd "$KILN_JS_DIR" && npm ci --no-audit --no-fund --loglevel=error </dev/null)
  echo "$want" >"$stamp"
}

# build_envd [debug|release]: builds the envd binary and prints its path.
build_envd() {
  local profile="${1:-debug}" args=(build --locked -p kiln-envd --bin envd)
  case "$profile" in
    debug) ;;
    release) args+=(--release) ;;
    *) die "build_envd: unknown profile '$profile' (debug or release)" ;;
  esac
  log "cargo ${args[*]}"
  (cd "$KILN_ROOT" && cargo "${args[@]}" >&2)
  local bin="${CARGO_TARGET_DIR:-$KILN_ROOT/target}/$profile/envd"
  [[ -x "$bin" ]] || die "envd binary not found at $bin after the build"
  echo "$bin"
}

# port_in_use PORT: true when something accepts TCP connections on 127.0.0.1:PORT.
port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_for_health URL PID [SECONDS]: waits until URL/health answers 204, failing
# early when the process PID died.
wait_for_health() {
  local url="$1" pid="$2" secs="${3:-30}" i code
  for ((i = 0; i < secs * 10; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      return 1
    fi
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url/health" || true)"
    [[ "$code" == 204 ]] && return 0
    sleep 0.1
  done
  return 1
}

# ensure_postgres: PostgreSQL's server (kiln serve's cluster database, in tests).
ensure_postgres() {
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || apt_install postgresql
}

# start_test_postgres DIR PORT: a throwaway cluster in DIR on 127.0.0.1:PORT,
# trusting local connections, with a database "kiln".
start_test_postgres() {
  local dir="$1" port="$2" bin
  bin="$(dirname "$(compgen -G "/usr/lib/postgresql/*/bin/initdb" | sort -V | tail -n1)")"
  stop_test_postgres "$dir"
  rm -rf "$dir"
  mkdir -p "$dir"
  chown postgres: "$dir"
  runuser -u postgres -- "$bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
  runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
  runuser -u postgres -- "$bin/createdb" -h 127.0.0.1 -p "$port" kiln
}

stop_test_postgres() {
  local dir="$1" bin
  [[ -f "$dir/data/postmaster.pid" ]] || return 0
  bin="$(dirname "$(compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" | sort -V | tail -n1)")"
  runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}
