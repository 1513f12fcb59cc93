#!/usr/bin/env bash
# Installs the Debian packages the tests, the demo and the benchmarks use (idempotent).
set -euo pipefail
pkgs=(fuse3 e2fsprogs qemu-utils qemu-system-common fio b3sum util-linux kmod)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# FUSE: the device, the control filesystem (to abort hung connections), allow_other
[ -e /dev/fuse ] || modprobe fuse || true
mountpoint -q /sys/fs/fuse/connections || mount -t fusectl none /sys/fs/fuse/connections 2>/dev/null || true
grep -q '^user_allow_other' /etc/fuse.conf 2>/dev/null || echo user_allow_other >>/etc/fuse.conf
