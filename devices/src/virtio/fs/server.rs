//! The FUSE server's own thread: it takes validated requests from the device's handler on the
//! event loop, runs them through `fuse-backend-rs`'s `Server` over the [`ConfinedFs`], and hands
//! back how many bytes each reply wrote. A slow host filesystem blocks this thread only; the
//! event loop never waits on it.
//!
//! ```text
//!   loop thread (FsHandler)                       fs thread (this module)
//!   pop + validate chain ── Msg::Request ──▶  Reader/Writer over the chain
//!                                              Server::handle_message
//!   add_used + interrupt ◀── Done + eventfd ──  (bytes written)
//! ```
//!
//! The thread runs the caller's set-up hook (the VMM installs its seccomp filter there) before it
//! takes any request, and ends when the handler drops its sending end.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::confined::{ConfinedFs, FsLimits};

/// Guest memory as the fs thread holds it.
pub type SharedMem = Arc<GuestMemoryMmap>;

/// Runs first on the fs thread, after its set-up and before any request (the VMM installs the
/// thread's seccomp filter here). An error stops the thread; the device then answers nothing.
pub type ThreadSetup = Box<dyn FnOnce() -> std::io::Result<()> + Send>;

/// A host directory shared with the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsShare {
    /// The directory (absolute; the server opens it by this path at each FUSE_INIT).
    pub dir: PathBuf,
    /// Refuse every change with `EROFS`.
    pub read_only: bool,
}

/// Errors starting a share's server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The share is not an absolute path to a directory.
    #[error("share {0}: not an absolute path to a directory")]
    NotADirectory(PathBuf),
    /// The share cannot be opened.
    #[error("share {path}: {source}")]
    Open {
        /// The share.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An `EventFd` or the thread could not be made.
    #[error("starting the fs server: {0}")]
    Start(std::io::Error),
}

/// One request for the thread.
pub(super) enum Msg {
    /// A validated chain of queue `queue`, taken in activation `epoch`.
    Request {
        epoch: u64,
        queue: usize,
        head: u16,
        chain: DescriptorChain<SharedMem>,
    },
    /// The device was reset: the FUSE session ends (every inode and handle is dropped).
    Reset,
}

/// One answered request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Done {
    pub epoch: u64,
    pub queue: usize,
    pub head: u16,
    pub len: u32,
}

/// The loop's handle on a share's fs thread.
pub struct ServerThread {
    tx: Option<mpsc::Sender<Msg>>,
    done_rx: mpsc::Receiver<Done>,
    done_evt: Arc<EventFd>,
    session: Arc<AtomicBool>,
    fs: Arc<ConfinedFs>,
    join: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ServerThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerThread")
            .field("session", &self.session.load(Ordering::SeqCst))
            .finish()
    }
}

/// Checks the share is an absolute path to a directory (opened `O_PATH | O_DIRECTORY`, no
/// blocking, no following of a final symlink).
fn check_share(share: &FsShare) -> Result<(), ServerError> {
    if !share.dir.is_absolute() {
        return Err(ServerError::NotADirectory(share.dir.clone()));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&share.dir)
        .map_err(|source| ServerError::Open {
            path: share.dir.clone(),
            source,
        })?;
    drop(f);
    Ok(())
}

impl ServerThread {
    /// Starts the server of `share` on its own thread named `fs-<tag>`.
    pub fn spawn(
        tag: &str,
        share: &FsShare,
        limits: FsLimits,
        setup: Option<ThreadSetup>,
    ) -> Result<Self, ServerError> {
        check_share(share)?;
        let cfg = Config {
            root_dir: share.dir.to_string_lossy().into_owned(),
            // The guest's page cache may keep data and attributes (one guest per share here).
            cache_policy: CachePolicy::Auto,
            xattr: false,
            writeback: false,
            do_import: true,
            no_readdir: false,
            inode_file_handles: false,
            killpriv_v2: false,
            seal_size: false,
            ..Default::default()
        };
        let inner = PassthroughFs::new(cfg).map_err(|source| ServerError::Open {
            path: share.dir.clone(),
            source,
        })?;
        let fs = Arc::new(ConfinedFs::new(inner, share.read_only, limits));
        let (tx, rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let done_evt = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(ServerError::Start)?);
        let session = Arc::new(AtomicBool::new(false));
        let thread = Worker {
            server: Server::new(fs.clone()),
            fs: fs.clone(),
            rx,
            done_tx,
            done_evt: done_evt.clone(),
            session: session.clone(),
        };
        let join = std::thread::Builder::new()
            .name(format!("fs-{tag}"))
            .spawn(move || {
                if let Some(setup) = setup
                    && let Err(e) = setup()
                {
                    tracing::error!("virtio-fs: the server thread's set-up failed: {e}");
                    return;
                }
                thread.run();
            })
            .map_err(ServerError::Start)?;
        Ok(Self {
            tx: Some(tx),
            done_rx,
            done_evt,
            session,
            fs,
            join: Some(join),
        })
    }

