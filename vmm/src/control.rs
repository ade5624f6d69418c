//! The control socket: JSON lines over a Unix stream socket.
//!
//! Each request is one JSON object on one line; each gets one JSON line back. Several requests may
//! be sent on one connection. Requests longer than [`MAX_REQUEST_LEN`] close the connection.
//!
//! ```text
//! → {"action":"pause"}            ← {"ok":true,"state":"paused"}
//! → {"action":"resume"}           ← {"ok":true,"state":"running"}
//! → {"action":"status"}           ← {"ok":true,"status":{"state":"running","vcpus":1,...}}
//! → {"action":"stop"}             ← {"ok":true,"state":"stopping"}
//! → {"action":"dance"}            ← {"ok":false,"error":"bad request: unknown variant ..."}
//! ```

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::host::HostCheck;
use crate::vcpu::ExitCounts;
use event_loop::{Completion, EventSource, Flow, Ops};

/// Longest request line accepted.
pub const MAX_REQUEST_LEN: usize = 4096;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Pause every vCPU.
    Pause,
    /// Resume every vCPU.
    Resume,
    /// Report the VM's state and counters.
    Status,
    /// Stop the VM.
    Stop,
    /// Pause, write a snapshot to `path` (absolute, must not exist), and resume if it was running.
    Snapshot {
        /// The snapshot directory to create.
        path: String,
    },
    /// End working-set recording now and write the file (a restore with
    /// `--record-workingset`).
    FinishWorkingset,
}

/// The VM's state as the control socket reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
    /// A stop is under way.
    Stopping,
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Run state.
    pub state: VmState,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Milliseconds since the VMM process started.
    pub uptime_ms: u64,
    /// Milliseconds from process start to the guest's READY, if it said so.
    pub ready_ms: Option<f64>,
    /// Milliseconds from process start to the guest's first serial byte.
    pub first_serial_byte_ms: Option<f64>,
    /// Bytes the guest wrote to its console.
    pub serial_bytes: u64,
    /// vCPU exits by kind, summed over vCPUs.
    pub exits: ExitCounts,
    /// The VMM's process id.
    pub pid: u32,
    /// What this host's KVM can do.
    pub host: HostCheck,
}

/// A reply to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlResponse {
    /// Whether the request was carried out.
    pub ok: bool,
    /// The VM's state afterwards (pause, resume, stop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    /// The status (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<VmStatus>>,
    /// Why the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where a snapshot was written (snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// How long it took in milliseconds (snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<f64>,
}

impl ControlResponse {
    fn empty(ok: bool) -> Self {
        Self {
            ok,
            state: None,
            status: None,
            error: None,
            snapshot: None,
            elapsed_ms: None,
        }
    }

    /// Success with the resulting state.
    pub fn state(state: VmState) -> Self {
        Self {
            state: Some(state),
            ..Self::empty(true)
        }
    }

    /// Success with a status.
    pub fn status(status: VmStatus) -> Self {
        Self {
            status: Some(Box::new(status)),
            ..Self::empty(true)
        }
    }

    /// Success of a snapshot.
    pub fn snapshot(path: String, elapsed_ms: f64) -> Self {
        Self {
            snapshot: Some(path),
            elapsed_ms: Some(elapsed_ms),
            ..Self::empty(true)
        }
    }

    /// Failure.
    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            error: Some(msg.into()),
            ..Self::empty(false)
        }
    }
}

/// What the VM does with control requests.
pub trait ControlHandler {
    /// Carries out one request.
    fn handle_control(&mut self, req: ControlRequest) -> ControlResponse;
}

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlSocketError {
    /// Another VMM is listening on the path.
    #[error("control socket {0} is in use by a running VMM")]
    InUse(PathBuf),
    /// Binding failed.
    #[error("cannot create control socket {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Binds the control socket, replacing a stale socket file left by a dead VMM.
///
/// The socket is bound and listening under a temporary name, then renamed to `path`: a client that
/// waits for the path to exist can connect at once.
pub fn bind(path: &Path) -> Result<UnixListener, ControlSocketError> {
    let bind_err = |source| ControlSocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ControlSocketError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(bind_err)?;
    // Only the owner may connect; set before the socket appears under its name.
    let private = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
    };
    if let Err(e) = private.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(bind_err(e));
    }
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

