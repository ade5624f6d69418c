//! Model-specific registers set at boot.

use kvm_bindings::{Msrs, kvm_msr_entry};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRR default type: MTRRs enabled, write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The MSRs and values every vCPU starts with.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// The boot MSRs in the form `KVM_SET_MSRS` takes.
pub fn boot_msrs() -> Result<Msrs, vmm_sys_util::fam::Error> {
    Msrs::from_entries(&boot_msr_entries())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_boot_msrs_unique_and_fast_strings_on() {
        let e = boot_msr_entries();
        let mut idx: Vec<u32> = e.iter().map(|m| m.index).collect();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), e.len());
        let misc = e.iter().find(|m| m.index == MSR_IA32_MISC_ENABLE).unwrap();
        assert_eq!(misc.data & MISC_ENABLE_FAST_STRING, 1);
        assert_eq!(boot_msrs().unwrap().as_slice().len(), e.len());
    }
}
