//! The virtio-mmio devices of a VM: building them, placing each in a slot of the MMIO window with
//! its ioeventfds and irqfd, and announcing it on the kernel command line.
//!
//! Slot `i` sits at `VIRTIO_MMIO_START + i * 4 KiB` with GSI `5 + i` (GSIs 0-4 are the PIT, the
//! keyboard, the cascade and COM1-2). Devices are built on the thread that runs the event loop:
//! their workers are `!Send` and live there.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use devices::persist::Persist;
use devices::virtio::block::{BlockArgs, BlockState};
use devices::virtio::fs::{Fs, FsArgs, FsConfig, FsLimits, FsState, ThreadSetup};
use devices::virtio::net::{Backend, Net, NetArgs, NetConfig, NetState};
use devices::virtio::rng::{RngArgs, RngState};
use devices::virtio::vsock::{VsockArgs, VsockState};
use serde::{Deserialize, Serialize};

use devices::Bus;
use devices::virtio::block::{BackendKind, Block, BlockConfig};
use devices::virtio::front::Parts;
use devices::virtio::kernel_cmdline_fragment;
use devices::virtio::mmio::{MMIO_WINDOW_SIZE, NOTIFY_OFFSET};
use devices::virtio::rng::{Rng, RngConfig};
use devices::virtio::vsock::{Vsock, VsockConfig};
use event_loop::BoxedSource;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::BuildVmError;
use crate::layout::{MMIO_GAP_END, VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_START};

/// First GSI of virtio-mmio devices.
const FIRST_GSI: u32 = 5;
/// Last GSI the IOAPIC has.
const LAST_GSI: u32 = 23;

/// A disk given with `--disk PATH[,ro][,id=NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The backing file.
    pub path: PathBuf,
    /// Refuse guest writes.
    pub read_only: bool,
    /// The id the guest reads with GET_ID (default: the file name).
    pub id: Option<String>,
}

/// An empty disk slot of `--disk-slot NAME[,ro]`, backed when a snapshot is restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpareSlot {
    /// The slot's name (and the id the guest reads).
    pub name: String,
    /// Offered to the guest read-only (VIRTIO_BLK_F_RO): every restore opens its backing file
    /// read-only, under a shared lock, so clones can share one image (a container's rootfs).
    pub read_only: bool,
}

/// The vsock device of `--vsock CID,PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockSpec {
    /// The guest's context id (3 or more).
    pub cid: u64,
    /// The host side.
    pub host: VsockHost,
}

pub use devices::virtio::vsock::DEFAULT_MAX_CONNECTIONS as DEFAULT_VSOCK_MAX_CONNECTIONS;

pub use devices::virtio::net::{TapError, open_tap_fd};

pub use devices::virtio::fs::{FsShare, check_tag as check_fs_tag};

/// The host side of a vsock device: given at boot, and again by each restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockHost {
    /// The host's listening Unix socket.
    pub path: PathBuf,
    /// Most connections at once (guest- and host-initiated); the excess gets RST. Lowered to
    /// leave fds in reserve under `RLIMIT_NOFILE`.
    pub max_connections: usize,
}

impl VsockHost {
    /// A host socket at `path` with the default connection cap.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            max_connections: devices::virtio::vsock::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// A virtio-net device of `--net ID[,tap=NAME][,mac=MAC]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The device's id: the slot a restore attaches a tap to (`restore --net-slot ID=TAP`).
    pub id: String,
    /// The tap to open (created if it does not exist, which needs CAP_NET_ADMIN); `None` makes
    /// a slot: link down, frames dropped, until a restore attaches a tap.
    pub tap: Option<String>,
    /// The guest's MAC (default: a random locally administered one).
    pub mac: Option<[u8; 6]>,
}

/// A virtio-fs device of `--fs TAG=DIR[,ro]` (a share) or `--fs TAG` (a slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsSpec {
    /// The tag the guest mounts it by.
    pub tag: String,
    /// The shared directory; `None` makes a slot a restore attaches a directory to
    /// (`restore --fs-slot TAG=DIR[,ro]`).
    pub share: Option<FsShare>,
}

