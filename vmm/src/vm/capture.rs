//! Taking a snapshot of a running VM: pause every vCPU at a consistent point, read vCPU, VM and
//! device state, write guest RAM sparsely, commit the directory atomically. Each snapshot gets a
//! new random id, written into its `state` and `memory` files (and later its working set).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devices::bus::lock_device;
use serde::Serialize;
use snapshot::dir::{DirError, MEMORY_FILE, STATE_FILE, SnapshotWriter};
use snapshot::format::{self, FormatError};
use snapshot::memory::{self, HostRegion, MemoryFileError, WriteStats};
use vm_memory::{GuestAddress, GuestMemory};

use super::{MemoryBacking, VmRuntime};
use crate::persist::{self, DeviceStates, PersistError, VmState};
use crate::vcpu::VcpuControlError;

const SAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors taking a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM could not be paused.
    #[error("cannot pause the VM: {0}")]
    Pause(#[source] VcpuControlError),
    /// No snapshot id could be drawn.
    #[error("cannot draw a snapshot id: {0}")]
    Id(#[source] std::io::Error),
    /// A vCPU's state could not be read.
    #[error(transparent)]
    Vcpu(#[from] VcpuControlError),
    /// KVM state could not be read.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The directory could not be written.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// The state file could not be written.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The memory file could not be written.
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    /// The guest has a FUSE session on a virtio-fs device (or its server is answering a
    /// request): its inodes and open files live in this process and no snapshot can carry them.
    /// Templates are taken before the guest mounts a share.
    #[error(
        "virtio-fs {0:?} is mounted by the guest (a FUSE session is open): a snapshot cannot carry it; \
         snapshot before the guest mounts the share"
    )]
    FsSession(String),
}

/// What a snapshot cost and holds.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// Where it is.
    pub path: PathBuf,
    /// Time from pause to the committed directory.
    pub elapsed_ms: f64,
    /// The memory file's figures.
    pub memory: WriteStats,
    /// Bytes the memory file occupies on disk (sparse).
    pub disk_bytes: u64,
}

/// Snapshots the VM into `dest`, which must not exist. The VM is left paused; the caller resumes.
pub fn take_snapshot(rt: &mut VmRuntime, dest: &Path) -> Result<SnapshotInfo, SnapshotError> {
    let start = Instant::now();
    if let Some(tag) = rt.virtio.iter().find_map(|d| d.fs_busy()) {
        return Err(SnapshotError::FsSession(tag));
    }
    let paused_here = !rt.is_paused();
    if paused_here {
        rt.pause().map_err(SnapshotError::Pause)?;
    }
    // Checked again with the vCPUs stopped: a FUSE_INIT may have arrived in between.
    if let Some(tag) = rt.virtio.iter().find_map(|d| d.fs_busy()) {
        if paused_here {
            rt.resume();
        }
        return Err(SnapshotError::FsSession(tag));
    }
    let vcpus = rt
        .vcpus
        .iter()
        .map(|v| v.save_state(SAVE_TIMEOUT))
        .collect::<Result<Vec<_>, _>>()?;
    let vm = persist::save_vm(&rt.vm)?;
    let serial = lock_device(&rt.serial).save();
    let ranges: Vec<(u64, u64)> = rt.layout.ram.iter().map(|r| (r.start, r.size)).collect();
    let regions = memory::file_layout(&ranges);
    let mut host = Vec::with_capacity(regions.len());
    for r in &regions {
        let ptr = rt
            .mem
            .get_host_address(GuestAddress(r.guest_addr))
            .map_err(|e| MemoryFileError::BadLayout(e.to_string()))?;
        host.push((
            *r,
            HostRegion {
                ptr,
                len: r.size as usize,
                anonymous: rt.backing == MemoryBacking::Anonymous,
            },
        ));
    }
    let id = snapshot::SnapshotId::random().map_err(SnapshotError::Id)?;
    let writer = SnapshotWriter::create(dest)?;
    // SAFETY: every vCPU is parked, so no guest code writes memory while it is read, and the
    // regions are the live mappings of `rt.mem`. Two writers remain and neither changes what the
    // guest saw: the device workers are on this (the loop's) thread, busy here; the page server
    // of a lazily restored VM may still install pages (a read below faults them in, and the
    // prefetcher may be running), and an install writes exactly the page content the snapshot
    // must hold.
    let stats = unsafe { memory::write_memory_file(&writer.path(MEMORY_FILE), &id, &host) }?;
    let state = VmState {
        mem_mib: rt.memory_mib,
        memory: regions,
        vcpus,
        vm,
        devices: DeviceStates { serial },
        ready_ms: rt.stop.ready_after().map(|d| d.as_secs_f64() * 1e3),
        host_cpuid: rt.host_cpuid.clone(),
        virtio: rt.virtio.iter().map(|d| d.save()).collect(),
    };
    format::write_file(&writer.path(STATE_FILE), &id, &state)?;
    let path = writer.commit()?;
    let disk_bytes = std::fs::metadata(path.join(MEMORY_FILE))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0);
    let info = SnapshotInfo {
        path,
        elapsed_ms: start.elapsed().as_secs_f64() * 1e3,
        memory: stats,
        disk_bytes,
    };
    tracing::info!(
        "snapshot written to {} in {:.1} ms ({} of {} MiB are data)",
        info.path.display(),
        info.elapsed_ms,
        stats.data_pages * 4096 / 1024 / 1024,
        stats.total_bytes >> 20
    );
    Ok(info)
}