    /// Sends a message to the thread; false if the thread is gone.
    pub(super) fn send(&self, msg: Msg) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(msg).is_ok())
    }

    /// The next answered request, if any.
    pub(super) fn try_done(&self) -> Option<Done> {
        self.done_rx.try_recv().ok()
    }

    /// The `EventFd` the thread signals after each answer.
    pub fn done_fd(&self) -> std::os::fd::RawFd {
        self.done_evt.as_raw_fd()
    }

    /// Clears the done `EventFd`.
    pub(super) fn ack_done(&self) {
        let _ = self.done_evt.read();
    }

    /// Whether the guest has a FUSE session (FUSE_INIT answered, no DESTROY or reset since).
    pub fn session_active(&self) -> bool {
        self.session.load(Ordering::SeqCst)
    }

    /// The confined filesystem (counts for tests and metrics).
    pub fn fs(&self) -> &Arc<ConfinedFs> {
        &self.fs
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it has answered what it holds; a thread
        // blocked in a slow host filesystem is not waited for.
        self.tx = None;
        if let Some(j) = self.join.take()
            && j.is_finished()
        {
            let _ = j.join();
        }
    }
}

/// The thread's side.
struct Worker {
    server: Server<Arc<ConfinedFs>>,
    fs: Arc<ConfinedFs>,
    rx: mpsc::Receiver<Msg>,
    done_tx: mpsc::Sender<Done>,
    done_evt: Arc<EventFd>,
    session: Arc<AtomicBool>,
}

const OP_INIT: u32 = Opcode::Init as u32;
const OP_DESTROY: u32 = Opcode::Destroy as u32;

impl Worker {
    fn run(self) {
        while let Ok(msg) = self.rx.recv() {
            match msg {
                Msg::Request {
                    epoch,
                    queue,
                    head,
                    chain,
                } => {
                    let len = self.serve(chain);
                    if self
                        .done_tx
                        .send(Done {
                            epoch,
                            queue,
                            head,
                            len,
                        })
                        .is_err()
                    {
                        return;
                    }
                    if let Err(e) = self.done_evt.write(1) {
                        tracing::warn!("virtio-fs: cannot signal a completion: {e}");
                    }
                }
                Msg::Reset => {
                    if self.session.swap(false, Ordering::SeqCst) {
                        fuse_backend_rs::api::filesystem::FileSystem::destroy(&*self.fs);
                    }
                }
            }
        }
    }

    /// Answers one request; returns the bytes written into the chain (0: no reply).
    fn serve(&self, chain: DescriptorChain<SharedMem>) -> u32 {
        let mem = chain.memory();
        let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
            Ok(r) => r,
            Err(e) => {
                crate::guest_warn!("virtio-fs: unusable request buffers: {e}");
                return 0;
            }
        };
        let writer = match VirtioFsWriter::new(mem, chain.clone()) {
            Ok(w) => w,
            Err(e) => {
                crate::guest_warn!("virtio-fs: unusable reply buffers: {e}");
                return 0;
            }
        };
        let opcode = reader
            .clone()
            .read_obj::<InHeader>()
            .map(|h| h.opcode)
            .unwrap_or(0);
        // PassthroughFs sets the process umask to 0 when it (re)opens the share at FUSE_INIT
        // and DESTROY; put the VMM's back so files it creates keep their modes.
        let umask = (opcode == OP_INIT || opcode == OP_DESTROY).then(current_umask);
        let r = self
            .server
            .handle_message(reader, writer.into(), None, None);
        if let Some(m) = umask {
            // SAFETY: umask only sets the process's file mode mask.
            unsafe { libc::umask(m) };
        }
        match r {
            Ok(n) => {
                if opcode == OP_INIT {
                    self.session.store(true, Ordering::SeqCst);
                } else if opcode == OP_DESTROY {
                    self.session.store(false, Ordering::SeqCst);
                }
                u32::try_from(n).unwrap_or(0)
            }
            Err(e) => {
                tracing::debug!("virtio-fs: request {opcode} not answered: {e}");
                0
            }
        }
    }
}

fn current_umask() -> libc::mode_t {
    // SAFETY: umask only sets and returns the process's file mode mask; set back at once.
    let m = unsafe { libc::umask(0o022) };
    // SAFETY: as above.
    unsafe { libc::umask(m) };
    m
}
