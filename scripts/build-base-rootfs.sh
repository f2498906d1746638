#!/usr/bin/env bash
# Builds Kiln's offline default base image: a minimal Debian bookworm root
# filesystem made with debootstrap, with the sandbox user `user`.
# Usage: build-base-rootfs.sh DEST   (rebuilds only when the recipe changed)
set -euo pipefail

dest=${1:?usage: build-base-rootfs.sh DEST}
mirror=${KILN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,ca-certificates,curl,procps,iproute2,less,git,nano,iputils-ping,xz-utils,bzip2,locales
recipe="bookworm minbase $packages v3"

if [[ -f "$dest/.kiln-base-recipe" && "$(cat "$dest/.kiln-base-recipe")" == "$recipe" ]]; then
  echo "base rootfs up to date: $dest"
  exit 0
fi

tmp="$dest.tmp.$$"
rm -rf "$tmp"
mkdir -p "$(dirname "$dest")"
trap 'rm -rf "$tmp"' EXIT
echo "debootstrap bookworm into $dest (takes a minute)..."
debootstrap --variant=minbase --include="$packages" bookworm "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
  tail -30 "$tmp.log" >&2
  exit 1
}
rm -f "$tmp.log"
chroot "$tmp" /bin/sh -c '
  set -e
  useradd -m -s /bin/bash user
  sed -i "s/^# *en_US.UTF-8/en_US.UTF-8/" /etc/locale.gen && locale-gen >/dev/null
  apt-get clean
  rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/*
'
# The sandbox resolver is served by the host on the gateway (see docs/runtime.md).
echo "nameserver 10.11.255.254" >"$tmp/etc/resolv.conf"
echo "kiln" >"$tmp/etc/hostname"
printf '127.0.0.1\tlocalhost kiln\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$tmp/etc/hosts"
echo "$recipe" >"$tmp/.kiln-base-recipe"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "base rootfs ready: $dest ($(du -sh "$dest" | cut -f1))"