/// A directory handed to a restore for the snapshot's virtio-fs slot `tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsSlot {
    /// The slot's tag in the snapshot.
    pub tag: String,
    /// The directory and whether it is read-only.
    pub share: FsShare,
}

/// A tap handed to a restore for the snapshot's net device `id`, already opened (the runtime
/// opens it inside the container's network namespace) with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
#[derive(Debug)]
pub struct NetTap {
    /// The net device's id in the snapshot.
    pub id: String,
    /// The tap's fd.
    pub tap: OwnedFd,
}

/// The virtio devices a VM gets.
#[derive(Debug, Clone, Default)]
pub struct VirtioSpecs {
    /// Disks, in slot order.
    pub disks: Vec<DiskSpec>,
    /// Empty spare disk slots (`--disk-slot NAME`), after the disks: their backing file is chosen
    /// when a snapshot of this VM is restored.
    pub spare_slots: Vec<SpareSlot>,
    /// The vsock device.
    pub vsock: Option<VsockSpec>,
    /// A virtio-rng device.
    pub rng: bool,
    /// virtio-net devices, after the disks, vsock and rng.
    pub nets: Vec<NetSpec>,
    /// virtio-fs devices, after every other device.
    pub fs: Vec<FsSpec>,
}

/// A device in its slot.
pub enum VirtioDevice {
    /// virtio-blk.
    Block(Block),
    /// virtio-vsock.
    Vsock(Vsock),
    /// virtio-rng.
    Rng(Rng),
    /// virtio-net.
    Net(Net),
    /// virtio-fs.
    Fs(Fs),
}

impl std::fmt::Debug for VirtioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VirtioDevice::Block(_) => "virtio-blk",
            VirtioDevice::Vsock(_) => "virtio-vsock",
            VirtioDevice::Rng(_) => "virtio-rng",
            VirtioDevice::Net(_) => "virtio-net",
            VirtioDevice::Fs(_) => "virtio-fs",
        })
    }
}

/// A device, where it sits, and its interrupt.
#[derive(Debug)]
pub struct Attached {
    /// The device.
    pub device: VirtioDevice,
    /// Its MMIO base.
    pub base: u64,
    /// Its GSI.
    pub gsi: u32,
    /// The disk's backing file or the vsock's Unix socket, recorded in snapshots.
    pub path: Option<PathBuf>,
}

/// A virtio device in a snapshot: where it sat and its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VirtioSnapshot {
    /// MMIO base.
    pub base: u64,
    /// GSI.
    pub gsi: u32,
    /// Backing file (disks) or Unix socket (vsock).
    pub path: Option<PathBuf>,
    /// The device's own state.
    pub state: VirtioState,
}

/// The state of one device kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VirtioState {
    /// virtio-blk.
    Block(BlockState),
    /// virtio-vsock.
    Vsock(VsockState),
    /// virtio-rng.
    Rng(RngState),
    /// virtio-net.
    Net(NetState),
    /// virtio-fs (a slot: a snapshot is refused while the guest has a FUSE session on it).
    Fs(FsState),
}

impl Attached {
    /// The device's state for a snapshot (in-flight block requests are rewound and replayed on
    /// restore, so this is correct at any point).
    pub fn save(&self) -> VirtioSnapshot {
        let state = match &self.device {
            VirtioDevice::Block(d) => VirtioState::Block(d.save()),
            VirtioDevice::Vsock(d) => VirtioState::Vsock(d.save()),
            VirtioDevice::Rng(d) => VirtioState::Rng(d.save()),
            VirtioDevice::Net(d) => VirtioState::Net(d.save()),
            VirtioDevice::Fs(d) => VirtioState::Fs(d.save()),
        };
        VirtioSnapshot {
            base: self.base,
            gsi: self.gsi,
            path: self.path.clone(),
            state,
        }
    }
}

impl Attached {
    /// The device's worker as an event-loop source.
    pub fn event_source<C>(&self) -> BoxedSource<C> {
        match &self.device {
            VirtioDevice::Block(d) => d.event_source(),
            VirtioDevice::Vsock(d) => d.event_source(),
            VirtioDevice::Rng(d) => d.event_source(),
            VirtioDevice::Net(d) => d.event_source(),
            VirtioDevice::Fs(d) => d.event_source(),
        }
    }

