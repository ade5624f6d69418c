//! Rung 4 of the test ladder: the project's microVM kernel and agent under `kata-snap`, end to end
//! (design section 8b). Each test boots or restores a Linux guest, talks to the agent over vsock
//! as the runtime will, and checks what the guest did.
//!
//! They need a KVM that runs guest code at hardware speed (`kata-snap check`). On a host without
//! one (this project's machines: the nested paravirtual kvm_pvm) they print SKIPPED, and
//! `scripts/rig/rung4.sh` runs this same test binary inside an L1 VM (QEMU TCG with SVM) where
//! `kvm-amd` gives a hardware-style /dev/kvm.
//!
//! Artifacts: `KATA_SNAP_GUEST_KERNEL` (a bzImage or vmlinux; default: the last
//! `guest/kernel/build.sh` output, `$KATA_SNAP_CACHE/kernel/latest/bzImage`) and
//! `KATA_SNAP_GUEST_INITRAMFS` (default `$KATA_SNAP_CACHE/initramfs/initramfs.cpio`), plus
//! busybox-static and mkfs.ext4 for the rootfs images. Lines starting with `RIG-MEASURE` are the
//! timings `scripts/rig/rung4.sh` collects.

#[path = "../common/mod.rs"]
mod common;

mod guest;

mod boot;
mod clones;
mod io;
mod live_snapshot;
mod net;
mod restore;
mod runtime;
mod runtime_containerd;
mod runtime_contract;
mod runtime_docker;
mod runtime_net;
mod runtime_parity;
mod runtime_start;
mod runtime_update;
mod smp;
