#!/usr/bin/env bash
# Builds what `kata-snap run` boots: the guest kernel (from Debian's linux-source, cached by
# config under ${KATA_SNAP_CACHE:-~/.cache/kata-snap}/kernel/latest) and the agent initramfs
# (.../initramfs/initramfs.cpio). Installs the packages the build needs first.
# Usage: scripts/build-guest.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/install-deps.sh >/dev/null
JOBS="${JOBS:-$(nproc)}" nice -n 10 guest/kernel/build.sh >/dev/null
guest/initramfs/build.sh >/dev/null
cache="${KATA_SNAP_CACHE:-$HOME/.cache/kata-snap}"
echo "kernel:    $cache/kernel/latest/vmlinux"
echo "initramfs: $cache/initramfs/initramfs.cpio"
