#!/usr/bin/env bash
# Runs every test (the README's test command): unit, device-model, test-guest and Linux smoke tests
# (cargo test), then rung 4: the project's guest kernel and agent end to end. On a host with
# hardware KVM, rung 4 (runtime-cli/tests/linux_e2e) runs inside `cargo test`; elsewhere it prints
# SKIPPED there and runs in the L1 rig (scripts/rig/rung4.sh: QEMU TCG with a nested kvm-amd).
# Tests that cannot run on this host print a SKIPPED line with the reason.
#
# Usage: scripts/test.sh [CARGO TEST ARGS...]     RUNG4=0 skips the rig run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/fetch-linux-kernel.sh >/dev/null
# Rung-4 artifacts: the guest kernel (built once per config, cached) and the agent initramfs.
JOBS="${JOBS:-$(nproc)}" nice -n 10 guest/kernel/build.sh >/dev/null
guest/initramfs/build.sh >/dev/null
cargo test --workspace --locked "$@"

if [ "${RUNG4:-1}" = 0 ]; then
    echo "SKIPPED: rung 4 in the rig (RUNG4=0)"
    exit 0
fi
cargo build --release --locked --bin kata-snap
if target/release/kata-snap check | grep -q "run at full speed"; then
    echo "rung 4 ran above (runtime-cli/tests/linux_e2e, hardware KVM)"
else
    # 125: the L1 rig itself gave no verdict on any of its attempts (the emulator froze: QEMU
    # TCG with nested SVM, see README "Rung 4"); no test failed. Any other failure fails.
    rc=0
    scripts/rig/rung4.sh || rc=$?
    if [ "$rc" = 125 ]; then
        echo "SKIPPED: rung 4: the L1 rig froze (or did not come up) on every attempt, so its tests could not run here; no rung-4 test failed (README, Rung 4)"
    elif [ "$rc" != 0 ]; then
        exit "$rc"
    fi
fi
