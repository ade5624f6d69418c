//! The supervisor's control socket: `start`, `pause` and `resume` from other `kata-snap`
//! commands. One JSON request line, one JSON reply line, then the connection closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The socket, relative to the container's directory.
pub const SOCKET: &str = "c.sock";
/// Longest request or reply line.
const MAX_LINE: u64 = 64 * 1024;

/// A request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Run the process.
    Start,
    /// Pause the VM.
    Pause,
    /// Resume the VM.
    Resume,
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Done.
    Ok,
    /// Refused or failed, with runc's wording where it has one.
    Err(String),
}

/// Binds the control socket (non-blocking, so the supervisor's loop never waits on it), mode
/// 0600: only its owner may connect (the state root around it is private too).
pub fn listen(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)
        .with_context(|| format!("cannot bind the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict the control socket {}", path.display()))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn read_line(conn: &mut UnixStream) -> Result<String> {
    let mut line = String::new();
    BufReader::new(conn.take(MAX_LINE))
        .read_line(&mut line)
        .context("cannot read from the control socket")?;
    if !line.ends_with('\n') {
        bail!("incomplete line on the control socket");
    }
    Ok(line)
}

/// Reads one request (the connection is blocking with a short timeout: a client that sends
/// nothing cannot stall the supervisor for long).
pub fn read_request(conn: &mut UnixStream) -> Result<Request> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    conn.set_write_timeout(Some(Duration::from_secs(1)))?;
    let line = read_line(conn)?;
    serde_json::from_str(&line).context("bad control request")
}

/// Writes one reply.
pub fn write_reply(conn: &mut UnixStream, reply: &Reply) -> Result<()> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    conn.write_all(&line)?;
    Ok(())
}

/// Connects to the socket `name` in `dir` through an `O_PATH` descriptor of the socket itself
/// (opened without following a symbolic link, checked to be a socket), so a deep state root does
/// not run into the 107-byte limit of socket paths, and a jailed supervisor, which owns the
/// container's directory, cannot point root's connection elsewhere with a symbolic link.
pub fn connect_in(dir: &Path, name: &str) -> Result<UnixStream> {
    use nix::fcntl::OFlag;
    let dirfd = nix::fcntl::open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .with_context(|| format!("cannot open {}", dir.display()))?;
    let what = || dir.join(name).display().to_string();
    let sock = nix::fcntl::openat(
        &dirfd,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .with_context(|| format!("cannot connect to {}", what()))?;
    let st = nix::sys::stat::fstat(&sock).with_context(|| format!("cannot stat {}", what()))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        bail!("cannot connect to {}: not a socket", what());
    }
    let path = format!("/proc/self/fd/{}", sock.as_raw_fd());
    UnixStream::connect(&path).with_context(|| format!("cannot connect to {}", what()))
}

/// Sends `req` to the supervisor of the container in `dir` and waits up to `timeout` for its
/// reply.
pub fn call(dir: &Path, req: Request, timeout: Duration) -> Result<Reply> {
    let mut conn = connect_in(dir, SOCKET).with_context(|| {
        format!(
            "cannot reach the container's supervisor in {}",
            dir.display()
        )
    })?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(&req)?;
    line.push(b'\n');
    conn.write_all(&line)?;
    let reply = read_line(&mut conn)?;
    serde_json::from_str(&reply).context("bad reply from the container's supervisor")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_connect_in_reaches_a_socket_and_refuses_a_link_or_a_file_in_its_place() {
        let elsewhere = tempfile::tempdir().unwrap();
        let other = UnixListener::bind(elsewhere.path().join("other.sock")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let own = UnixListener::bind(dir.path().join("c.sock")).unwrap();
        connect_in(dir.path(), "c.sock").unwrap();
        assert!(own.accept().is_ok());
        // A symbolic link to another socket (planted by whoever owns the directory).
        std::os::unix::fs::symlink(
            elsewhere.path().join("other.sock"),
            dir.path().join("l.sock"),
        )
        .unwrap();
        assert!(connect_in(dir.path(), "l.sock").is_err());
        other.set_nonblocking(true).unwrap();
        assert!(other.accept().is_err(), "the link was followed");
        std::fs::write(dir.path().join("f.sock"), "").unwrap();
        let e = connect_in(dir.path(), "f.sock").unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
    }
}
