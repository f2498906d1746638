#!/usr/bin/env bash
# Local OCI registries for kiln-oci's tests, with test images pushed by real
# tools (umoci builds them, skopeo pushes them).
#
#   scripts/test-registry.sh start   # idempotent; prints the pushed references
#   scripts/test-registry.sh stop
#
# Registries (Debian's docker-registry, state under $KILN_TEST_REGISTRY_DIR):
#   127.0.0.1:5000  open
#   127.0.0.1:5001  htpasswd auth, user `kiln`, password `kiln-secret`
# Images in both, repository kiln-test/busybox:
#   :gzip   two layers (gzip): busybox + a uid-1000 file, a symlink, a hard
#           link; the second deletes a file (whiteout) and makes a directory
#           opaque
#   :zstd   the same image with zstd layers
#   :docker the same image as a Docker v2 schema 2 manifest
#   :multi  an OCI image index: linux/arm64 (a one-layer stand-in) + linux/amd64 (:gzip)
#   :arm64-only  an OCI image index without a linux/amd64 entry
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STATE_DIR="${KILN_TEST_REGISTRY_DIR:-/var/tmp/kiln-test-registry}"
OPEN_ADDR=127.0.0.1:5000
AUTH_ADDR=127.0.0.1:5001
AUTH_USER=kiln
AUTH_PASSWORD=kiln-secret
REPO=kiln-test/busybox
# Bump when the test images change so a running registry gets them again.
IMAGES_VERSION=6

# registry_answers ADDR: the registry's /v2/ answers (200 open, 401 with auth).
registry_answers() {
  local code
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://$1/v2/" || true)"
  [[ "$code" == 200 || "$code" == 401 ]]
}

write_config() { # NAME ADDR [auth]
  local name="$1" addr="$2" dir="$STATE_DIR/$1"
  mkdir -p "$dir/data"
  {
    cat <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: $addr
EOF
    if [[ "${3:-}" == auth ]]; then
      cat <<EOF
auth:
  htpasswd:
    realm: kiln-test
    path: $STATE_DIR/htpasswd
EOF
    fi
  } >"$dir/config.yml"
}

start_registry() { # NAME ADDR
  local name="$1" addr="$2" dir="$STATE_DIR/$1" pid
  if registry_answers "$addr"; then
    return 0
  fi
  if port_in_use "${addr##*:}"; then
    die "port ${addr##*:} is taken by something that is not a registry (ss -ltnp 'sport = :${addr##*:}')"
  fi
  log "starting registry $name on $addr"
  setsid docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$dir/pid"
}

wait_registry() { # NAME ADDR
  local name="$1" addr="$2" dir="$STATE_DIR/$1" i
  for ((i = 0; i < 200; i++)); do
    registry_answers "$addr" && return 0
    if [[ -f "$dir/pid" ]] && ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      tail -n 20 "$dir/registry.log" >&2 || true
      die "registry $name exited (log: $dir/registry.log)"
    fi
    sleep 0.1
  done
  die "registry $name did not answer on http://$addr/v2/ within 20s (log: $dir/registry.log)"
}

stop_registry() { # NAME
  local dir="$STATE_DIR/$1" pid i
  [[ -f "$dir/pid" ]] || return 0
  pid="$(cat "$dir/pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/pid"
}

# add_index LAYOUT NAME ENTRY...: writes an OCI image index blob into LAYOUT
# and tags it NAME. ENTRY is "os/arch=IMAGE_TAG" (a manifest already in LAYOUT).
add_index() {
  local layout="$1" name="$2"
  shift 2
  python3 - "$layout" "$name" "$@" <<'PY'
import hashlib, json, os, sys
layout, name, entries = sys.argv[1], sys.argv[2], sys.argv[3:]
index_path = os.path.join(layout, "index.json")
with open(index_path) as f:
    top = json.load(f)
by_tag = {d.get("annotations", {}).get("org.opencontainers.image.ref.name"): d for d in top["manifests"]}
manifests = []
for entry in entries:
    platform, tag = entry.split("=", 1)
    os_name, arch = platform.split("/", 1)
    d = dict(by_tag[tag])
    d.pop("annotations", None)
    d["platform"] = {"os": os_name, "architecture": arch}
    manifests.append(d)
blob = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                   "manifests": manifests}, separators=(",", ":")).encode()
digest = hashlib.sha256(blob).hexdigest()
with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
    f.write(blob)
