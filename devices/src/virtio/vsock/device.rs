use std::io::ErrorKind;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vm_memory::GuestMemoryMmap;

use super::VsockHandler;
use crate::virtio::VIRTIO_F_VERSION_1;
use crate::virtio::front::{Front, MmioDevice, Parts};
use crate::virtio::worker::HandoffTx;

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;

/// A virtio-vsock device: [`MmioDevice::transport`] on the MMIO bus, [`MmioDevice::event_source`]
/// on the loop.
pub type Vsock = MmioDevice<VsockHandler>;

/// Default cap on a vsock device's connections at once: guest- and host-initiated, pending ones
/// included. Each holds one host socket (fd).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// File descriptors a vsock device leaves to the rest of the VMM (control socket and its
/// connections, disks, vCPUs, eventfds): its cap is lowered to `RLIMIT_NOFILE` minus this.
pub const FD_RESERVE: u64 = 128;

/// Options of the vsock device (`--vsock CID,PATH`).
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's CID (3 or more).
    pub guest_cid: u64,
    /// The host's listening Unix socket; guest connections to port P go to `<path>_<P>`.
    pub uds_path: PathBuf,
    /// Most connections at once ([`DEFAULT_MAX_CONNECTIONS`]); lowered to leave [`FD_RESERVE`]
    /// fds under `RLIMIT_NOFILE` (see [`effective_max_connections`]).
    pub max_connections: usize,
}

/// The connection cap a device uses: `requested`, lowered to `nofile` (the soft
/// `RLIMIT_NOFILE`) minus [`FD_RESERVE`], so a guest that opens connections up to the cap still
/// leaves the VMM fds for its control socket.
pub fn effective_max_connections(requested: usize, nofile: u64) -> usize {
    let room = nofile.saturating_sub(FD_RESERVE);
    requested.min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// [`effective_max_connections`] under this process's current limit.
pub(super) fn max_connections_here(requested: usize) -> usize {
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    let cap = effective_max_connections(requested, nofile);
    if cap < requested {
        tracing::info!(
            "virtio-vsock: at most {cap} connections (RLIMIT_NOFILE {nofile} minus {FD_RESERVE} \
             kept in reserve)"
        );
    }
    cap
}

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0-2 are reserved.
    #[error("invalid guest CID {0} (must be 3 or more)")]
    InvalidCid(u64),
    /// Binding the listening socket failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An fd could not be created.
    #[error("virtio-vsock: {0}")]
    Io(#[from] std::io::Error),
}

/// Binds `path`, replacing a stale socket file nobody listens on any more; mode 0600, so only
/// its owner may reach the guest.
pub(super) fn bind(path: &Path) -> Result<UnixListener, VsockError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| VsockError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) if e.kind() == ErrorKind::AddrInUse && UnixStream::connect(path).is_err() => {
            std::fs::remove_file(path).map_err(err)?;
            UnixListener::bind(path).map_err(err)?
        }
        Err(e) => return Err(err(e)),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

pub(super) fn front(cid: u64) -> impl FnOnce(HandoffTx) -> Front {
    move |tx| {
        Front::new(
            virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK,
            1 << VIRTIO_F_VERSION_1,
            vec![QUEUE_SIZE; 3],
            cid.to_le_bytes().to_vec(),
            tx,
        )
    }
}

impl MmioDevice<VsockHandler> {
    /// A new vsock device over `mem`, listening on `config.uds_path`.
    pub fn new_vsock(config: VsockConfig, mem: GuestMemoryMmap) -> Result<Vsock, VsockError> {
        if config.guest_cid < 3 || config.guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(config.guest_cid));
        }
        let listener = bind(&config.uds_path)?;
        let handler = VsockHandler::new(
            config.guest_cid,
            config.uds_path,
            listener,
            max_connections_here(config.max_connections),
        )?;
        Ok(Vsock::new(
            front(config.guest_cid),
            handler,
            mem,
            Parts::new(3)?,
        ))
    }
}
