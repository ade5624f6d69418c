//! Cold boot: fresh memory, a kernel and the Linux boot protocol.

use std::fs::File;
use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::legacy::Serial;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Cap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{
    BuildVmError, KernelImage, Launch, MemoryBacking, VmConfig, VmReport, kvm_err, launch, pio_bus,
    prepare, register_memory, serial_trigger, validate_shape, virtio,
};
use crate::arch::cpuid::VcpuTopology;
use crate::boot::{self, LoadedKernel};
use crate::layout::MemoryLayout;
use crate::persist;
use crate::vcpu::{self, Vcpu};

fn load_guest(
    config: &VmConfig,
    cmdline: &str,
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
) -> Result<LoadedKernel, BuildVmError> {
    let kernel = match &config.kernel {
        KernelImage::Path(path) => {
            let mut f = File::open(path).map_err(|source| BuildVmError::KernelOpen {
                path: path.clone(),
                source,
            })?;
            boot::load_kernel(mem, &mut f)?
        }
        KernelImage::Builtin { bytes, .. } => boot::load_kernel(mem, &mut Cursor::new(*bytes))?,
    };
    let initrd = match &config.initrd {
        Some(path) => {
            let open_err = |source| BuildVmError::InitrdOpen {
                path: path.clone(),
                source,
            };
            let mut f = File::open(path).map_err(open_err)?;
            let size = f.metadata().map_err(open_err)?.len();
            Some(boot::load_initrd(mem, layout, &kernel, &mut f, size)?)
        }
        None => None,
    };
    let cmdline_len = cmdline.len();
    let cmdline = boot::build_cmdline(cmdline, &kernel)?;
    let params = boot::build_boot_params(layout, &kernel, cmdline_len, initrd)?;
    boot::write_boot_structures(mem, &cmdline, &params, config.vcpus)?;
    Ok(kernel)
}

/// Boots and runs a VM until it stops; returns why and what was measured.
pub fn run(config: VmConfig) -> Result<VmReport, BuildVmError> {
    let layout = validate_shape(config.vcpus, config.mem_mib)?;
    let p = prepare(config.api_sock.as_deref(), config.process_start)?;
    let ranges: Vec<(GuestAddress, usize)> = layout
        .ram
        .iter()
        .map(|r| (GuestAddress(r.start), r.size as usize))
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|e| BuildVmError::Memory {
        mib: config.mem_mib,
        detail: e.to_string(),
    })?;
    register_memory(&p.vm, &mem, config.mem_mib)?;
    // virtio devices first: the command line announces them.
    let mut mmio = devices::Bus::new();
    let (virtio, fragments) = virtio::attach_devices(&p.vm, &mem, &mut mmio, &config.virtio)?;
    let cmdline = std::iter::once(config.cmdline.as_str())
        .chain(fragments.iter().map(String::as_str))
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let kernel = load_guest(&config, &cmdline, &mem, &layout)?;
    tracing::debug!(?kernel.format, entry = kernel.entry, "kernel loaded");

    let trigger = serial_trigger(&p.vm)?;
    let VmConfig {
        serial: out,
        forward_stdin,
        snapshot_on_ready,
        process_start,
        vcpus: count,
        mem_mib,
        ..
    } = config;
    let serial = Arc::new(Mutex::new(Serial::new(trigger, out)));
    let pio = pio_bus(&serial, &p.stop)?;
    let mmio = Arc::new(mmio);

    if snapshot_on_ready.is_some() {
        persist::check_xsave_size(&p.kvm)?;
    }
    let msr_indices = Arc::new(persist::msr_index_list(&p.kvm)?);
    let supported = p
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = p.kvm.check_extension(Cap::TscDeadlineTimer);
    let mut vcpus = Vec::with_capacity(usize::from(count));
    for id in 0..count {
        let fd =
            p.vm.create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu::configure_vcpu(
            &fd,
            &supported,
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
            stop: p.stop.clone(),
            msr_indices: msr_indices.clone(),
        });
    }
    launch(
        p,
        Launch {
            vcpus,
            mem,
            layout,
            backing: MemoryBacking::Anonymous,
            mem_mib,
            serial,
            forward_stdin,
            snapshot_on_ready,
            page_server: None,
            virtio,
            process_start,
        },
    )
}

/// Whether `path` names a kernel this VMM can boot (for early CLI checks).
pub fn check_kernel_file(path: &Path) -> Result<boot::KernelFormat, BuildVmError> {
    let open_err = |source| BuildVmError::KernelOpen {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(open_err)?;
    let mut head = [0u8; boot::FORMAT_PROBE_LEN];
    let n = boot::read_up_to(&mut f, &mut head).map_err(open_err)?;
    Ok(boot::detect_format(&head[..n])?)
}