top["manifests"] = [d for d in top["manifests"]
                    if d.get("annotations", {}).get("org.opencontainers.image.ref.name") != name]
top["manifests"].append({"mediaType": "application/vnd.oci.image.index.v1+json",
                         "digest": "sha256:" + digest, "size": len(blob),
                         "annotations": {"org.opencontainers.image.ref.name": name}})
with open(index_path, "w") as f:
    json.dump(top, f)
PY
}

# build_images DIR: an OCI layout DIR/layout with tags base (2 layers) and arm64.
build_images() {
  local work="$1" layout="$1/layout" bundle="$1/bundle" rootfs applet
  rm -rf "$work"
  mkdir -p "$work"
  umoci init --layout "$layout"
  umoci new --image "$layout:base"
  umoci unpack --image "$layout:base" "$bundle" >&2
  rootfs="$bundle/rootfs"

  # Layer 1: busybox with its applet symlinks, and the things the tests check.
  mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/home/user" "$rootfs/opt/opaque/sub" "$rootfs/tmp" "$rootfs/var/gone"
  cp /bin/busybox "$rootfs/bin/busybox"
  for applet in sh ls cat echo true false env id; do
    ln -s busybox "$rootfs/bin/$applet"
  done
  echo "kiln test image" >"$rootfs/etc/kiln-release"
  ln "$rootfs/etc/kiln-release" "$rootfs/etc/kiln-release.hardlink"
  ln -s kiln-release "$rootfs/etc/kiln-release.symlink"
  echo "owned by 1000" >"$rootfs/home/user/owned"
  chown -R 1000:1000 "$rootfs/home/user"
  chmod 0640 "$rootfs/home/user/owned"
  chmod 1777 "$rootfs/tmp"
  echo "deleted by layer 2" >"$rootfs/etc/deleted-later"
  echo "deleted by layer 2" >"$rootfs/var/gone/file"
  echo "hidden by the opaque dir" >"$rootfs/opt/opaque/old"
  echo "hidden by the opaque dir" >"$rootfs/opt/opaque/sub/old"
  umoci repack --image "$layout:base" "$bundle"

  # Layer 2, written by hand so it has whiteout entries: deletes
  # etc/deleted-later and var/gone, makes opt/opaque opaque and adds a file.
  local l2="$work/layer2"
  mkdir -p "$l2/etc" "$l2/var" "$l2/opt/opaque"
  : >"$l2/etc/.wh.deleted-later"
  : >"$l2/var/.wh.gone"
  : >"$l2/opt/opaque/.wh..wh..opq"
  echo "from layer 2" >"$l2/opt/opaque/new"
  tar --numeric-owner --owner=0 --group=0 -C "$l2" -cf "$work/layer2.tar" etc var opt
  umoci raw add-layer --image "$layout:base" "$work/layer2.tar"
  umoci config --image "$layout:base" \
    --config.env KILN_TEST=yes --config.env PATH=/bin \
    --config.cmd /bin/sh --config.cmd -c --config.cmd "echo hello" \
    --config.workingdir /home/user --config.user 1000:1000 \
    --os linux --architecture amd64

  # A stand-in arm64 image (the index test must not pick it).
  local arm="$work/arm64"
  mkdir -p "$arm"
  echo arm64 >"$arm/ARCH"
  tar --numeric-owner --owner=0 --group=0 -C "$arm" -cf "$work/arm64.tar" ARCH
  umoci new --image "$layout:arm64"
  umoci raw add-layer --image "$layout:arm64" "$work/arm64.tar"
  umoci config --image "$layout:arm64" --os linux --architecture arm64

  add_index "$layout" multi linux/arm64=arm64 linux/amd64=base
  add_index "$layout" arm64-only linux/arm64=arm64
}

