#!/usr/bin/env bash
# Manual smoke test (not CI): boot the guest kernel and initramfs under QEMU
# and check that the agent comes up as PID 1 and writes READY to port 0xf4.
# QEMU's isa-debug-exit device sits on that port and turns the write of 1
# into QEMU exit status (1 << 1) | 1 = 3.
#
# Usage: guest/smoke-qemu.sh [KERNEL_DIR] [INITRAMFS]
# Env:   ACCEL=tcg|kvm (default tcg: nested KVM under QEMU hangs on some hosts)
# Needs: apt-get install qemu-system-x86
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kernel_dir="${1:-$("$here/kernel/build.sh" 2>/dev/null | tail -n1)}"
initramfs="${2:-$("$here/initramfs/build.sh" 2>/dev/null | tail -n1)}"
log="$(mktemp)"
set +e
timeout 120 qemu-system-x86_64 -M pc -accel "${ACCEL:-tcg}" -m 256 -smp 2 \
    -nodefaults -no-user-config -nographic -serial stdio -no-reboot \
    -kernel "$kernel_dir/bzImage" -initrd "$initramfs" \
    -append "console=ttyS0 panic=-1" \
    -device isa-debug-exit,iobase=0xf4,iosize=0x01 >"$log" 2>&1
status=$?
set -e
if [[ $status -eq 3 ]] && grep -q "agent listening" "$log"; then
    echo "ok: agent listening and READY written ($(grep -o '\[ *[0-9.]*\] Run /init' "$log" || true))"
    rm -f "$log"
    exit 0
fi
echo "error: qemu exited with $status; serial log: $log" >&2
tail -n 30 "$log" >&2
exit 1
