//! The Linux x86-64 boot protocol: load an ELF `vmlinux` or a `bzImage`, an optional initrd and the
//! command line, and write the zero page, descriptor tables, page tables and MP table.
//!
//! The steps, in order (see `docs/boot.md`):
//! 1. detect the kernel format from its first bytes and load it (linux-loader) at or above 1 MiB;
//! 2. place the initrd at the top of low RAM, below the kernel's `initrd_addr_max`;
//! 3. write the command line at [`CMDLINE_START`], checked against the kernel's limit;
//! 4. fill `boot_params` (setup header, e820 map, initrd, cmdline) at [`ZERO_PAGE_START`];
//! 5. write the GDT/IDT, the identity page tables and the MP table.
//!
//! The vCPU registers that go with it are in [`crate::arch::regs`].

use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use crate::arch::{gdt, mptable, regs};
use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, GDT_START, HIMEM_START, IDT_START, MemoryLayout,
    ZERO_PAGE_START,
};

const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Boot protocol version from which `cmdline_size` is meaningful.
const PROTOCOL_CMDLINE_SIZE: u16 = 0x206;
/// `initrd_addr_max` assumed when the kernel does not say (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Bytes of an image needed to tell its format: up to and including the bzImage `HdrS` magic.
pub const FORMAT_PROBE_LEN: usize = 0x206;
/// Largest e820 table the zero page holds.
const E820_MAX_ENTRIES: usize = 128;

/// The kinds of kernel image understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux` (or a test guest), entered at its ELF entry in 64-bit mode.
    Elf,
    /// A compressed `bzImage`, entered at its 64-bit entry point.
    BzImage,
}

/// Errors of the boot protocol.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The image is too short or has no known magic.
    #[error("not a kernel: neither an ELF vmlinux nor a bzImage (no ELF magic, no HdrS header)")]
    UnknownFormat,
    /// Reading the image failed.
    #[error("cannot read the kernel image: {0}")]
    Read(#[source] std::io::Error),
    /// linux-loader refused or could not place the image.
    #[error("cannot load the {format:?} kernel (does it fit in guest memory?): {source}")]
    Load {
        /// Format that was tried.
        format: KernelFormat,
        /// The loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The ELF image is not a 64-bit x86 executable the boot protocol can enter.
    #[error("the ELF kernel is not a 64-bit x86 executable")]
    NotX86_64Elf,
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error(
        "the initrd of {size} bytes does not fit in guest memory below {limit:#x} (kernel ends at {kernel_end:#x})"
    )]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// Highest address the initrd may reach.
        limit: u64,
        /// End of the kernel image.
        kernel_end: u64,
    },
    /// Reading the initrd failed.
    #[error("cannot read the initrd: {0}")]
    InitrdRead(#[source] std::io::Error),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Too many RAM ranges for the zero page.
    #[error("the e820 map has {0} entries, more than the zero page holds")]
    E820TooLarge(usize),
    /// Writing a boot structure to guest memory failed.
    #[error("cannot write {what} to guest memory: {detail}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The MP table cannot describe the vCPUs.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
}

/// Where the kernel landed.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Format detected.
    pub format: KernelFormat,
    /// Guest-physical address of the 64-bit entry point.
    pub entry: u64,
    /// One past the last byte the kernel occupies.
    pub kernel_end: u64,
    /// The bzImage's setup header, to merge into `boot_params`.
    pub setup_header: Option<setup_header>,
}

/// Detects the kernel format from the start of the image (at least [`FORMAT_PROBE_LEN`] bytes for
/// a bzImage).
pub fn detect_format(head: &[u8]) -> Result<KernelFormat, BootError> {
    if head.starts_with(b"\x7fELF") {
        // ELFCLASS64 and EM_X86_64: the only ELF the 64-bit entry can run.
        if head.get(4) != Some(&2) || head.get(18..20) != Some(&[62, 0]) {
            return Err(BootError::NotX86_64Elf);
        }
        return Ok(KernelFormat::Elf);
    }
    if head.get(0x202..0x206) == Some(b"HdrS") {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownFormat)
}