push_images() {
  local work="$STATE_DIR/build" layout="$STATE_DIR/build/layout" addr creds
  log "building test images with umoci"
  build_images "$work" >&2
  skopeo copy -q --dest-decompress "oci:$layout:base" "dir:$work/plain" >&2
  mkdir -p /var/lib/containers/cache
  for addr in "$OPEN_ADDR" "$AUTH_ADDR"; do
    creds=()
    [[ "$addr" == "$AUTH_ADDR" ]] && creds=(--dest-creds "$AUTH_USER:$AUTH_PASSWORD")
    skopeo copy -q --dest-tls-verify=false "${creds[@]}" \
      "oci:$layout:base" "docker://$addr/$REPO:gzip" >&2
    # skopeo (c/image 5.23) only applies --dest-compress-format when it
    # compresses, and would reuse the gzip blobs it already pushed: copy from
    # the uncompressed layout with a private, empty blob-info cache.
    unshare -m sh -c 'mount -t tmpfs kiln-skopeo-cache /var/lib/containers/cache && exec "$@"' sh \
      skopeo copy -q --dest-tls-verify=false "${creds[@]}" --dest-compress-format zstd \
      "dir:$work/plain" "docker://$addr/$REPO:zstd" >&2
    skopeo copy -q --dest-tls-verify=false "${creds[@]}" --format v2s2 \
      "oci:$layout:base" "docker://$addr/$REPO:docker" >&2
    skopeo copy -q --all --dest-tls-verify=false "${creds[@]}" \
      "oci:$layout:multi" "docker://$addr/$REPO:multi" >&2
    skopeo copy -q --all --dest-tls-verify=false "${creds[@]}" \
      "oci:$layout:arm64-only" "docker://$addr/$REPO:arm64-only" >&2
  done
  echo "$IMAGES_VERSION" >"$STATE_DIR/images-version"
}

print_images() {
  local addr tag digest creds
  echo "kiln test registries: open http://$OPEN_ADDR, auth http://$AUTH_ADDR (user $AUTH_USER, password $AUTH_PASSWORD)"
  for addr in "$OPEN_ADDR" "$AUTH_ADDR"; do
    creds=()
    [[ "$addr" == "$AUTH_ADDR" ]] && creds=(-u "$AUTH_USER:$AUTH_PASSWORD")
    for tag in gzip zstd docker multi arm64-only; do
      digest="$(curl -sfI "${creds[@]}" \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json' \
        "http://$addr/v2/$REPO/manifests/$tag" | tr -d '\r' | awk -F': ' 'tolower($1)=="docker-content-digest"{print $2}')"
      echo "  $addr/$REPO:$tag  ${digest:-MISSING}"
    done
  done
}

cmd_start() {
  require_root
  apt_install curl ca-certificates python3 docker-registry skopeo umoci apache2-utils busybox-static
  # On a systemd host the package starts its own registry on :5000; ours owns that port.
  if command -v systemctl >/dev/null && systemctl is-active -q docker-registry 2>/dev/null; then
    log "stopping the docker-registry system service (it holds port 5000)"
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
  mkdir -p "$STATE_DIR"
  [[ -s "$STATE_DIR/htpasswd" ]] || htpasswd -Bbn "$AUTH_USER" "$AUTH_PASSWORD" >"$STATE_DIR/htpasswd"
  write_config open "$OPEN_ADDR"
  write_config auth "$AUTH_ADDR" auth
  start_registry open "$OPEN_ADDR"
  start_registry auth "$AUTH_ADDR"
  wait_registry open "$OPEN_ADDR"
  wait_registry auth "$AUTH_ADDR"
  if [[ "$(cat "$STATE_DIR/images-version" 2>/dev/null || true)" != "$IMAGES_VERSION" ]] ||
    ! curl -sf -o /dev/null "http://$OPEN_ADDR/v2/$REPO/manifests/multi" \
      -H 'Accept: application/vnd.oci.image.index.v1+json'; then
    push_images
  fi
  print_images
}

cmd_stop() {
  stop_registry open
  stop_registry auth
  log "test registries stopped"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  *) die "usage: $0 start|stop" ;;
esac
