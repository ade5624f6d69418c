#!/usr/bin/env bash
# Fetches Debian's linux-image-cloud-amd64 kernel (a bzImage) for the Linux smoke test, unpacks it
# and caches it outside the repo, with the ELF vmlinux extracted from it (as the kernel's
# scripts/extract-vmlinux does) and the package's KVM and tun modules (irqbypass.ko, kvm.ko, kvm-amd.ko, tun.ko:
# the rung-4 rig loads them in its L1 VM). Prints the path of the vmlinux. Skips the work when
# cached.
#
#   scripts/fetch-linux-kernel.sh   # -> $KATA_SNAP_CACHE/linux/{vmlinuz,vmlinux,modules/} (default ~/.cache/kata-snap)
#
# Why both: on a host whose KVM emulates guest code (the nested paravirtual kvm_pvm), a bzImage
# spends many minutes in its own decompressor before Linux prints anything; the vmlinux starts at
# Linux's 64-bit entry directly. Needs: apt-get, dpkg-deb, python3, lz4, zstd, xz.
set -euo pipefail

cache="${KATA_SNAP_CACHE:-$HOME/.cache/kata-snap}/linux"
mkdir -p "$cache"
# tun.ko: /dev/net/tun for the virtio-net rung-4 tests (their taps in L1); veth.ko and the tc
# ingress qdisc, u32 filter and mirred action: a container's network namespace as Docker and CNI
# make it (a veth pair) and the redirects kata-snap puts between its interface and the tap;
# bridge.ko (with llc.ko and stp.ko, which it needs, loaded first): Docker's default bridge and
# CNI's bridge plugin.
rig_modules=(irqbypass.ko kvm.ko kvm-amd.ko tun.ko veth.ko sch_ingress.ko cls_u32.ko act_mirred.ko
    llc.ko stp.ko bridge.ko)
cached=1
for f in vmlinuz vmlinux version modules/load-order; do
    [ -s "$cache/$f" ] || cached=0
done
# Every module is in the cache, or the cached kernel has it built in (load-order lists those
# cached).
if [ "$cached" = 1 ]; then
    for m in "${rig_modules[@]}"; do
        [ -s "$cache/modules/$m" ] || grep -qx "$m" "$cache/modules/builtin" 2>/dev/null || cached=0
    done
fi
if [ "$cached" = 1 ]; then
    echo "$cache/vmlinux"
    exit 0
fi

log() { echo "fetch-linux-kernel: $*" >&2; }

if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    log "updating apt package lists"
    apt-get update -qq >&2
fi
# The metapackage depends on the versioned image package; download that one.
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
    log "cannot resolve linux-image-cloud-amd64 to a kernel package"
    exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod a+rwx "$work" # apt downloads as the _apt user
log "downloading $pkg"
(cd "$work" && apt-get download -q "$pkg" >&2)
deb=$(ls "$work"/*.deb)
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$work/root"
kernel=$(ls "$work"/root/boot/vmlinuz-* | head -n 1)
# Temporary name, then rename: an interrupted fetch never leaves a half-written kernel behind.
cp "$kernel" "$cache/vmlinuz.tmp"
sync "$cache/vmlinuz.tmp"
mv "$cache/vmlinuz.tmp" "$cache/vmlinuz"

# The bzImage's setup header says where the compressed vmlinux is (payload_offset/length).
python3 - "$cache/vmlinuz" "$work/payload" <<'PY'
import struct, sys
d = open(sys.argv[1], 'rb').read()
setup_sects = d[0x1f1] or 4
offset, length = struct.unpack_from('<II', d, 0x248)
start = (setup_sects + 1) * 512 + offset
open(sys.argv[2], 'wb').write(d[start:start + length])
PY
magic=$(od -An -tx1 -N6 "$work/payload" | tr -d ' \n')
case "$magic" in
    02214c18*) decompress="lz4 -dc" ;;
    28b52ffd*) decompress="zstd -dcq" ;;
    fd377a585a00) decompress="xz -dcq" ;;
    1f8b*) decompress="gzip -dcq" ;;
    *) log "unknown compression of the kernel payload (magic $magic)"; exit 1 ;;
esac
log "extracting vmlinux ($decompress)"
# The payload carries a trailer after the compressed stream; the decompressor complains about it
# after writing the whole image, so its exit status is not the test: the ELF header is.
$decompress < "$work/payload" > "$cache/vmlinux.tmp" 2>/dev/null || true
if [ "$(od -An -c -N4 "$cache/vmlinux.tmp" | tr -d ' ')" != "177ELF" ]; then
    log "extracted payload is not an ELF vmlinux"
    exit 1
fi
sync "$cache/vmlinux.tmp"
mv "$cache/vmlinux.tmp" "$cache/vmlinux"
# The rig's modules, in the order they must be loaded (insmod, no modprobe in the rig's L1).
rm -rf "$cache/modules.tmp"
mkdir -p "$cache/modules.tmp"
: > "$cache/modules.tmp/load-order"
: > "$cache/modules.tmp/builtin"
for m in "${rig_modules[@]}"; do
    src=$(find "$work/root/lib/modules" -name "$m" -o -name "$m.xz" -o -name "$m.zst" | head -n 1)
    case "$src" in
        *.ko) cp "$src" "$cache/modules.tmp/$m" ;;
        *.xz) xz -dc "$src" > "$cache/modules.tmp/$m" ;;
        *.zst) zstd -dcq "$src" > "$cache/modules.tmp/$m" ;;
        *)
            # Built into the kernel (its modules.builtin lists it): nothing to load.
            if grep -q "/${m}\$" "$work"/root/lib/modules/*/modules.builtin 2>/dev/null; then
                echo "$m" >> "$cache/modules.tmp/builtin"
                continue
            fi
            log "the package has no $m"; exit 1 ;;
    esac
    echo "$m" >> "$cache/modules.tmp/load-order"
done
sync "$cache/modules.tmp"/*
rm -rf "$cache/modules"
mv "$cache/modules.tmp" "$cache/modules"
basename "$kernel" | sed 's/^vmlinuz-//' > "$cache/version"
log "cached $(cat "$cache/version") at $cache/vmlinuz and $cache/vmlinux"
echo "$cache/vmlinux"
