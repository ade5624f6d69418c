#!/usr/bin/env bash
# Build the static kata-snap agent and pack it as /init into a reproducible
# newc cpio initramfs (uncompressed: the kernel unpacks it without a
# decompressor, and it is small).
#
# Usage: guest/initramfs/build.sh        (prints the archive path last)
# Env:   KATA_SNAP_CACHE     output root (default ~/.cache/kata-snap)
#        CARGO_TARGET_DIR    as usual
#        SOURCE_DATE_EPOCH   mtime of every entry (default 0)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out_dir="${KATA_SNAP_CACHE:-$HOME/.cache/kata-snap}/initramfs"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
triple=x86_64-unknown-linux-gnu

step() { printf '==> %s\n' "$*" >&2; }

step "building the agent statically (release, $triple, +crt-static)"
# With an explicit --target, RUSTFLAGS apply to the target only, not to build
# scripts or proc macros, which must stay dynamic. The guest binary carries
# no debug info or symbols (the workspace release profile keeps line tables).
(cd "$root" && RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked -p agent --bin kata-agent --target "$triple")
agent="$target_dir/$triple/release/kata-agent"

if readelf -l "$agent" | grep -q 'Requesting program interpreter'; then
    echo "error: $agent is dynamically linked" >&2
    exit 1
fi

step "building the packer"
(cd "$root" && cargo build --release --locked -p initramfs --bin mkinitramfs)

mkdir -p "$out_dir"
out="$out_dir/initramfs.cpio"
"$target_dir/release/mkinitramfs" --agent "$agent" --output "$out" >&2
step "agent $(stat -c %s "$agent") bytes, initramfs $(stat -c %s "$out") bytes, sha256 $(sha256sum "$out" | cut -c1-16)"
echo "$out"
