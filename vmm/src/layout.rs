//! The guest-physical memory map: where RAM, boot structures and device windows sit.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA            (RAM)
//! 0x0000_0500  GDT, then IDT at 0x520
//! 0x0000_7000  boot_params (zero page)
//! 0x0000_8ff0  initial stack (grows down)
//! 0x0000_9000  PML4, PDPT at 0xa000, 4 PDs at 0xb000..0xf000 (identity map of 0..4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (last KiB below 640 KiB, where Linux scans for it)
//! 0x0010_0000  high memory: kernel image, then RAM up to the MMIO gap
//! 0xc000_0000  32-bit MMIO gap: virtio-mmio window at 0xd000_0000, IOAPIC, LAPIC, TSS
//! 0x1_0000_0000 RAM above 4 GiB for guests larger than 3 GiB
//! ```

use serde::{Deserialize, Serialize};

/// GDT location.
pub const GDT_START: u64 = 0x500;
/// IDT location (an empty IDT: the guest installs its own).
pub const IDT_START: u64 = 0x520;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories (2 MiB pages, 4 GiB identity map).
pub const PDE_START: u64 = 0xb000;
/// Number of page directories: one per GiB identity-mapped.
pub const PDE_COUNT: u64 = 4;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Room for the command line (Linux x86 accepts up to 2 KiB; newer kernels say so in the header).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the EBDA, where the MP table goes.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of conventional memory.
pub const EBDA_END: u64 = 0xa_0000;
/// Start of high memory: kernels load at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The fixed window of virtio-mmio devices inside the gap.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// The IOAPIC's MMIO address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' MMIO address.
pub const APIC_START: u64 = 0xfee0_0000;
/// Where KVM places the TSS it needs (three pages, inside the gap).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// Smallest guest the VMM accepts.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest the VMM accepts (an address-space bound; the host check applies too).
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// A range of guest-physical RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    /// First guest-physical address.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
}

impl RamRange {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// One entry of the e820 map handed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Type ([`E820_RAM`], [`E820_RESERVED`]).
    pub kind: u32,
}

/// Errors computing a memory layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Less memory than a guest can boot with.
    #[error("guest memory of {0} MiB is too small: at least {MIN_MEM_MIB} MiB is needed")]
    TooSmall(u64),
    /// More memory than the VMM supports.
    #[error("guest memory of {0} MiB is too large: at most {MAX_MEM_MIB} MiB is supported")]
    TooLarge(u64),
}

/// The guest's RAM layout: which ranges are RAM, recorded so a restore never has to guess.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// RAM ranges, sorted, non-overlapping.
    pub ram: Vec<RamRange>,
}

impl MemoryLayout {
    /// The layout of a guest with `mem_mib` MiB of RAM: all of it below the MMIO gap when it fits,
    /// the rest from 4 GiB up.
    pub fn new(mem_mib: u64) -> Result<Self, LayoutError> {
        if mem_mib < MIN_MEM_MIB {
            return Err(LayoutError::TooSmall(mem_mib));
        }
        if mem_mib > MAX_MEM_MIB {
            return Err(LayoutError::TooLarge(mem_mib));
        }
        let total = mem_mib << 20;
        let low = total.min(MMIO_GAP_START);
        let mut ram = vec![RamRange {
            start: 0,
            size: low,
        }];
        if total > low {
            ram.push(RamRange {
                start: MMIO_GAP_END,
                size: total - low,
            });
        }
        Ok(Self { ram })
    }

    /// Total RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.ram.iter().map(|r| r.size).sum()
    }

    /// End of the RAM below the MMIO gap.
    pub fn low_ram_end(&self) -> u64 {
        self.ram
            .iter()
            .filter(|r| r.start < MMIO_GAP_START)
            .map(RamRange::end)
            .max()
            .unwrap_or(0)
    }

    /// The e820 map: conventional memory below the EBDA, then high memory, then RAM above 4 GiB.
    /// The EBDA (MP table) and the legacy hole up to 1 MiB are left out, i.e. not RAM.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = vec![E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        }];
        for r in &self.ram {
            let start = r.start.max(HIMEM_START);
            if r.end() > start {
                map.push(E820Entry {
                    addr: start,
                    size: r.end() - start,
                    kind: E820_RAM,
                });
            }
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn test_layout_small_guest_is_one_low_range() {
        let l = MemoryLayout::new(256).unwrap();
        assert_eq!(
            l.ram,
            vec![RamRange {
                start: 0,
                size: 256 * MIB
            }]
        );
        assert_eq!(l.total_bytes(), 256 * MIB);
        assert_eq!(
            l.e820(),
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: 256 * MIB - HIMEM_START,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn test_layout_exactly_gap_start_has_no_high_range() {
        let l = MemoryLayout::new(3 * 1024).unwrap();
        assert_eq!(l.ram.len(), 1);
        assert_eq!(l.low_ram_end(), MMIO_GAP_START);
    }

    #[test]
    fn test_layout_above_3gib_splits_around_mmio_gap() {
        for gib in [4u64, 6, 64] {
            let l = MemoryLayout::new(gib * 1024).unwrap();
            assert_eq!(
                l.ram,
                vec![
                    RamRange {
                        start: 0,
                        size: 3 * GIB
                    },
                    RamRange {
                        start: 4 * GIB,
                        size: (gib - 3) * GIB
                    },
                ],
                "{gib} GiB"
            );
            assert_eq!(l.total_bytes(), gib * GIB);
            let e820 = l.e820();
            assert_eq!(e820.len(), 3);
            assert_eq!(
                e820[1],
                E820Entry {
                    addr: HIMEM_START,
                    size: 3 * GIB - HIMEM_START,
                    kind: E820_RAM
                }
            );
            assert_eq!(
                e820[2],
                E820Entry {
                    addr: 4 * GIB,
                    size: (gib - 3) * GIB,
                    kind: E820_RAM
                }
            );
            // Nothing of the gap is RAM.
            for e in &e820 {
                assert!(e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END);
            }
        }
    }

    #[test]
    fn test_layout_bounds_are_refused() {
        assert_eq!(MemoryLayout::new(8), Err(LayoutError::TooSmall(8)));
        assert_eq!(
            MemoryLayout::new(MAX_MEM_MIB + 1),
            Err(LayoutError::TooLarge(MAX_MEM_MIB + 1))
        );
        assert!(MemoryLayout::new(MIN_MEM_MIB).is_ok());
    }

    #[test]
    fn test_layout_boot_structures_do_not_overlap() {
        let page_tables_end = PDE_START + PDE_COUNT * 0x1000;
        let ranges = [
            (GDT_START, IDT_START + 8),
            (ZERO_PAGE_START, ZERO_PAGE_START + 0x1000),
            (PML4_START, page_tables_end),
            (CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
            (EBDA_START, EBDA_END),
        ];
        for (i, a) in ranges.iter().enumerate() {
            assert!(a.1 <= HIMEM_START);
            for b in &ranges[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
        const {
            assert!(
                BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000
            )
        };
    }
}