/// The listening socket as an event source: accepts connections and spawns a source for each.
#[derive(Debug)]
pub struct ControlListener {
    listener: UnixListener,
}

impl ControlListener {
    /// Wraps a bound, non-blocking listener.
    pub fn new(listener: UnixListener) -> Self {
        Self { listener }
    }
}

impl<C: ControlHandler + 'static> EventSource<C> for ControlListener {
    type Token = ();

    fn name(&self) -> &'static str {
        "control-listener"
    }

    fn start(&mut self, _ctx: &mut C, ops: &mut Ops<'_, C, ()>) {
        ops.poll_readable(self.listener.as_raw_fd(), (), true);
    }

    fn complete(&mut self, c: Completion<()>, _ctx: &mut C, ops: &mut Ops<'_, C, ()>) -> Flow {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => match stream.set_nonblocking(true) {
                    Ok(()) => ops.spawn(Box::new(ControlConnection::new(stream))),
                    Err(e) => tracing::warn!("control connection: {e}"),
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("control accept: {e}");
                    break;
                }
            }
        }
        if !c.more {
            ops.poll_readable(self.listener.as_raw_fd(), (), true);
        }
        Flow::Continue
    }
}

/// One client connection.
#[derive(Debug)]
struct ControlConnection {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl ControlConnection {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    fn reply(&mut self, resp: &ControlResponse) -> bool {
        let mut line = serde_json::to_vec(resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        line.push(b'\n');
        // Replies are small; a client that does not read them loses its connection.
        self.stream.write_all(&line).is_ok()
    }
}

impl<C: ControlHandler> EventSource<C> for ControlConnection {
    type Token = ();

    fn name(&self) -> &'static str {
        "control-connection"
    }

    fn start(&mut self, _ctx: &mut C, ops: &mut Ops<'_, C, ()>) {
        ops.poll_readable(self.stream.as_raw_fd(), (), false);
    }

    fn complete(&mut self, _c: Completion<()>, ctx: &mut C, ops: &mut Ops<'_, C, ()>) -> Flow {
        let mut chunk = [0u8; 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Flow::Remove,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Flow::Remove,
            }
        }
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let resp = match serde_json::from_str::<ControlRequest>(text) {
                Ok(req) => ctx.handle_control(req),
                Err(e) => ControlResponse::error(format!("bad request: {e}")),
            };
            if !self.reply(&resp) {
                return Flow::Remove;
            }
        }
        if self.buf.len() > MAX_REQUEST_LEN {
            self.reply(&ControlResponse::error(format!(
                "request longer than {MAX_REQUEST_LEN} bytes"
            )));
            return Flow::Remove;
        }
        ops.poll_readable(self.stream.as_raw_fd(), (), false);
        Flow::Continue
    }
}

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    /// No VMM listens on the path.
    #[error("cannot connect to {path}: {source} (is the VM running with --api-sock {path}?)", path = .path.display())]
    Connect {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The reply was not valid.
    #[error("invalid reply from the VMM: {0}")]
    BadReply(String),
}

/// Sends one request and reads the reply (5 s timeout each way).
pub fn send_request(
    path: &Path,
    req: ControlRequest,
) -> Result<ControlResponse, ControlClientError> {
    let stream = UnixStream::connect(path).map_err(|source| ControlClientError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let timeout = Some(Duration::from_secs(5));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let mut line =
        serde_json::to_vec(&req).map_err(|e| ControlClientError::BadReply(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .take(1 << 20)
        .read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(ControlClientError::BadReply(
            "connection closed without a reply".into(),
        ));
    }
    serde_json::from_str(&reply).map_err(|e| ControlClientError::BadReply(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_control_request_wire_format() {
        assert_eq!(
            serde_json::to_string(&ControlRequest::Pause).unwrap(),
            r#"{"action":"pause"}"#
        );
        assert_eq!(
            serde_json::from_str::<ControlRequest>(r#"{"action":"status"}"#).unwrap(),
            ControlRequest::Status
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"action":"dance"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&ControlResponse::state(VmState::Paused)).unwrap(),
            r#"{"ok":true,"state":"paused"}"#
        );
    }
}
