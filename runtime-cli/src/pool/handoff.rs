//! What a client hands a pool shell with its request: descriptors, never paths. A shell may be
//! jailed (its own uid, a mount namespace with nothing of the host's), so whatever it must open
//! or bind for its client is opened or bound by the client and sent over `SCM_RIGHTS`: the
//! client's stdio, its taps, the vsock device's and the control socket's listening sockets
//! (bound at the client's paths), the serial log, each spare disk slot's file (read-only for a
//! read-only slot, locked by the shell) and, for a plain shell, the snapshot's files.
//!
//! The request names each descriptor's role after the three of stdio ([`Role`]); the shell
//! accepts at most [`MAX_FDS`], checks each one's type (`fstat`, and a listening Unix socket
//! for the two sockets), and refuses a request that names a path it was not given a
//! descriptor for. On any error every received descriptor is closed (they are owned).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::restore_cmd::{MAX_NET_SLOTS, OpenedTaps, RestoreArgs};

/// Most spare disk slots a request may hand over.
pub const MAX_DISK_SLOTS: usize = 8;
/// Most descriptors a request carries: stdio, taps, the two sockets, the serial log, disks, the
/// snapshot's three files.
pub const MAX_FDS: usize = 3 + MAX_NET_SLOTS + 3 + MAX_DISK_SLOTS + 3;

/// What one handed descriptor is (after stdio, in the order sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The tap of `--net-slot` number N (in `net_slot`'s order).
    Tap(usize),
    /// The vsock device's listening socket, bound at `--vsock`.
    VsockListener,
    /// The control socket, bound at `--api-sock`.
    ApiListener,
    /// `--serial-log`, opened for appending.
    SerialLog,
    /// The file of spare disk slot NAME.
    Disk(String),
    /// The snapshot's state file.
    SnapshotState,
    /// Its memory file.
    SnapshotMemory,
    /// Its working set.
    SnapshotWorkingset,
}

/// The descriptors a shell got for its client's paths (shared by clones of the arguments; each
/// use takes a duplicate).
#[derive(Debug, Clone, Default)]
pub struct Handed {
    /// The listening socket at `vsock`.
    pub vsock: Option<Arc<OwnedFd>>,
    /// The listening socket at `api_sock`.
    pub api: Option<Arc<OwnedFd>>,
    /// The serial log.
    pub serial_log: Option<Arc<OwnedFd>>,
    /// Spare disk slots' files by name.
    pub disks: Vec<(String, Arc<OwnedFd>)>,
    /// The snapshot's state, memory and working-set files.
    pub snapshot: Option<[Option<Arc<OwnedFd>>; 3]>,
}

fn dup(fd: &Arc<OwnedFd>) -> Result<OwnedFd> {
    fd.try_clone()
        .context("cannot duplicate a handed descriptor")
}

impl Handed {
    /// The vsock listener, when handed.
    pub fn vsock_listener(&self) -> Result<Option<UnixListener>> {
        self.vsock
            .as_ref()
            .map(|fd| dup(fd).map(UnixListener::from))
            .transpose()
    }

    /// The control socket's listener, when handed.
    pub fn api_listener(&self) -> Result<Option<UnixListener>> {
        self.api
            .as_ref()
            .map(|fd| dup(fd).map(UnixListener::from))
            .transpose()
    }

    /// The serial log, when handed.
    pub fn serial_log(&self) -> Result<Option<std::fs::File>> {
        self.serial_log
            .as_ref()
            .map(|fd| dup(fd).map(std::fs::File::from))
            .transpose()
    }

    /// The spare disk slots' files.
    pub fn disk_files(&self) -> Result<std::collections::HashMap<String, std::fs::File>> {
        self.disks
            .iter()
            .map(|(n, fd)| Ok((n.clone(), std::fs::File::from(dup(fd)?))))
            .collect()
    }