/// Loads the kernel image into guest memory.
pub fn load_kernel<F>(mem: &GuestMemoryMmap, image: &mut F) -> Result<LoadedKernel, BootError>
where
    F: Read + ReadVolatile + Seek,
{
    let mut head = [0u8; FORMAT_PROBE_LEN];
    image.seek(SeekFrom::Start(0)).map_err(BootError::Read)?;
    let n = read_up_to(image, &mut head).map_err(BootError::Read)?;
    let format = detect_format(&head[..n])?;
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, image, himem)
                .map_err(|source| BootError::Load { format, source })?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0,
                kernel_end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, image, himem)
                .map_err(|source| BootError::Load { format, source })?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                kernel_end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
    }
}

/// Reads until `buf` is full or the input ends (retrying EINTR); returns the bytes read.
pub(crate) fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Where the initrd goes: page-aligned, as high as low RAM and the kernel's limit allow.
pub fn initrd_address(
    layout: &MemoryLayout,
    kernel: &LoadedKernel,
    size: u64,
) -> Result<u64, BootError> {
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let limit = layout.low_ram_end().min(addr_max + 1);
    let err = || BootError::InitrdTooLarge {
        size,
        limit,
        kernel_end: kernel.kernel_end,
    };
    let start = limit.checked_sub(size).ok_or_else(err)? & !0xfff;
    if start < kernel.kernel_end.max(HIMEM_START) {
        return Err(err());
    }
    Ok(start)
}