    /// The tag of a virtio-fs device the guest has a FUSE session on, or whose server is still
    /// answering requests: its inodes and open files live in this process, so a snapshot of it
    /// would be a broken clone and is refused.
    pub fn fs_busy(&self) -> Option<String> {
        match &self.device {
            VirtioDevice::Fs(d) if d.fs_session_active() || !d.is_quiescent() => {
                Some(d.worker().borrow().handler.tag().to_string())
            }
            _ => None,
        }
    }
}

/// Errors setting up devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSetupError {
    /// A disk image could not be opened or locked (another writer has it).
    #[error(transparent)]
    OpenDisk(#[from] devices::virtio::block::OpenImageError),
    /// A virtio-blk device could not be built.
    #[error("virtio-blk: {0}")]
    Block(#[from] devices::virtio::block::BlockError),
    /// A virtio-blk device could not be restored.
    #[error("virtio-blk: {0}")]
    BlockRestore(#[from] devices::virtio::block::BlockRestoreError),
    /// A virtio-vsock device could not be built.
    #[error("virtio-vsock: {0}")]
    Vsock(#[from] devices::virtio::vsock::VsockError),
    /// A virtio-vsock device could not be restored.
    #[error("virtio-vsock: {0}")]
    VsockRestore(#[from] devices::virtio::vsock::VsockRestoreError),
    /// A virtio-rng device could not be built or restored.
    #[error("virtio-rng: {0}")]
    Rng(#[source] std::io::Error),
    /// A virtio-rng device could not be restored.
    #[error("virtio-rng: {0}")]
    RngRestore(#[from] devices::virtio::mmio::RestoreTransportError),
    /// A virtio-net device could not be built.
    #[error("virtio-net: {0}")]
    Net(#[from] devices::virtio::net::NetError),
    /// A virtio-net device could not be restored.
    #[error("virtio-net: {0}")]
    NetRestore(#[from] devices::virtio::net::NetRestoreError),
    /// A tap could not be opened or was not opened as virtio-net needs.
    #[error("virtio-net: {0}")]
    Tap(#[from] devices::virtio::net::TapError),
    /// Two net devices (or two taps of a restore) with one id.
    #[error("two net devices named {0:?}")]
    DuplicateNet(String),
    /// A restore gave a tap for a net device the snapshot does not have.
    #[error("the snapshot has no net device named {0:?}")]
    UnknownNetSlot(String),
    /// A virtio-fs device could not be built.
    #[error(transparent)]
    Fs(#[from] devices::virtio::fs::FsError),
    /// A virtio-fs device could not be restored.
    #[error("virtio-fs: {0}")]
    FsRestore(#[from] devices::virtio::fs::RestoreFsError),
    /// Two virtio-fs devices (or two directories of a restore) with one tag.
    #[error("two virtio-fs devices tagged {0:?}")]
    DuplicateFs(String),
    /// A restore gave a directory for a virtio-fs tag the snapshot does not have.
    #[error("the snapshot has no virtio-fs slot tagged {0:?}")]
    UnknownFsSlot(String),
    /// Placing a device on a bus failed.
    #[error(transparent)]
    Bus(#[from] devices::BusError),
    /// A device's eventfds could not be had.
    #[error("device eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// Registering an ioeventfd or irqfd with KVM failed.
    #[error("{what} for the device at {base:#x}: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The device's slot.
        base: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// More devices than GSIs.
    #[error("too many virtio devices (at most {max})", max = LAST_GSI - FIRST_GSI + 1)]
    TooMany,
    /// A saved slot lies outside the window.
    #[error("virtio slot {base:#x} with GSI {gsi} is outside the virtio window")]
    BadSlot {
        /// Its base.
        base: u64,
        /// Its GSI.
        gsi: u32,
    },
    /// `--disk-slot NAME=PATH` names a slot the snapshot does not have.
    #[error("the snapshot has no spare disk slot named {0:?}")]
    UnknownSlot(String),
    /// The snapshot has a vsock device but the restore gave no host socket for it.
    #[error(
        "the snapshot has a vsock device (guest CID {cid}): give its host socket with --vsock PATH"
    )]
    VsockPathMissing {
        /// The guest's CID.
        cid: u64,
    },
    /// A vsock host socket was given but the snapshot has no vsock device.
    #[error("--vsock was given but the snapshot has no vsock device")]
    NoVsockDevice,
}

/// Builds the devices of `specs`, puts them on `mmio`, wires their notifications and interrupts
/// into KVM; returns them with the kernel command-line fragments that announce them.
pub fn attach_devices(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    specs: &VirtioSpecs,
    fs_setup: &dyn Fn() -> Option<ThreadSetup>,
) -> Result<(Vec<Attached>, Vec<String>), BuildVmError> {
    let mut devices = Vec::new();
    for d in &specs.disks {
        let file = open_disk(&d.path, d.read_only)?;
        let id = d.id.clone().unwrap_or_else(|| {
            d.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let config = BlockConfig {
            id,
            read_only: d.read_only,
            spare_slot: None,
            backend: BackendKind::IoUring,
        };
        let block =
            Block::new_block(config, Some(file), mem.clone()).map_err(DeviceSetupError::from)?;
        devices.push((VirtioDevice::Block(block), Some(d.path.clone())));
    }
    for slot in &specs.spare_slots {
        let config = BlockConfig {
            id: slot.name.clone(),
            read_only: slot.read_only,
            spare_slot: Some(slot.name.clone()),
            backend: BackendKind::IoUring,
        };
        devices.push((
            VirtioDevice::Block(
                Block::new_block(config, None, mem.clone()).map_err(DeviceSetupError::from)?,
            ),
            None,
        ));
    }
    if let Some(v) = &specs.vsock {
        let config = VsockConfig {
            guest_cid: v.cid,
            uds_path: v.host.path.clone(),
            max_connections: v.host.max_connections,
        };
        devices.push((
            VirtioDevice::Vsock(
                Vsock::new_vsock(config, mem.clone()).map_err(DeviceSetupError::from)?,
            ),
            Some(v.host.path.clone()),
        ));
    }
    if specs.rng {
        devices.push((
            VirtioDevice::Rng(
                Rng::new_rng(RngConfig::default(), mem.clone()).map_err(DeviceSetupError::Rng)?,
            ),
            None,
        ));
    }
    for (i, n) in specs.nets.iter().enumerate() {
        if specs.nets[..i].iter().any(|o| o.id == n.id) {
            return Err(DeviceSetupError::DuplicateNet(n.id.clone()).into());
        }
        let backend = n
            .tap
            .as_deref()
            .map(Backend::open_tap)
            .transpose()
            .map_err(DeviceSetupError::from)?;
        let config = NetConfig {
            id: n.id.clone(),
            mac: n.mac.unwrap_or_else(devices::virtio::net::random_mac),
        };
        devices.push((
            VirtioDevice::Net(
                Net::new_net(config, backend, mem.clone()).map_err(DeviceSetupError::from)?,
            ),
            None,
        ));
    }
    for (i, f) in specs.fs.iter().enumerate() {
        if specs.fs[..i].iter().any(|o| o.tag == f.tag) {
            return Err(DeviceSetupError::DuplicateFs(f.tag.clone()).into());
        }
        let config = FsConfig {
            tag: f.tag.clone(),
            share: f.share.clone(),
            limits: FsLimits::default(),
        };
        let device = Fs::new_fs(
            &config,
            mem.clone(),
            f.share.as_ref().and_then(|_| fs_setup()),
        )
        .map_err(DeviceSetupError::from)?;
        devices.push((VirtioDevice::Fs(device), None));
    }

    let mut attached = Vec::with_capacity(devices.len());
    let mut cmdline = Vec::with_capacity(devices.len());
    for (slot, (device, path)) in devices.into_iter().enumerate() {
        let gsi = FIRST_GSI + slot as u32;
        let base = VIRTIO_MMIO_START + slot as u64 * VIRTIO_MMIO_SLOT_SIZE;
        if gsi > LAST_GSI {
            return Err(DeviceSetupError::TooMany.into());
        }
        cmdline.push(kernel_cmdline_fragment(base, MMIO_WINDOW_SIZE, gsi));
        attached.push(place(vm, mmio, device, base, gsi, path)?);
    }
    Ok((attached, cmdline))
}

/// Opens and locks a disk image (exclusive for read-write, shared for read-only): a second
/// writer of one image, in this VM or another, is refused.
fn open_disk(path: &std::path::Path, read_only: bool) -> Result<std::fs::File, BuildVmError> {
    devices::virtio::block::open_image(path, read_only)
        .map_err(|e| DeviceSetupError::from(e).into())
}

/// Puts a device in its slot: its queue notifications as ioeventfds and its interrupt as an
/// irqfd ([`register_slot`]), its transport on the MMIO bus.
fn place(
    vm: &VmFd,
    mmio: &mut Bus,
    device: VirtioDevice,
    base: u64,
    gsi: u32,
    path: Option<PathBuf>,
) -> Result<Attached, BuildVmError> {
    let (queue_evts, irqfd) = match &device {
        VirtioDevice::Block(d) => (d.queue_evts(), d.irqfd()),
        VirtioDevice::Vsock(d) => (d.queue_evts(), d.irqfd()),
        VirtioDevice::Rng(d) => (d.queue_evts(), d.irqfd()),
        VirtioDevice::Net(d) => (d.queue_evts(), d.irqfd()),
        VirtioDevice::Fs(d) => (d.queue_evts(), d.irqfd()),
    };
    register_slot(
        vm,
        base,
        gsi,
        &queue_evts.map_err(DeviceSetupError::EventFd)?,
        &irqfd.map_err(DeviceSetupError::EventFd)?,
    )?;
    insert(mmio, device, base, gsi, path)
}

/// Checks a slot against the virtio window and the GSIs, then registers its queue notifications
/// as ioeventfds (at the window's notify register, datamatch = queue index) and its interrupt as
/// an irqfd for its GSI. The KVM half of placing a device: done before the device itself exists
/// when a template is pre-loaded.
fn register_slot(
    vm: &VmFd,
    base: u64,
    gsi: u32,
    queue_evts: &[EventFd],
    irqfd: &EventFd,
) -> Result<(), BuildVmError> {
    if base < VIRTIO_MMIO_START
        || base + MMIO_WINDOW_SIZE > MMIO_GAP_END
        || !(FIRST_GSI..=LAST_GSI).contains(&gsi)
    {
        return Err(DeviceSetupError::BadSlot { base, gsi }.into());
    }
    let kvm = |what| move |source| DeviceSetupError::Kvm { what, base, source };
    for (queue, evt) in queue_evts.iter().enumerate() {
        vm.register_ioevent(
            evt,
            &IoEventAddress::Mmio(base + NOTIFY_OFFSET),
            queue as u32,
        )
        .map_err(kvm("KVM_IOEVENTFD"))?;
    }
    vm.register_irqfd(irqfd, gsi).map_err(kvm("KVM_IRQFD"))?;
    Ok(())
}

/// The bus half of placing a device: its transport at `base`.
fn insert(
    mmio: &mut Bus,
    device: VirtioDevice,
    base: u64,
    gsi: u32,
    path: Option<PathBuf>,
) -> Result<Attached, BuildVmError> {
    let transport = match &device {
        VirtioDevice::Block(d) => d.transport(),
        VirtioDevice::Vsock(d) => d.transport(),
        VirtioDevice::Rng(d) => d.transport(),
        VirtioDevice::Net(d) => d.transport(),
        VirtioDevice::Fs(d) => d.transport(),
    };
    mmio.insert(transport, base, MMIO_WINDOW_SIZE)
        .map_err(DeviceSetupError::from)?;
    Ok(Attached {
        device,
        base,
        gsi,
        path,
    })
}

/// A device slot of a snapshot made ready before its host resources are known: the device's
/// channels and `EventFd`s made and registered with KVM as ioeventfds and irqfd.
#[derive(Debug)]
pub struct PreparedSlot {
    saved: VirtioSnapshot,
    parts: Parts,
}

/// Step one of restoring a snapshot's devices, which needs no host resource: each saved slot
/// checked, its `EventFd`s made and registered with KVM.
pub fn prepare_slots(
    vm: &VmFd,
    saved: &[VirtioSnapshot],
) -> Result<Vec<PreparedSlot>, BuildVmError> {
    saved
        .iter()
        .map(|s| {
            let queues = match &s.state {
                VirtioState::Block(d) => d.transport.queue_max_sizes.len(),
                VirtioState::Vsock(d) => d.transport.queue_max_sizes.len(),
                VirtioState::Rng(d) => d.transport.queue_max_sizes.len(),
                VirtioState::Net(d) => d.transport.queue_max_sizes.len(),
                VirtioState::Fs(d) => d.transport.queue_max_sizes.len(),
            };
            let parts = Parts::new(queues).map_err(DeviceSetupError::EventFd)?;
            register_slot(
                vm,
                s.base,
                s.gsi,
                &parts.queue_evts,
                parts.interrupt.irqfd(),
            )?;
            Ok(PreparedSlot {
                saved: s.clone(),
                parts,
            })
        })
        .collect()
}

/// The backing files of a restore's spare disk slots: by path, or opened by the restorer.
#[derive(Debug)]
pub struct HostDisks<'a> {
    /// Opened here by path.
    pub paths: &'a HashMap<String, PathBuf>,
    /// Opened by the restorer.
    pub files: HashMap<String, std::fs::File>,
}

/// The directories of a restore's virtio-fs slots, and the set-up each share's server thread
/// runs first (the VMM's seccomp filter for it).
pub struct FsHosts<'a> {
    /// A directory per slot tag (a slot left out stays empty).
    pub slots: Vec<FsSlot>,
    /// Makes a server thread's set-up.
    pub setup: &'a dyn Fn() -> Option<ThreadSetup>,
}

impl std::fmt::Debug for FsHosts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsHosts")
            .field("slots", &self.slots)
            .finish()
    }
}

/// Removes the vsock sockets a failed attach bound, so that it leaves nothing behind.
struct BoundSockets(Vec<PathBuf>);

impl Drop for BoundSockets {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Step two: the devices of `prepared` rebuilt in their slots with the host resources the
/// restorer gives: `slots` is the backing file of each spare disk slot by name
/// (`--disk-slot NAME=PATH`; a slot left out stays empty), `vsock` the vsock device's host
/// socket (required when the snapshot has a vsock device: a restore never binds the
/// snapshotted VM's socket, so clones of one template each get their own), `nets` the taps of
/// its net devices by id (a net device left out has no link). On an error nothing it opened or
/// bound is left.
pub fn restore_devices(
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    prepared: Vec<PreparedSlot>,
    slots: HostDisks,
    mut vsock: Option<(&VsockHost, Option<std::os::unix::net::UnixListener>)>,
    nets: Vec<NetTap>,
    fs: FsHosts,
) -> Result<Vec<Attached>, BuildVmError> {
    let mut shares: HashMap<String, FsShare> = HashMap::new();
    for f in fs.slots {
        if shares.contains_key(&f.tag) {
            return Err(DeviceSetupError::DuplicateFs(f.tag).into());
        }
        if !prepared
            .iter()
            .any(|s| matches!(&s.saved.state, VirtioState::Fs(d) if d.tag == f.tag))
        {
            return Err(DeviceSetupError::UnknownFsSlot(f.tag).into());
        }
        shares.insert(f.tag, f.share);
    }
    let HostDisks {
        paths: slots,
        files: mut slot_files,
    } = slots;
    let mut taps: HashMap<String, OwnedFd> = HashMap::new();
    for t in nets {
        if taps.contains_key(&t.id) {
            return Err(DeviceSetupError::DuplicateNet(t.id).into());
        }
        if !prepared
            .iter()
            .any(|s| matches!(&s.saved.state, VirtioState::Net(n) if n.id == t.id))
        {
            return Err(DeviceSetupError::UnknownNetSlot(t.id).into());
        }
        taps.insert(t.id, t.tap);
    }
    if vsock.is_some()
        && !prepared
            .iter()
            .any(|s| matches!(s.saved.state, VirtioState::Vsock(_)))
    {
        return Err(DeviceSetupError::NoVsockDevice.into());
    }
    let mut attached = Vec::with_capacity(prepared.len());
    let mut used = Vec::new();
    let mut bound = BoundSockets(Vec::new());
    for PreparedSlot { saved: s, parts } in prepared {
        let parts = Some(parts);
        let (device, path) = match &s.state {
            VirtioState::Block(state) => {
                let given = state
                    .disk
                    .spare_slot
                    .as_ref()
                    .and_then(|name| slot_files.remove(name));
                let path = match &state.disk.spare_slot {
                    Some(name) => {
                        used.push(name.clone());
                        slots.get(name).cloned().or_else(|| {
                            given
                                .is_some()
                                .then(|| PathBuf::from(format!("(slot {name}, passed)")))
                        })
                    }
                    None => s.path.clone(),
                };
                let file = match given {
                    Some(f) => Some(
                        devices::virtio::block::lock_image(
                            f,
                            path.as_deref().unwrap_or(Path::new("")),
                            state.disk.read_only,
                        )
                        .map_err(DeviceSetupError::from)?,
                    ),
                    None => path
                        .as_deref()
                        .map(|p| open_disk(p, state.disk.read_only))
                        .transpose()?,
                };
                let args = BlockArgs {
                    mem: mem.clone(),
                    file,
                    backend: BackendKind::IoUring,
                    parts,
                };
                (
                    VirtioDevice::Block(
                        Block::restore(args, state).map_err(DeviceSetupError::from)?,
                    ),
                    path,
                )
            }
            VirtioState::Vsock(state) => {
                let (host, listener) = vsock.take().ok_or(DeviceSetupError::VsockPathMissing {
                    cid: state.guest_cid,
                })?;
                let path = host.path.clone();
                // A socket the restorer bound stays its own: not removed with the VM.
                let ours = listener.is_none();
                let args = VsockArgs {
                    mem: mem.clone(),
                    uds_path: path.clone(),
                    max_connections: host.max_connections,
                    listener,
                    parts,
                };
                let device = Vsock::restore(args, state).map_err(DeviceSetupError::from)?;
                if ours {
                    bound.0.push(path.clone());
                }
                (VirtioDevice::Vsock(device), ours.then_some(path))
            }
            VirtioState::Net(state) => {
                let backend = taps
                    .remove(&state.id)
                    .map(Backend::from_tap_fd)
                    .transpose()
                    .map_err(DeviceSetupError::from)?;
                if backend.is_none() {
                    tracing::info!(
                        "virtio-net {}: no tap given (--net-slot {}=TAP): link down",
                        state.id,
                        state.id
                    );
                }
                let args = NetArgs {
                    mem: mem.clone(),
                    backend,
                    parts,
                };
                (
                    VirtioDevice::Net(Net::restore(args, state).map_err(DeviceSetupError::from)?),
                    None,
                )
            }
            VirtioState::Fs(state) => {
                let share = shares.remove(&state.tag);
                if share.is_none() {
                    tracing::info!(
                        "virtio-fs {}: no directory given (--fs-slot {}=DIR): the slot stays empty",
                        state.tag,
                        state.tag
                    );
                }
                let setup = share.as_ref().and_then(|_| (fs.setup)());
                let args = FsArgs {
                    mem: mem.clone(),
                    parts,
                    share,
                    limits: FsLimits::default(),
                    setup,
                };
                (
                    VirtioDevice::Fs(Fs::restore(args, state).map_err(DeviceSetupError::from)?),
                    None,
                )
            }
            VirtioState::Rng(state) => (
                VirtioDevice::Rng(
                    Rng::restore(
                        RngArgs {
                            mem: mem.clone(),
                            parts,
                        },
                        state,
                    )
                    .map_err(DeviceSetupError::from)?,
                ),
                None,
            ),
        };
        attached.push(insert(mmio, device, s.base, s.gsi, path)?);
    }
    if let Some(unknown) = slots
        .keys()
        .chain(slot_files.keys())
        .find(|k| !used.contains(k))
    {
        return Err(DeviceSetupError::UnknownSlot(unknown.clone()).into());
    }
    // Attached: the sockets are the VM's now (removed when it ends).
    bound.0.clear();
    Ok(attached)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_slots_fit_the_window_and_gsis() {
        let last = VIRTIO_MMIO_START + u64::from(LAST_GSI - FIRST_GSI) * VIRTIO_MMIO_SLOT_SIZE;
        assert!(last + MMIO_WINDOW_SIZE <= MMIO_GAP_END);
        assert_eq!(
            kernel_cmdline_fragment(VIRTIO_MMIO_START, MMIO_WINDOW_SIZE, FIRST_GSI),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }
}
