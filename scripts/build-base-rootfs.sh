#!/usr/bin/env bash
# Builds Kiln's offline default base image: a minimal Debian bookworm root
# filesystem made with debootstrap, with what E2B's base image offers (bash,
# coreutils, procps, python3 and pip, git, curl, ca-certificates, sudo,
# iproute2) and the sandbox user `user` (uid 1000, home /home/user,
# passwordless sudo — sudo itself cannot work under gVisor, which always sets
# no_new_privs, but templates built on the base may run elsewhere).
# Usage: build-base-rootfs.sh DEST   (rebuilds only when the recipe changed)
set -euo pipefail

dest=${1:?usage: build-base-rootfs.sh DEST}
mirror=${KILN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=bash,coreutils,procps,python3,python3-pip,python3-venv,ca-certificates,curl,git,sudo,iproute2,less,nano,iputils-ping,xz-utils,bzip2,locales
recipe="bookworm minbase $packages user1000-sudo profile-euid v5"

if [[ -f "$dest/.kiln-base-recipe" && "$(cat "$dest/.kiln-base-recipe")" == "$recipe" ]]; then
  echo "base rootfs up to date: $dest"
  exit 0
fi

tmp="$dest.tmp.$$"
rm -rf "$tmp"
mkdir -p "$(dirname "$dest")"
trap 'rm -rf "$tmp" "$tmp.log"' EXIT
echo "debootstrap bookworm into $dest (takes a few minutes)..."
debootstrap --variant=minbase --include="$packages" bookworm "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
  tail -30 "$tmp.log" >&2
  exit 1
}
rm -f "$tmp.log"
chroot "$tmp" /bin/sh -c '
  set -e
  useradd -m -u 1000 -s /bin/bash user
  mkdir -p /etc/sudoers.d
  echo "user ALL=(ALL:ALL) NOPASSWD: ALL" >/etc/sudoers.d/kiln-user
  chmod 440 /etc/sudoers.d/kiln-user
  sed -i "s/^# *en_US.UTF-8/en_US.UTF-8/" /etc/locale.gen && locale-gen >/dev/null
  # The SDKs run every command as `bash -l -c`. /etc/profile spawns `id -u`,
  # and a process costs ~30 ms in gVisor: bash knows its EUID already.
  sed -i "s/\"\$(id -u)\"/\"\${EUID:-\$(id -u)}\"/g" /etc/profile
  # Let `pip install` work system-wide, as in E2B templates (PEP 668 marker).
  rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
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
