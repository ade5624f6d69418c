#!/usr/bin/env bash
# The main job on a built-in default:
#   1. `kata-snap demo`: the built-in test guest cold-booted, snapshotted at READY and restored
#      in every memory mode, with a table of the timings;
#   2. `kata-snap run` of a busybox OCI bundle made here: the first run warms the VM template
#      (cold boot of the project's guest kernel and agent, snapshot at READY), the second
#      restores it. On a host whose KVM runs Linux guests at speed this runs directly; on one
#      that only emulates guest code (the nested kvm_pvm of this project's machines) it runs in
#      the L1 rig (scripts/rig/l1.sh), where timings are emulated: compare them as ratios.
# Usage: scripts/demo.sh        (after scripts/install-deps.sh)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
step() { printf '\n== %s\n' "$*" >&2; }

step "building kata-snap (release)"
cargo build --release --locked --bin kata-snap >&2
ks="$root/target/release/kata-snap"
step "kata-snap demo: the built-in guest, restored in every mode"
"$ks" demo

step "the guest kernel and agent initramfs for containers (cached after the first build)"
scripts/build-guest.sh >&2
cache="${KATA_SNAP_CACHE:-$HOME/.cache/kata-snap}"

# The part that runs where Linux guests run: makes a busybox bundle and runs it twice.
inner="$(mktemp "${TMPDIR:-/tmp}/kata-snap-demo.XXXXXX.sh")"
trap 'rm -f "$inner"' EXIT
cat > "$inner" <<'INNER'
set -e
ks="${KS:-kata-snap}"
b="$(mktemp -d)/bundle"
mkdir -p "$b/rootfs/bin" "$b/rootfs/proc" "$b/rootfs/sys" "$b/rootfs/dev" "$b/rootfs/etc"
cp "${BUSYBOX:-/bin/busybox}" "$b/rootfs/bin/busybox"
for a in sh echo cat uname hostname grep wc; do ln -s busybox "$b/rootfs/bin/$a"; done
"$ks" spec --bundle "$b"
sed -i 's/"terminal": true/"terminal": false/; s|^\( *\)"sh"$|\1"sh", "-c", "echo hello from container $(hostname) in a VM; uname -sr"|' "$b/config.json"
export KATA_SNAP_DATA_DIR="${KATA_SNAP_DATA_DIR:-$(mktemp -d)}"
for i in 1 2; do
    [ $i = 1 ] && echo "kata-snap run #1 (warms the template first):" || echo "kata-snap run #2 (restores the template):"
    s=$(awk '{printf "%d", $1 * 1000}' /proc/uptime)
    rc=0
    "$ks" --root "$(dirname "$b")/state" run --bundle "$b" "demo$i" || rc=$?
    echo "  exit $rc, $(( $(awk '{printf "%d", $1 * 1000}' /proc/uptime) - s )) ms"
done
"$ks" template list
INNER
if "$ks" check | grep -q "run at full speed"; then
    step "kata-snap run of a busybox bundle (hardware KVM here)"
    printf '{"kernel": "%s", "initramfs": "%s"}\n' "$cache/kernel/latest/bzImage" "$cache/initramfs/initramfs.cpio" > "${inner%.sh}.json"
    KS="$ks" KATA_SNAP_CONFIG="${inner%.sh}.json" sh "$inner"
else
    step "kata-snap run of a busybox bundle, in the L1 rig (no hardware KVM here: emulated timings)"
    printf '{"kernel": "/rig/guest/bzImage", "initramfs": "/rig/guest/initramfs.cpio"}\n' > "${inner%.sh}.json"
    scripts/rig/l1.sh --timeout 480 \
        --bin "$ks=/bin/kata-snap" --bin /usr/bin/mkfs.erofs \
        --file "$cache/kernel/latest/bzImage=/rig/guest/bzImage" \
        --file "$cache/initramfs/initramfs.cpio=/rig/guest/initramfs.cpio" \
        --file "${inner%.sh}.json=/etc/kata-snap/config.json" \
        "$inner"
fi
rm -f "${inner%.sh}.json"
