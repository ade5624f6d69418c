#!/usr/bin/env bash
# Build the kata-snap guest kernel from Debian's linux-source package.
#
# Usage: guest/kernel/build.sh            (prints the output directory last)
# Env:   KATA_SNAP_CACHE  cache root (default ~/.cache/kata-snap)
#        JOBS             make -j value (default: nproc)
#
# The source is unpacked once into $KATA_SNAP_CACHE/kernel/linux-source-<ver>;
# each build goes to $KATA_SNAP_CACHE/kernel/build-<hash>, where <hash> covers
# the source tarball version and microvm.config. A build whose outputs already
# exist is skipped. Outputs: vmlinux, bzImage, .config. $KATA_SNAP_CACHE/kernel/latest points
# at the last build output (the rung-4 tests' default kernel).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/microvm.config"
cache="${KATA_SNAP_CACHE:-$HOME/.cache/kata-snap}/kernel"
jobs="${JOBS:-$(nproc)}"

step() { printf '==> %s\n' "$*" >&2; }

need_pkgs=()
dpkg -s linux-source >/dev/null 2>&1 || need_pkgs+=(linux-source)
for p in bc bison flex libelf-dev libssl-dev xz-utils make gcc; do
    dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    step "installing ${need_pkgs[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: missing packages (${need_pkgs[*]}); run as root or install them" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
fi

tarball="$(ls /usr/src/linux-source-*.tar.xz | sort -V | tail -n1)"
[[ -f "$tarball" ]] || { echo "error: no /usr/src/linux-source-*.tar.xz" >&2; exit 1; }
srcname="$(basename "$tarball" .tar.xz)"
srcver="$(dpkg-query -W -f='${Version}' "$srcname" 2>/dev/null || echo unknown)"
src="$cache/$srcname"

hash="$( { echo "$srcname $srcver"; cat "$fragment"; } | sha256sum | cut -c1-16)"
out="$cache/build-$hash"

if [[ -f "$out/vmlinux" && -f "$out/bzImage" && -f "$out/.config" ]]; then
    step "up to date: $out (config hash $hash)"
    ln -sfn "build-$hash" "$cache/latest"
    echo "$out"
    exit 0
fi

mkdir -p "$cache"
if [[ ! -f "$src/.unpacked" ]]; then
    step "unpacking $tarball into $cache"
    rm -rf "$src"
    tar -xJf "$tarball" -C "$cache"
    touch "$src/.unpacked"
fi

obj="$cache/obj-$hash"
mkdir -p "$obj"
start=$(date +%s)

step "configuring: tinyconfig + microvm.config"
make -s -C "$src" O="$obj" tinyconfig >/dev/null
KCONFIG_CONFIG="$obj/.config" "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" \
    "$obj/.config" "$fragment" >/dev/null
make -s -C "$src" O="$obj" olddefconfig >/dev/null

step "checking the resolved .config"
"$here/check-config.sh" "$obj/.config"

step "building vmlinux and bzImage with make -j$jobs (progress below)"
# Print one line per compiled object, numbered, so a long build shows progress.
make -C "$src" O="$obj" -j"$jobs" vmlinux bzImage 2>&1 |
    awk '/^  (CC|AS|LD|AR|OBJCOPY|GEN|BUILD|ZOFFSET|VOFFSET|MKPIGGY)/ {n++; printf "[%5d] %s\n", n, $0; fflush(); next}
         {print; fflush()}'
[[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "error: kernel build failed" >&2; exit 1; }

mkdir -p "$out.tmp"
cp "$obj/vmlinux" "$obj/arch/x86/boot/bzImage" "$obj/.config" "$out.tmp/"
rm -rf "$out"
mv "$out.tmp" "$out"
ln -sfn "build-$hash" "$cache/latest"
end=$(date +%s)
step "built in $((end - start)) s: vmlinux $(stat -c %s "$out/vmlinux") bytes, bzImage $(stat -c %s "$out/bzImage") bytes"
echo "$out"
