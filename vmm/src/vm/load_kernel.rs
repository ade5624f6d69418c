//! Loading a guest by cold boot: fresh memory, a kernel and the Linux boot protocol.

use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::legacy::Serial;
use kvm_ioctls::Cap;
use snapshot::memory::file_layout;
use snapshot::memory_source::anonymous;
use vm_memory::GuestMemoryMmap;

use super::kvm_system::KvmSystem;
use super::shell::{ShellParts, check_snapshot_dest};
use super::{
    BuildVmError, HostResources, KernelImage, Loaded, MemoryBacking, SnapshotOnReady, pio_bus,
    place_memory, serial_trigger, validate_shape, virtio,
};
use crate::arch::cpuid::VcpuTopology;
use crate::boot::{self, LoadedKernel};
use crate::layout::MemoryLayout;
use crate::persist;
use crate::vcpu::{self, Vcpu};

/// What a cold boot loads.
#[derive(Debug)]
pub struct BootSpec {
    /// The kernel.
    pub kernel: KernelImage,
    /// An initrd to load.
    pub initrd: Option<PathBuf>,
    /// The kernel command line (the virtio devices' announcements are appended).
    pub cmdline: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// virtio-mmio devices, with their host resources.
    pub virtio: virtio::VirtioSpecs,
    /// Snapshot at READY.
    pub snapshot_on_ready: Option<SnapshotOnReady>,
}

/// Opens a kernel or initrd file as hostile input: without blocking, a regular file only.
fn open_image(path: &Path) -> std::io::Result<File> {
    snapshot::file::open_regular(path)
}

/// Step 1 of a cold boot, before any VM exists: the shape, the kernel and initrd files, and the
/// snapshot destination when one is asked for (and that this host's XSAVE state fits in it).
pub fn check_boot(spec: &BootSpec, vcpus: u8) -> Result<(), BuildVmError> {
    validate_shape(vcpus, spec.mem_mib)?;
    if let KernelImage::Path(path) = &spec.kernel {
        check_kernel_file(path)?;
    }
    if let Some(path) = &spec.initrd {
        open_image(path).map_err(|source| BuildVmError::InitrdOpen {
            path: path.clone(),
            source,
        })?;
    }
    if let Some(on_ready) = &spec.snapshot_on_ready {
        check_snapshot_dest(&on_ready.dir)?;
        persist::check_xsave_size(KvmSystem::open()?.kvm())?;
    }
    Ok(())
}

/// Whether `path` names a kernel this VMM can boot (for early CLI checks).
pub fn check_kernel_file(path: &Path) -> Result<boot::KernelFormat, BuildVmError> {
    let open_err = |source| BuildVmError::KernelOpen {
        path: path.to_path_buf(),
        source,
    };
    let mut f = open_image(path).map_err(open_err)?;
    let mut head = [0u8; boot::FORMAT_PROBE_LEN];
    let n = boot::read_up_to(&mut f, &mut head).map_err(open_err)?;
    Ok(boot::detect_format(&head[..n])?)
}

fn load_guest(
    spec: &BootSpec,
    vcpus: u8,
    cmdline: &str,
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
) -> Result<LoadedKernel, BuildVmError> {
    let kernel = match &spec.kernel {
        KernelImage::Path(path) => {
            let mut f = open_image(path).map_err(|source| BuildVmError::KernelOpen {
                path: path.clone(),
                source,
            })?;
            boot::load_kernel(mem, &mut f)?
        }
        KernelImage::Builtin { bytes, .. } => boot::load_kernel(mem, &mut Cursor::new(*bytes))?,
    };
    let initrd = match &spec.initrd {
        Some(path) => {
            let open_err = |source| BuildVmError::InitrdOpen {
                path: path.clone(),
                source,
            };
            let mut f = open_image(path).map_err(open_err)?;
            let size = f.metadata().map_err(open_err)?.len();
            Some(boot::load_initrd(mem, layout, &kernel, &mut f, size)?)
        }
        None => None,
    };
    let cmdline_len = cmdline.len();
    let cmdline = boot::build_cmdline(cmdline, &kernel)?;
    let params = boot::build_boot_params(layout, &kernel, cmdline_len, initrd)?;
    boot::write_boot_structures(mem, &cmdline, &params, vcpus)?;
    Ok(kernel)
}

/// Step 3 for a cold boot, on the VMM thread.
pub(super) fn load(
    shell: &mut ShellParts,
    spec: BootSpec,
    host: HostResources,
) -> Result<Loaded, BuildVmError> {
    let count = shell.vcpu_fds.len() as u8;
    let layout = validate_shape(count, spec.mem_mib)?;
    let ranges: Vec<(u64, u64)> = layout.ram.iter().map(|r| (r.start, r.size)).collect();
    let regions = file_layout(&ranges);
    let (mem, reservation) = place_memory(shell, &regions, |at| Ok(anonymous(&regions, at)?))?;
    // virtio devices first: the command line announces them.
    let mut mmio = devices::Bus::new();
    let fs_setup = crate::seccomp::fs_thread_setup(&shell.seccomp);
    let (virtio, fragments) =
        virtio::attach_devices(&shell.vm, &mem, &mut mmio, &spec.virtio, &fs_setup)?;
    let cmdline = std::iter::once(spec.cmdline.as_str())
        .chain(fragments.iter().map(String::as_str))
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let kernel = load_guest(&spec, count, &cmdline, &mem, &layout)?;
    tracing::debug!(?kernel.format, entry = kernel.entry, "kernel loaded");

    let trigger = serial_trigger(&shell.vm)?;
    let serial = Arc::new(Mutex::new(Serial::new(trigger, host.serial)));
    let pio = pio_bus(&serial, &shell.stop)?;
    let mmio = Arc::new(mmio);
    let tsc_deadline = shell.system.kvm().check_extension(Cap::TscDeadlineTimer);
    let mut vcpus = Vec::with_capacity(usize::from(count));
    for (id, fd) in std::mem::take(&mut shell.vcpu_fds).into_iter().enumerate() {
        let id = id as u8;
        vcpu::configure_vcpu(
            &fd,
            shell.system.supported_cpuid(),
            VcpuTopology {
                id,
                count,
                tsc_deadline,
            },
            kernel.entry,
        )?;
        vcpus.push(Vcpu {
            fd,
            id,
            pio: pio.clone(),
            mmio: mmio.clone(),
            stop: shell.stop.clone(),
            msr_indices: shell.system.msr_indices().clone(),
            seccomp: shell.seccomp.clone(),
        });
    }
    Ok(Loaded {
        vcpus,
        mem,
        layout,
        backing: MemoryBacking::Anonymous,
        mem_mib: spec.mem_mib,
        serial,
        forward_stdin: host.forward_stdin,
        snapshot_on_ready: spec.snapshot_on_ready,
        lazy: None,
        virtio,
        reservation,
        parked: Vec::new(),
    })
}
