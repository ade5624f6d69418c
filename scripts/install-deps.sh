#!/usr/bin/env bash
# Installs what kata-snap needs to build and test on Debian bookworm: gcc (test guests), libclang
# (userfaultfd bindings), busybox-static, erofs-utils and e2fsprogs (agent tests: a busybox rootfs,
# erofs/ext4 images), cpio, the tools that unpack the Debian kernel (lz4, zstd, xz, python3), and
# qemu-system-x86 (the rung-4 rig: scripts/rig/), and linux-source with the kernel's build
# dependencies (guest/kernel/build.sh), runc (the runtime tests compare kata-snap with it) and
# containerd, docker.io and containernetworking-plugins (the rung-4 containerd, Docker and CNI
# tests), iproute2 (the virtio-net tests' network namespaces and taps).
# Idempotent; skips apt when everything is there.
set -euo pipefail

pkgs=(gcc libc6-dev binutils make libclang-dev busybox-static cpio erofs-utils e2fsprogs lz4 zstd xz-utils python3 util-linux qemu-system-x86 runc containerd docker.io containernetworking-plugins iproute2
    linux-source bc bison flex libelf-dev libssl-dev)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    echo "install-deps: cargo is missing: install Rust (rustup) first" >&2
    exit 1
fi
