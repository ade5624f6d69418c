//! The Intel MultiProcessor Specification 1.4 table, so a Linux guest finds every vCPU, the IOAPIC
//! and how the ISA interrupts are wired, without ACPI.
//!
//! Placed at the EBDA (the last KiB below 640 KiB), where Linux looks for the floating pointer.

use crate::layout::{APIC_START, EBDA_END, EBDA_START, IOAPIC_START};

/// Largest vCPU count whose table fits in the EBDA.
pub const MAX_VCPUS: u8 = 32;
/// Number of IOAPIC input pins (KVM's IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6, as a CPU signature.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX bits the table claims: FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Errors building the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    /// No vCPU, or more than fit.
    #[error("the MP table supports 1 to {MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Total size of the table for `vcpus` CPUs.
pub fn table_len(vcpus: u8) -> usize {
    FLOATING_LEN
        + HEADER_LEN
        + PROCESSOR_LEN * usize::from(vcpus)
        // Bus, IOAPIC, one IO interrupt per pin but the cascade (IRQ 2), two local interrupts.
        + SMALL_ENTRY_LEN * (2 + usize::from(IOAPIC_PINS - 1) + 2)
}

/// ISA IRQ 0 (the PIT) arrives on IOAPIC pin 2, as in KVM's default routing; the others map 1:1.
fn ioapic_pin_for_irq(irq: u8) -> u8 {
    if irq == 0 { 2 } else { irq }
}

/// The MP floating pointer followed by the configuration table, to be written at [`EBDA_START`].
pub fn build(vcpus: u8) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut entry_count: u16 = 0;

    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend([ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend(CPU_SIGNATURE.to_le_bytes());
        entries.extend(CPU_FEATURES.to_le_bytes());
        entries.extend([0u8; 8]);
        entry_count += 1;
    }
    entries.extend([ENTRY_BUS, 0]);
    entries.extend(*b"ISA   ");
    entry_count += 1;
    entries.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend((IOAPIC_START as u32).to_le_bytes());
    entry_count += 1;
    for irq in (0..IOAPIC_PINS).filter(|&i| i != 2) {
        entries.extend([ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id]);
        entries.push(ioapic_pin_for_irq(irq));
        entry_count += 1;
    }
    // ExtINT to LINT0 of the BSP, NMI to LINT1 of every CPU.
    entries.extend([ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend([ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    entry_count += 2;

    let config_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(config_len);
    table.extend(*b"PCMP");
    table.extend((config_len as u16).to_le_bytes());
    table.extend([4, 0]); // spec revision 1.4, checksum filled below
    table.extend(*b"KATASNAP");
    table.extend(*b"MICROVM     ");
    table.extend(0u32.to_le_bytes()); // OEM table pointer
    table.extend(0u16.to_le_bytes()); // OEM table size
    table.extend(entry_count.to_le_bytes());
    table.extend((APIC_START as u32).to_le_bytes());
    table.extend(0u16.to_le_bytes()); // extended table length
    table.extend([0, 0]); // extended table checksum, reserved
    table.extend(entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_LEN + table.len());
    out.extend(*b"_MP_");
    out.extend(((EBDA_START as u32) + FLOATING_LEN as u32).to_le_bytes());
    out.extend([1, 4, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, revision, checksum, features
    out[10] = checksum(&out);
    out.extend(table);
    debug_assert_eq!(out.len(), table_len(vcpus));
    Ok(out)
}

/// Whether the table for `vcpus` CPUs fits in the EBDA.
pub fn fits_in_ebda(vcpus: u8) -> bool {
    EBDA_START + table_len(vcpus) as u64 <= EBDA_END
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn test_mptable_checksums_are_zero() {
        for n in [1u8, 2, 7, MAX_VCPUS] {
            let t = build(n).unwrap();
            assert_eq!(sum(&t[..16]), 0, "floating pointer, {n} vCPUs");
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(16 + len, t.len());
            assert_eq!(t.len(), table_len(n));
            assert_eq!(sum(&t[16..]), 0, "config table, {n} vCPUs");
        }
    }

    #[test]
    fn test_mptable_lists_every_vcpu_with_one_bsp() {
        let n = 4;
        let t = build(n).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()),
            EBDA_START as u32 + 16
        );
        assert_eq!(&t[16..20], b"PCMP");
        let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
        assert_eq!(usize::from(count), usize::from(n) + 2 + 23 + 2);
        let mut off = 16 + HEADER_LEN;
        let mut bsp = 0;
        for id in 0..n {
            assert_eq!(t[off], ENTRY_PROCESSOR);
            assert_eq!(t[off + 1], id);
            assert_ne!(t[off + 3] & CPU_ENABLED, 0);
            bsp += usize::from(t[off + 3] & CPU_BOOTSTRAP != 0);
            off += PROCESSOR_LEN;
        }
        assert_eq!(bsp, 1);
        assert_eq!(t[off], ENTRY_BUS);
        assert_eq!(t[off + 8], ENTRY_IOAPIC);
        assert_eq!(t[off + 9], n, "IOAPIC id follows the APIC ids");
        // ISA IRQ 0 goes to IOAPIC pin 2.
        assert_eq!(t[off + 16], ENTRY_IO_INTERRUPT);
        assert_eq!((t[off + 16 + 5], t[off + 16 + 7]), (0, 2));
    }

    #[test]
    fn test_mptable_vcpu_count_bounds() {
        assert_eq!(build(0), Err(MptableError::VcpuCount(0)));
        assert_eq!(
            build(MAX_VCPUS + 1),
            Err(MptableError::VcpuCount(MAX_VCPUS + 1))
        );
        assert!(fits_in_ebda(MAX_VCPUS));
    }
}