/// Loads the initrd of `size` bytes from `src` at its address; returns `(address, size)`.
pub fn load_initrd<F: ReadVolatile>(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel: &LoadedKernel,
    src: &mut F,
    size: u64,
) -> Result<(u64, u64), BootError> {
    let addr = initrd_address(layout, kernel, size)?;
    mem.read_exact_volatile_from(GuestAddress(addr), src, size as usize)
        .map_err(|e| BootError::InitrdRead(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

/// Builds the kernel command line, checked against the kernel's own limit.
pub fn build_cmdline(text: &str, kernel: &LoadedKernel) -> Result<Cmdline, BootError> {
    let limit = kernel
        .setup_header
        .filter(|h| h.version >= PROTOCOL_CMDLINE_SIZE && h.cmdline_size > 0)
        .map(|h| h.cmdline_size as usize)
        .unwrap_or(CMDLINE_MAX_SIZE - 1)
        .min(CMDLINE_MAX_SIZE - 1);
    if text.len() > limit {
        return Err(BootError::Cmdline(format!(
            "{} bytes is longer than the kernel accepts ({limit})",
            text.len()
        )));
    }
    Cmdline::try_from(text, CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))
}

/// The zero page for this boot.
pub fn build_boot_params(
    layout: &MemoryLayout,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let e820 = layout.e820();
    if e820.len() > E820_MAX_ENTRIES {
        return Err(BootError::E820TooLarge(e820.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

fn write(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| BootError::GuestWrite {
            what,
            detail: e.to_string(),
        })
}

/// Writes the command line, the zero page, the GDT/IDT, the page tables and the MP table.
pub fn write_boot_structures(
    mem: &GuestMemoryMmap,
    cmdline: &Cmdline,
    params: &boot_params,
    vcpus: u8,
) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(|e| BootError::GuestWrite {
        what: "the command line",
        detail: e.to_string(),
    })?;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::GuestWrite {
        what: "boot_params",
        detail: e.to_string(),
    })?;
    write(mem, "the GDT", GDT_START, &gdt::gdt_bytes())?;
    write(mem, "the IDT", IDT_START, &0u64.to_le_bytes())?;
    for (addr, bytes) in regs::page_tables() {
        write(mem, "the page tables", addr, &bytes)?;
    }
    write(mem, "the MP table", EBDA_START, &mptable::build(vcpus)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn test_detect_format_elf_bzimage_and_garbage() {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[18] = 62;
        assert_eq!(detect_format(&elf).unwrap(), KernelFormat::Elf);
        elf[4] = 1;
        assert!(matches!(detect_format(&elf), Err(BootError::NotX86_64Elf)));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz).unwrap(), KernelFormat::BzImage);
        assert!(matches!(
            detect_format(b"#!/bin/sh\n"),
            Err(BootError::UnknownFormat)
        ));
        assert!(matches!(detect_format(&[]), Err(BootError::UnknownFormat)));
    }

    fn elf_kernel() -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x100_0000,
            kernel_end: 0x200_0000,
            setup_header: None,
        }
    }

    #[test]
    fn test_boot_params_fields_match_layout_and_cmdline() {
        let layout = MemoryLayout::new(5 * 1024).unwrap();
        let p = build_boot_params(&layout, &elf_kernel(), 42, Some((0x3000_0000, 0x1234))).unwrap();
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, LOADER_TYPE_UNDEFINED);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x3000_0000, 0x1234)
        );
        let e820 = layout.e820();
        assert_eq!(usize::from(p.e820_entries), e820.len());
        for (i, e) in e820.iter().enumerate() {
            let b = p.e820_table[i];
            assert_eq!(
                ({ b.addr }, { b.size }, { b.type_ }),
                (e.addr, e.size, e.kind)
            );
        }
    }

    #[test]
    fn test_initrd_placed_at_top_of_low_ram_page_aligned() {
        let layout = MemoryLayout::new(256).unwrap();
        let addr = initrd_address(&layout, &elf_kernel(), 0x1801).unwrap();
        assert_eq!(addr % 0x1000, 0);
        assert!(addr + 0x1801 <= 256 << 20);
        assert!(addr + 0x1801 + 0x1000 > 256 << 20);
        // Bigger than the room between kernel and top: refused.
        assert!(matches!(
            initrd_address(&layout, &elf_kernel(), 255 << 20),
            Err(BootError::InitrdTooLarge { .. })
        ));
        // Above 3 GiB the initrd stays under the kernel's limit.
        let big = MemoryLayout::new(8192).unwrap();
        let a = initrd_address(&big, &elf_kernel(), 4096).unwrap();
        assert!(a + 4096 <= DEFAULT_INITRD_ADDR_MAX + 1);
    }

    #[test]
    fn test_cmdline_over_kernel_limit_is_refused() {
        let mut k = elf_kernel();
        assert!(build_cmdline("console=ttyS0", &k).is_ok());
        let mut hdr = setup_header {
            version: 0x20f,
            cmdline_size: 16,
            ..Default::default()
        };
        k.setup_header = Some(hdr);
        assert!(matches!(
            build_cmdline("console=ttyS0 panic=1", &k),
            Err(BootError::Cmdline(_))
        ));
        hdr.cmdline_size = 2047;
        k.setup_header = Some(hdr);
        assert!(build_cmdline("console=ttyS0 panic=1", &k).is_ok());
    }

    #[test]
    fn test_load_kernel_garbage_is_refused_cleanly() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let err = load_kernel(&mem, &mut Cursor::new(vec![0u8; 4096])).unwrap_err();
        assert!(matches!(err, BootError::UnknownFormat));
        let err = load_kernel(&mem, &mut Cursor::new(b"\x7fELF".to_vec())).unwrap_err();
        assert!(matches!(err, BootError::NotX86_64Elf), "{err}");
    }

    #[test]
    fn test_write_boot_structures_lands_where_layout_says() {
        let layout = MemoryLayout::new(64).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let k = elf_kernel();
        let cmd = build_cmdline("console=ttyS0 foo=bar", &k).unwrap();
        let params = build_boot_params(&layout, &k, 21, None).unwrap();
        write_boot_structures(&mem, &cmd, &params, 2).unwrap();
        let mut buf = [0u8; 22];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0 foo=bar\0");
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
        let e820_count: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8)).unwrap();
        assert_eq!(e820_count, 2);
        let magic: u16 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1fe)).unwrap();
        assert_eq!(magic, BOOT_FLAG_MAGIC);
    }
}
