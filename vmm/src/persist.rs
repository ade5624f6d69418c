//! What a snapshot holds of the VM, and how it is read from and written back to KVM.
//!
//! vCPU state is read on the vCPU's own thread while it is parked (after completing any pending
//! I/O, so the state is consistent) and written back on the restoring thread before the vCPU
//! threads start. Restore order follows KVM's dependencies: CPUID before anything that checks
//! features, special registers before MSRs, the LAPIC before events.

use devices::legacy::serial::SerialSnapshot;
use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, Msrs, kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use snapshot::memory::MemoryRegion;

/// Size of `struct kvm_xsave`: the legacy XSAVE area KVM_GET/SET_XSAVE move.
const XSAVE_LEGACY_SIZE: i32 = 4096;

/// One vCPU's architectural state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU index (APIC ID).
    pub id: u8,
    /// The CPUID the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM lets us read.
    pub msrs: Vec<kvm_msr_entry>,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Run state (running, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
}

/// The VM-wide KVM state: interrupt controllers, PIT, clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    /// PIC master.
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// Device states.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialSnapshot,
}

/// Everything in a snapshot's `state` file.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Guest memory in MiB (the layout is derived from it and checked against `memory`).
    pub mem_mib: u64,
    /// Guest RAM regions and their places in the memory file.
    pub memory: Vec<MemoryRegion>,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide KVM state.
    pub vm: KvmVmState,
    /// Devices.
    pub devices: DeviceStates,
    /// Milliseconds from process start to READY in the VM that was snapshotted, if it got there.
    pub ready_ms: Option<f64>,
    /// What the snapshotting host's KVM offered (KVM_GET_SUPPORTED_CPUID): a restoring host must
    /// offer at least the same features.
    pub host_cpuid: Vec<kvm_cpuid_entry2>,
    /// The virtio devices, in slot order.
    pub virtio: Vec<crate::vm::virtio::VirtioSnapshot>,
}

/// Errors saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// An ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A list too long for KVM's fixed-size array (CPUID entries, MSRs).
    #[error("{what}: {len} entries do not fit KVM's list")]
    TooMany {
        /// Which list.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// KVM took only part of the saved MSRs.
    #[error("KVM restored {set} of {total} MSRs (refused MSR {refused:#x})")]
    MsrsRefused {
        /// How many it took.
        set: usize,
        /// How many there were.
        total: usize,
        /// The first it refused.
        refused: u32,
    },
    /// A saved interrupt controller is in the wrong slot.
    #[error("irqchip {expected} saved as chip {found}")]
    IrqchipOrder {
        /// Its slot.
        expected: u32,
        /// What the state says.
        found: u32,
    },
    /// This host's XSAVE state does not fit what snapshots carry.
    #[error(
        "this host's XSAVE state is {size} bytes (AMX?); snapshots support at most {XSAVE_LEGACY_SIZE}"
    )]
    XsaveTooLarge {
        /// Its size.
        size: i32,
    },
    /// The snapshot was taken on another CPU vendor.
    #[error(
        "the snapshot was taken on a host with different CPU features: the CPU vendor differs; restore it on a host with the same CPU"
    )]
    CpuVendor,
    /// The snapshot needs CPU features this host lacks.
    #[error(
        "the snapshot was taken on a host with different CPU features: this host lacks {}; restore it on a host with the same CPU",
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    CpuFeatures(Vec<MissingFeature>),
}

/// CPU feature bits the snapshotting host's KVM offered and this one's does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingFeature {
    /// CPUID leaf.
    pub leaf: u32,
    /// Sub-leaf.
    pub index: u32,
    /// Register name.
    pub reg: &'static str,
    /// The bits lacking.
    pub bits: u32,
}

impl std::fmt::Display for MissingFeature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPUID {:#x}.{} {} bits {:#x}",
            self.leaf, self.index, self.reg, self.bits
        )
    }
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> PersistError {
    move |source| PersistError::Kvm { what, source }
}

