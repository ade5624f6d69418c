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
# microvm without ACPI: CPUs come from an MP table, as with our VMM.
timeout 120 qemu-system-x86_64 -M microvm,acpi=off,isa-serial=on,rtc=off \
    -accel "${ACCEL:-tcg}" -m 256 -smp 2 \
    -nodefaults -no-user-config -nographic -serial stdio -no-reboot \
    -kernel "$kernel_dir/bzImage" -initrd "$initramfs" \
    -append "console=ttyS0 panic=-1" \
    -device isa-debug-exit,iobase=0xf4,iosize=0x01 >"$log" 2>&1
status=$?
set -e
# QEMU exits at the READY write, possibly before the last serial output.
if [[ $status -eq 3 ]]; then
    echo "ok: /init ran and wrote READY; $(grep -o 'smp: Brought up.*' "$log" || echo 'CPU count unknown')"
    rm -f "$log"
    exit 0
fi
echo "error: qemu exited with $status; serial log: $log" >&2
tail -n 30 "$log" >&2
exit 1
