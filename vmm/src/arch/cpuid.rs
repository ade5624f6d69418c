//! CPUID for a vCPU: what KVM supports on this host, filtered, with per-vCPU topology.
//!
//! Each vCPU is one core of one package with one thread; its APIC ID is its index. The topology
//! leaves (1, 4, 0xb, 0x1f, 0x8000_0008, 0x8000_001e) are rewritten so the guest sees exactly
//! `count` CPUs and knows which one it is running on.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

/// Leaf 1 ECX: VMX (nested virtualization is not offered to guests).
const ECX_VMX: u32 = 1 << 5;
/// Leaf 1 ECX: TSC-deadline timer.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: multiple logical processors per package.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX: SVM.
const EXT_ECX_SVM: u32 = 1 << 2;

/// Topology level types of leaf 0xb / 0x1f ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Where a vCPU sits in the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuTopology {
    /// This vCPU's index, which is also its APIC ID.
    pub id: u8,
    /// Number of vCPUs in the VM.
    pub count: u8,
    /// Whether KVM emulates the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER).
    pub tsc_deadline: bool,
}

/// Bits needed to number `count` items (the APIC ID shift of a level).
fn id_bits(count: u8) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::from(count - 1).ilog2() + 1
    }
}

/// Rewrites the entries KVM_GET_SUPPORTED_CPUID returned for the vCPU described by `topo`.
pub fn filter_cpuid(entries: &mut [kvm_cpuid_entry2], topo: VcpuTopology) {
    let apic_id = u32::from(topo.id);
    let count = u32::from(topo.count.max(1));
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC ID, [23:16] logical processors, [15:8] CLFLUSH line / 8.
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR;
                e.ecx &= !ECX_VMX;
                if topo.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; [25:14]: threads sharing this cache - 1.
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                let (shift, logical, level) = match e.index {
                    0 => (0, 1, LEVEL_SMT),
                    1 => (id_bits(topo.count), count, LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = logical;
                e.ecx = (level << 8) | (e.index & 0xff);
                e.edx = apic_id;
            }
            LEAF_EXT_FEATURES => e.ecx &= !EXT_ECX_SVM,
            LEAF_ADDR_SIZES => {
                // ECX: [15:12] APIC ID bits for cores, [7:0] cores - 1.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(topo.count) << 12) | (count - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                // EAX: extended APIC ID; EBX: one thread per core, core ID; ECX: one node.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xdead_0000 | ((3 << 5) * u32::from(function == 4 && index == 3)),
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0x1, 0),
            entry(0x4, 0),
            entry(0x4, 3),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x8000_0001, 0),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
            entry(0x4000_0000, 0),
        ]
    }

    fn find(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|x| x.function == f && x.index == i).unwrap()
    }

    #[test]
    fn test_cpuid_topology_per_vcpu_is_consistent() {
        for (id, count) in [(0u8, 1u8), (0, 4), (3, 4), (5, 6), (31, 32)] {
            let mut e = sample();
            filter_cpuid(
                &mut e,
                VcpuTopology {
                    id,
                    count,
                    tsc_deadline: true,
                },
            );
            let l1 = find(&e, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(id));
            assert_eq!((l1.ebx >> 16) & 0xff, u32::from(count));
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            assert_eq!(l1.ecx & ECX_VMX, 0);
            assert_eq!(l1.edx & EDX_HTT != 0, count > 1);
            let smt = find(&e, 0xb, 0);
            let core = find(&e, 0xb, 1);
            let end = find(&e, 0xb, 2);
            assert_eq!(
                (smt.ebx, smt.ecx, smt.edx),
                (1, LEVEL_SMT << 8, u32::from(id))
            );
            assert_eq!(
                (core.ebx, core.ecx, core.edx),
                (u32::from(count), (LEVEL_CORE << 8) | 1, u32::from(id))
            );
            // The core-level shift must leave room for every APIC ID.
            assert!(u32::from(count - 1) < (1 << core.eax) || count == 1);
            assert_eq!((end.eax, end.ebx, end.ecx >> 8), (0, 0, 0));
            assert_eq!(find(&e, 0x8000_0008, 0).ecx & 0xff, u32::from(count - 1));
            assert_eq!(find(&e, 0x8000_001e, 0).eax, u32::from(id));
            assert_eq!(find(&e, 0x8000_0001, 0).ecx & EXT_ECX_SVM, 0);
            assert_eq!(find(&e, 4, 0).eax >> 26, u32::from(count - 1));
            assert_eq!((find(&e, 4, 3).eax >> 14) & 0xfff, u32::from(count - 1));
            assert_eq!(find(&e, 4, 0).eax >> 14 & 0xfff, 0);
            // Leaves the filter does not own are untouched.
            assert_eq!(find(&e, 0x4000_0000, 0).ebx, 0xffff_ffff);
        }
    }

    #[test]
    fn test_cpuid_tsc_deadline_follows_capability() {
        let mut e = sample();
        filter_cpuid(
            &mut e,
            VcpuTopology {
                id: 0,
                count: 1,
                tsc_deadline: false,
            },
        );
        assert_eq!(find(&e, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        let mut e = sample();
        e[0].ecx = 0;
        filter_cpuid(
            &mut e,
            VcpuTopology {
                id: 0,
                count: 1,
                tsc_deadline: true,
            },
        );
        assert_ne!(find(&e, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn test_cpuid_id_bits() {
        assert_eq!(
            [1u8, 2, 3, 4, 5, 8, 9, 32].map(id_bits),
            [0, 1, 2, 2, 3, 3, 4, 5]
        );
    }
}