    /// The snapshot's files, when handed.
    pub fn snapshot_files(&self) -> Result<Option<snapshot::dir::SnapshotFiles>> {
        let Some([state, memory, ws]) = &self.snapshot else {
            return Ok(None);
        };
        let (Some(state), Some(memory)) = (state, memory) else {
            bail!("the snapshot's state and memory files were not handed over");
        };
        Ok(Some(snapshot::dir::SnapshotFiles {
            state: dup(state)?.into(),
            memory: dup(memory)?.into(),
            workingset: ws.as_ref().map(dup).transpose()?.map(Into::into),
        }))
    }
}

/// A socket the client bound for a shell: removed when the client is done with it.
#[derive(Debug)]
pub struct BoundSocket(PathBuf);

impl Drop for BoundSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What a client sends besides its stdio: the descriptors, their roles, the sockets it bound.
#[derive(Debug, Default)]
pub struct Outgoing {
    pub fds: Vec<OwnedFd>,
    pub roles: Vec<Role>,
    pub bound: Vec<BoundSocket>,
}

/// Binds a listening Unix socket at `path` for a shell (a stale socket nobody listens on is
/// replaced; mode 0600), given to `owner` when set (the jail uid of the container's supervisor,
/// which connects to it once jailed).
fn bind_for_shell(path: &Path, owner: Option<u32>) -> Result<(OwnedFd, BoundSocket)> {
    use std::os::unix::fs::PermissionsExt;
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e)
            if e.kind() == std::io::ErrorKind::AddrInUse
                && std::os::unix::net::UnixStream::connect(path).is_err() =>
        {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot replace {}", path.display()))?;
            UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?
        }
        Err(e) => return Err(e).with_context(|| format!("cannot bind {}", path.display())),
    };
    let guard = BoundSocket(path.to_path_buf());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(uid) = owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(uid))
            .with_context(|| format!("cannot give {} to uid {uid}", path.display()))?;
    }
    Ok((listener.into(), guard))
}

/// Opens and binds what `args` name for a shell: vsock and control sockets (given to
/// `socket_owner` when set), serial log, spare disk slots (`slots`: each slot's read-only flag
/// from the snapshot), and with `snapshot` the snapshot's files.
pub fn open_for_shell(
    args: &RestoreArgs,
    slots: &[(String, bool)],
    snapshot: bool,
    socket_owner: Option<u32>,
) -> Result<Outgoing> {
    let mut out = Outgoing::default();
    if args.disk_slot.len() > MAX_DISK_SLOTS {
        bail!("at most {MAX_DISK_SLOTS} --disk-slot through a pool");
    }
    if let Some(p) = &args.vsock {
        let (fd, guard) = bind_for_shell(p, socket_owner)?;
        out.fds.push(fd);
        out.roles.push(Role::VsockListener);
        out.bound.push(guard);
    }
    if let Some(p) = &args.api_sock {
        let (fd, guard) = bind_for_shell(p, socket_owner)?;
        out.fds.push(fd);
        out.roles.push(Role::ApiListener);
        out.bound.push(guard);
    }
    if let Some(p) = &args.serial_log {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("cannot open serial log {}", p.display()))?;
        out.fds.push(f.into());
        out.roles.push(Role::SerialLog);
    }
    for (name, path) in &args.disk_slot {
        let Some((_, read_only)) = slots.iter().find(|(n, _)| n == name) else {
            bail!("the snapshot has no spare disk slot named {name:?}");
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .with_context(|| format!("cannot open disk image {}", path.display()))?;
        out.fds.push(f.into());
        out.roles.push(Role::Disk(name.clone()));
    }
    if snapshot {
        let files = snapshot::dir::SnapshotFiles::open(&args.snapshot)?;
        out.fds.push(files.state.into());
        out.roles.push(Role::SnapshotState);
        out.fds.push(files.memory.into());
        out.roles.push(Role::SnapshotMemory);
        if let Some(w) = files.workingset {
            out.fds.push(w.into());
            out.roles.push(Role::SnapshotWorkingset);
        }
    }
    Ok(out)
}

fn file_type(fd: &OwnedFd) -> Result<libc::mode_t> {
    Ok(nix::sys::stat::fstat(fd.as_fd())
        .context("fstat of a handed descriptor")?
        .st_mode
        & libc::S_IFMT)
}

