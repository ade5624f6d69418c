//! Long-mode register state at the kernel entry point, and the identity page tables it relies on.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::gdt::{self, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use crate::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_COUNT, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

/// General-purpose registers at entry: 64-bit boot protocol (RSI = boot_params), interrupts off.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU state at entry: the x87 and SSE control words at their reset values.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Special registers for long mode with paging through [`page_tables`], segments from the boot GDT.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = gdt::segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
    let data = gdt::segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
    let tss = gdt::segment_from_gdt(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Identity page tables for guest-physical 0..4 GiB with 2 MiB pages, as `(address, bytes)` pairs:
/// one PML4 entry, four PDPT entries, four full page directories.
pub fn page_tables() -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    out.push((
        PML4_START,
        (PDPTE_START | PTE_PRESENT | PTE_WRITABLE)
            .to_le_bytes()
            .to_vec(),
    ));
    let pdpt: Vec<u8> = (0..PDE_COUNT)
        .flat_map(|i| ((PDE_START + i * 0x1000) | PTE_PRESENT | PTE_WRITABLE).to_le_bytes())
        .collect();
    out.push((PDPTE_START, pdpt));
    for dir in 0..PDE_COUNT {
        let pd: Vec<u8> = (0..512u64)
            .flat_map(|j| {
                let phys = ((dir << 9) | j) << 21;
                (phys | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE).to_le_bytes()
            })
            .collect();
        out.push((PDE_START + dir * 0x1000, pd));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables like the MMU does for a 2 MiB mapping.
    fn translate(tables: &[(u64, Vec<u8>)], va: u64) -> Option<u64> {
        let read = |addr: u64| -> Option<u64> {
            tables.iter().find_map(|(base, bytes)| {
                let off = addr.checked_sub(*base)? as usize;
                let b = bytes.get(off..off + 8)?;
                Some(u64::from_le_bytes(b.try_into().unwrap()))
            })
        };
        let pml4e = read(PML4_START + ((va >> 39) & 0x1ff) * 8)?;
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        let pdpte = read((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8)?;
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        let pde = read((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8)?;
        assert_ne!(pde & PTE_HUGE, 0);
        Some((pde & !0x1f_ffff & !PTE_HUGE & !0xfff) | (va & 0x1f_ffff))
    }

    #[test]
    fn test_page_tables_identity_map_first_4gib() {
        let t = page_tables();
        for va in [
            0u64,
            0x7000,
            0x10_0000,
            0x1234_5678,
            0xbfff_ffff,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&t, va), Some(va), "{va:#x}");
        }
        assert_eq!(translate(&t, 0x1_0000_0000), None);
    }

    #[test]
    fn test_boot_sregs_enable_long_mode_paging() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr0 & CR0_PE, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cs.selector, s.cs.l), (0x8, 1));
        assert_eq!(s.ss.selector, 0x10);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn test_boot_regs_follow_64bit_boot_protocol() {
        let r = boot_regs(0x100_0000);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, ZERO_PAGE_START, 2));
    }
}