/// The MSRs to save: KVM's list of MSRs it can save/restore.
pub fn msr_index_list(kvm_sys: &Kvm) -> Result<Vec<u32>, PersistError> {
    Ok(kvm_sys
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

/// Whether KVM_GET/SET_XSAVE can carry this host's whole XSAVE state.
pub fn check_xsave_size(kvm_sys: &Kvm) -> Result<(), PersistError> {
    let size = kvm_sys.check_extension_int(Cap::Xsave2);
    if size > XSAVE_LEGACY_SIZE {
        return Err(PersistError::XsaveTooLarge { size });
    }
    Ok(())
}

/// Reads every readable MSR of `indices`, skipping those KVM refuses.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, PersistError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: Vec<u32> = indices.to_vec();
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| PersistError::TooMany {
            what: "MSR list",
            len: entries.len(),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // KVM stops at the first MSR it cannot read: skip it and go on.
        rest.drain(..(n + 1).min(rest.len()));
    }
    Ok(out)
}

/// Reads a parked vCPU's state.
pub fn save_vcpu(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuState, PersistError> {
    Ok(VcpuState {
        id,
        cpuid: fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec(),
        msrs: read_msrs(fd, msr_indices)?,
        regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
        lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
    })
}

/// Writes a saved state into a fresh vCPU.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), PersistError> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| PersistError::TooMany {
        what: "CPUID",
        len: state.cpuid.len(),
    })?;
    fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: `check_xsave_size` refused hosts whose XSAVE state exceeds struct kvm_xsave, so the
    // kernel reads no further than the struct we pass.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|_| PersistError::TooMany {
        what: "MSRs",
        len: state.msrs.len(),
    })?;
    let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != state.msrs.len() {
        return Err(PersistError::MsrsRefused {
            set,
            total: state.msrs.len(),
            refused: state.msrs[set].index,
        });
    }
    fd.set_vcpu_events(&state.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Reads the VM-wide state.
pub fn save_vm(vm: &VmFd) -> Result<KvmVmState, PersistError> {
    let chip = |id| -> Result<kvm_irqchip, PersistError> {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
        Ok(c)
    };
    Ok(KvmVmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// Writes the VM-wide state into a VM whose irqchip and PIT exist: interrupt controllers and
/// PIT. The clock is [`restore_clock`]'s, set just before the vCPUs start.
pub fn restore_vm(vm: &VmFd, state: &KvmVmState) -> Result<(), PersistError> {
    for (chip, id) in [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(PersistError::IrqchipOrder {
                expected: id,
                found: chip.chip_id,
            });
        }
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
    Ok(())
}

/// The TSC MSR.
const MSR_IA32_TSC: u32 = 0x10;

impl VcpuState {
    /// The saved TSC, if KVM let it be read.
    pub fn tsc(&self) -> Option<u64> {
        self.msrs
            .iter()
            .find(|m| m.index == MSR_IA32_TSC)
            .map(|m| m.data)
    }
}

/// Sets the guest's clocks to their saved values: each vCPU's TSC (`vcpus`: its fd and saved
/// TSC) and kvmclock. Both run on from the moment they are set, whether a vCPU runs or not, so
/// this is done right before the vCPUs start: a VM loaded ahead of time (a pre-loaded pool
/// shell) resumes with the clocks the snapshot stopped at, as a restore that starts at once
/// does.
pub fn restore_clock(
    vm: &VmFd,
    clock: &kvm_clock_data,
    vcpus: &[(&VcpuFd, Option<u64>)],
) -> Result<(), PersistError> {
    for (fd, tsc) in vcpus {
        let Some(data) = *tsc else { continue };
        let entry = kvm_msr_entry {
            index: MSR_IA32_TSC,
            data,
            ..Default::default()
        };
        let msrs = Msrs::from_entries(&[entry]).map_err(|_| PersistError::TooMany {
            what: "MSRs",
            len: 1,
        })?;
        if fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS (TSC)"))? != 1 {
            return Err(PersistError::MsrsRefused {
                set: 0,
                total: 1,
                refused: MSR_IA32_TSC,
            });
        }
    }
    // Only the clock value is restored; flags such as TSC_STABLE are KVM's to report, not ours.
    let clock = kvm_clock_data {
        clock: clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}

/// Feature registers compared between a snapshot's CPUID and this host's, with the bits the VMM
/// sets itself masked out: `(leaf, index, register name, mask)`.
const FEATURE_REGS: &[(u32, u32, &str, u32)] = &[
    (0x1, 0, "ECX", !((1 << 24) | (1 << 31))), // TSC-deadline and hypervisor are the VMM's
    (0x1, 0, "EDX", !(1 << 28)),               // HTT follows the vCPU count
    (0x7, 0, "EBX", !0),
    (0x7, 0, "ECX", !0),
    (0x7, 0, "EDX", !0),
    (0xd, 1, "EAX", !0),
    (0x8000_0001, 0, "ECX", !0),
    (0x8000_0001, 0, "EDX", !0),
];

fn reg(e: &kvm_cpuid_entry2, name: &str) -> u32 {
    match name {
        "EAX" => e.eax,
        "EBX" => e.ebx,
        "ECX" => e.ecx,
        _ => e.edx,
    }
}

/// Refuses a snapshot taken where KVM offered a vendor or feature bits this host's KVM does not.
///
/// The comparison is between the two hosts' KVM_GET_SUPPORTED_CPUID, not the guest's CPUID: some
/// KVMs (the nested paravirtual kvm_pvm) report more in a vCPU's KVM_GET_CPUID2 than in the
/// supported list.
pub fn check_cpuid_compatible(
    saved: &[kvm_cpuid_entry2],
    host: &[kvm_cpuid_entry2],
) -> Result<(), PersistError> {
    let find = |t: &[kvm_cpuid_entry2], f: u32, i: u32| {
        t.iter()
            .find(|e| e.function == f && (e.index == i || f != 0x7 && f != 0xd))
            .copied()
    };
    let vendor = |t: &[kvm_cpuid_entry2]| find(t, 0, 0).map(|e| (e.ebx, e.edx, e.ecx));
    if vendor(saved) != vendor(host) {
        return Err(PersistError::CpuVendor);
    }
    let mut missing = Vec::new();
    for &(leaf, index, name, mask) in FEATURE_REGS {
        let want = find(saved, leaf, index)
            .map(|e| reg(&e, name) & mask)
            .unwrap_or(0);
        let have = find(host, leaf, index).map(|e| reg(&e, name)).unwrap_or(0);
        let lacking = want & !have;
        if lacking != 0 {
            missing.push(MissingFeature {
                leaf,
                index,
                reg: name,
                bits: lacking,
            });
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PersistError::CpuFeatures(missing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            e(0, 0, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            e(1, 0, 0, 0x0000_00ff, 0xffff),
            e(7, 0, 0x0f, 0, 0),
        ]
    }

    #[test]
    fn test_cpuid_same_host_is_compatible() {
        let mut saved = host();
        saved[1].ecx |= 1 << 31 | 1 << 24; // set by the VMM, not required from the host
        check_cpuid_compatible(&saved, &host()).unwrap();
    }

    #[test]
    fn test_cpuid_missing_feature_is_refused_with_the_bits() {
        let mut saved = host();
        saved[2].ebx |= 1 << 5;
        let err = check_cpuid_compatible(&saved, &host())
            .unwrap_err()
            .to_string();
        assert!(err.contains("CPUID 0x7.0 EBX bits 0x20"), "{err}");
    }

    #[test]
    fn test_cpuid_other_vendor_is_refused() {
        let mut saved = host();
        saved[0].ebx = 0x756e_6547; // "Genu"
        assert!(
            check_cpuid_compatible(&saved, &host())
                .unwrap_err()
                .to_string()
                .contains("vendor")
        );
    }
}