/// Checks `fd` is a listening Unix stream socket.
fn check_listener(fd: &OwnedFd, what: &str) -> Result<()> {
    use nix::sys::socket::{getsockopt, sockopt};
    let ok = file_type(fd)? == libc::S_IFSOCK
        && getsockopt(fd, sockopt::AcceptConn).unwrap_or(false)
        && getsockopt(fd, sockopt::SockType).ok() == Some(nix::sys::socket::SockType::Stream);
    // SO_DOMAIN: AF_UNIX only (nix has no sockopt for it).
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one c_int and its length, both live across the call.
    let got = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if !ok || got != 0 || domain != libc::AF_UNIX {
        bail!("the handed {what} is not a listening Unix socket");
    }
    Ok(())
}

/// The shell's side: takes the descriptors after stdio by their `roles` into `args` (each
/// checked to be what its role says), and refuses arguments that name a path no descriptor was
/// handed for (the shell never opens its client's paths) or a working-set recording (which
/// writes by path). `snapshot_needed`: a plain shell, which loads the client's snapshot.
pub fn receive(
    args: &mut RestoreArgs,
    fds: Vec<OwnedFd>,
    roles: &[Role],
    snapshot_needed: bool,
) -> Result<()> {
    if fds.len() != roles.len() {
        bail!(
            "the pool request names {} descriptors but carries {}",
            roles.len(),
            fds.len()
        );
    }
    let mut h = Handed::default();
    let mut taps: Vec<Option<Arc<OwnedFd>>> = vec![None; args.net_slot.len()];
    let mut snap: [Option<Arc<OwnedFd>>; 3] = [None, None, None];
    for (fd, role) in fds.into_iter().zip(roles) {
        let ty = file_type(&fd)?;
        let fd = Arc::new(fd);
        let dup_role = || anyhow::anyhow!("the pool request hands {role:?} twice");
        match role {
            Role::Tap(i) => {
                if ty != libc::S_IFCHR {
                    bail!("the handed tap {i} is not a character device");
                }
                let slot = taps
                    .get_mut(*i)
                    .ok_or_else(|| anyhow::anyhow!("tap {i} has no --net-slot"))?;
                if slot.replace(fd).is_some() {
                    return Err(dup_role());
                }
            }
            Role::VsockListener | Role::ApiListener => {
                check_listener(
                    &fd,
                    if *role == Role::ApiListener {
                        "control socket"
                    } else {
                        "vsock socket"
                    },
                )?;
                let place = if *role == Role::ApiListener {
                    &mut h.api
                } else {
                    &mut h.vsock
                };
                if place.replace(fd).is_some() {
                    return Err(dup_role());
                }
            }
            Role::SerialLog => {
                // SAFETY: F_GETFL on a descriptor this process owns.
                let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
                if ty != libc::S_IFREG || fl < 0 || fl & libc::O_ACCMODE == libc::O_RDONLY {
                    bail!("the handed serial log is not a regular file open for writing");
                }
                if h.serial_log.replace(fd).is_some() {
                    return Err(dup_role());
                }
            }
            Role::Disk(name) => {
                if ty != libc::S_IFREG && ty != libc::S_IFBLK {
                    bail!("the handed disk {name} is not a regular file or a block device");
                }
                if h.disks.iter().any(|(n, _)| n == name) {
                    return Err(dup_role());
                }
                h.disks.push((name.clone(), fd));
            }
            Role::SnapshotState | Role::SnapshotMemory | Role::SnapshotWorkingset => {
                if ty != libc::S_IFREG {
                    bail!("the handed snapshot file ({role:?}) is not a regular file");
                }
                let i = match role {
                    Role::SnapshotState => 0,
                    Role::SnapshotMemory => 1,
                    _ => 2,
                };
                if snap[i].replace(fd).is_some() {
                    return Err(dup_role());
                }
            }
        }
    }
    if taps.iter().any(Option::is_none) {
        bail!("the pool request must carry a tap per --net-slot");
    }
    args.net_taps = OpenedTaps(taps.into_iter().flatten().collect());
    let missing =
        |what: &str| anyhow::anyhow!("the pool request names {what} without its descriptor");
    if args.vsock.is_some() != h.vsock.is_some() {
        return Err(missing("--vsock"));
    }
    if args.api_sock.is_some() != h.api.is_some() {
        return Err(missing("--api-sock"));
    }
    if args.serial_log.is_some() != h.serial_log.is_some() {
        return Err(missing("--serial-log"));
    }
    if args.disk_slot.len() != h.disks.len()
        || args
            .disk_slot
            .iter()
            .any(|(n, _)| !h.disks.iter().any(|(m, _)| m == n))
    {
        return Err(missing("a --disk-slot"));
    }
    if args.record_workingset.is_some() {
        bail!("a restore that records its working set does not go through a pool");
    }
    if snapshot_needed {
        if snap[0].is_none() || snap[1].is_none() {
            return Err(missing("the snapshot"));
        }
        h.snapshot = Some(snap);
    } else if snap.iter().any(Option::is_some) {
        bail!("the pool request hands snapshot files to a shell that pre-loaded its template");
    }
    args.handed = h;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RestoreArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            a: RestoreArgs,
        }
        P::parse_from(["x", "--snapshot", "/"]).a
    }

    #[test]
    fn test_receive_takes_checked_descriptors_by_role() {
        let d = tempfile::tempdir().unwrap();
        let mut a = args();
        a.vsock = Some(d.path().join("v.sock"));
        a.serial_log = Some(d.path().join("log"));
        let l = UnixListener::bind(d.path().join("v.sock")).unwrap();
        let log = std::fs::File::create(d.path().join("log")).unwrap();
        receive(
            &mut a,
            vec![l.into(), log.into()],
            &[Role::VsockListener, Role::SerialLog],
            false,
        )
        .unwrap();
        assert!(a.handed.vsock_listener().unwrap().is_some());
        assert!(a.handed.serial_log().unwrap().is_some());
    }

    #[test]
    fn test_receive_refuses_wrong_types_missing_and_extra_descriptors() {
        let d = tempfile::tempdir().unwrap();
        let file = || -> OwnedFd { std::fs::File::create(d.path().join("f")).unwrap().into() };
        let err = |a: &mut RestoreArgs, fds: Vec<OwnedFd>, roles: &[Role], plain| {
            receive(a, fds, roles, plain).unwrap_err().to_string()
        };
        let mut a = args();
        a.vsock = Some(d.path().join("v.sock"));
        // A file where a listening socket belongs.
        let e = err(&mut a, vec![file()], &[Role::VsockListener], false);
        assert!(e.contains("not a listening Unix socket"), "{e}");
        // A socket that does not listen.
        let (s, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = err(&mut a, vec![s.into()], &[Role::VsockListener], false);
        assert!(e.contains("not a listening Unix socket"), "{e}");
        // A path without its descriptor: never opened by the shell.
        let e = err(&mut a, vec![], &[], false);
        assert!(e.contains("--vsock without its descriptor"), "{e}");
        // More descriptors than roles.
        let e = err(&mut args(), vec![file()], &[], false);
        assert!(e.contains("names 0 descriptors but carries 1"), "{e}");
        // A plain shell needs the snapshot's files; a pre-loaded one takes none.
        let e = err(&mut args(), vec![], &[], true);
        assert!(e.contains("the snapshot without its descriptor"), "{e}");
        let e = err(&mut args(), vec![file()], &[Role::SnapshotState], false);
        assert!(e.contains("pre-loaded"), "{e}");
        // A recording writes by path.
        let mut r = args();
        r.record_workingset = Some(d.path().join("ws"));
        let e = err(&mut r, vec![], &[], false);
        assert!(e.contains("records its working set"), "{e}");
        // A serial log open read-only.
        let mut l = args();
        l.serial_log = Some(d.path().join("f"));
        let ro: OwnedFd = std::fs::File::open(d.path().join("f")).unwrap().into();
        let e = err(&mut l, vec![ro], &[Role::SerialLog], false);
        assert!(e.contains("open for writing"), "{e}");
    }
}
