//! The host side of the protocol: a small synchronous client.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::frame::{FrameError, ProtocolError, read_message, write_message};
use crate::messages::{AgentMessage, ErrorKind, ExecRequest, HostMessage, RunRequest};
use crate::resources::{ContainerStats, Resources};
use crate::validate::ValidationError;
use crate::{MAX_STDIO_CHUNK, PROTOCOL_VERSION};

/// Errors of [`AgentClient`].
#[derive(Debug, Error)]
pub enum ClientError {
    /// The agent speaks another protocol version.
    #[error("agent speaks protocol version {agent}, this host speaks {ours}")]
    VersionMismatch {
        /// The agent's version.
        agent: u32,
        /// Ours.
        ours: u32,
    },
    /// The agent answered with an error.
    #[error("agent error ({kind:?}): {message}")]
    Agent {
        /// What failed.
        kind: ErrorKind,
        /// The agent's explanation.
        message: String,
    },
    /// The agent sent a valid message that makes no sense at this point.
    #[error("unexpected message from agent: {0}")]
    Unexpected(String),
    /// No message arrived in time.
    #[error("timed out waiting for the agent after {0:?}")]
    Timeout(Duration),
    /// Framing, decoding or validation failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Configuring the transport failed.
    #[error("transport I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// A transport the client can use: a byte stream that can be cloned (so stdin
/// can be written while output is read) and given a read timeout.
pub trait Connection: Read + Write + Send + Sized + 'static {
    /// A second handle on the same stream.
    fn try_clone_conn(&self) -> io::Result<Self>;
    /// Bounds how long one read may block.
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Connection for UnixStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

/// What a process run to completion produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOutcome {
    /// Pid the agent reported, if the process started.
    pub pid: Option<u32>,
    /// Everything written to stdout (or the terminal).
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
    /// Exit status (128 + signal for a signalled process).
    pub code: i32,
    /// An error the agent reported before the exit (e.g. command not found).
    pub error: Option<(ErrorKind, String)>,
    /// Every message received after `Run`, in order.
    pub events: Vec<AgentMessage>,
}

/// A connection to an agent that has completed the `Hello` exchange.
#[derive(Debug)]
pub struct AgentClient<S: Connection> {
    stream: S,
    timeout: Duration,
}

fn map_read(err: ProtocolError, timeout: Duration) -> ClientError {
    match err {
        ProtocolError::Frame(FrameError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            ClientError::Timeout(timeout)
        }
        ProtocolError::Invalid(ValidationError::VersionMismatch { peer, ours }) => {
            ClientError::VersionMismatch { agent: peer, ours }
        }
        other => ClientError::Protocol(other),
    }
}

impl<S: Connection> AgentClient<S> {
    /// Sends our `Hello`, reads the agent's and checks the versions match.
    /// Every later read fails with [`ClientError::Timeout`] after `timeout`.
    pub fn handshake(stream: S, timeout: Duration) -> Result<Self, ClientError> {
        stream.set_timeout(Some(timeout))?;
        let mut client = Self { stream, timeout };
        if let Err(send_err) = client.send(&HostMessage::Hello {
            version: PROTOCOL_VERSION,
        }) {
            // An agent that refuses us may say why and close before our Hello arrives: its
            // answer (a version mismatch, an error) explains more than our broken pipe.
            return Err(match client.recv() {
                Ok(AgentMessage::Error { kind, message }) => ClientError::Agent { kind, message },
                Ok(other) => ClientError::Unexpected(format!("{other:?} instead of Hello")),
                // What the agent sent was wrong in itself (version, size, encoding), or it closed.
                Err(e @ (ClientError::VersionMismatch { .. } | ClientError::Agent { .. })) => e,
                Err(ClientError::Protocol(p))
                    if !matches!(p, ProtocolError::Frame(FrameError::Io(_))) =>
                {
                    ClientError::Protocol(p)
                }
                Err(_) => send_err,
            });
        }
        match client.recv()? {
            AgentMessage::Hello { .. } => Ok(client),
            AgentMessage::Error { kind, message } => Err(ClientError::Agent { kind, message }),
            other => Err(ClientError::Unexpected(format!(
                "{other:?} instead of Hello"
            ))),
        }
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &HostMessage) -> Result<(), ClientError> {
        write_message(&mut self.stream, msg)?;
        Ok(())
    }

    /// Receives one message (blocking up to the timeout).
    pub fn recv(&mut self) -> Result<AgentMessage, ClientError> {
        read_message(&mut self.stream).map_err(|e| map_read(e, self.timeout))
    }

    /// A second handle for writing (e.g. stdin from another thread).
    pub fn try_clone_stream(&self) -> Result<S, ClientError> {
        Ok(self.stream.try_clone_conn()?)
    }

    fn expect_ack(&mut self) -> Result<(), ClientError> {
        match self.recv()? {
            AgentMessage::Ack => Ok(()),
            AgentMessage::Error { kind, message } => Err(ClientError::Agent { kind, message }),
            other => Err(ClientError::Unexpected(format!("{other:?} instead of Ack"))),
        }
    }

    /// Steps the guest clock to `realtime_ns` (nanoseconds since the epoch).
    pub fn sync_time(&mut self, realtime_ns: u64) -> Result<(), ClientError> {
        self.send(&HostMessage::SyncTime { realtime_ns })?;
        self.expect_ack()
    }

    /// Reseeds the guest's entropy pool with `bytes`.
    pub fn reseed(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.send(&HostMessage::Reseed { bytes })?;
        self.expect_ack()
    }

    /// Sends `Update` (runc's `update`) and waits for `Ack`. A refusal (no
    /// container, stopped, a memory limit above the guest's, a cgroup write
    /// that failed) is [`ClientError::Agent`]; the connection stays usable.
    pub fn update(&mut self, resources: Resources) -> Result<(), ClientError> {
        self.send(&HostMessage::Update(Box::new(resources)))?;
        self.expect_ack()
    }

    /// Sends `Stats` (runc's `events`) and returns the container's cgroup
    /// figures. A refusal is [`ClientError::Agent`], as for [`Self::update`].
    pub fn stats(&mut self) -> Result<ContainerStats, ClientError> {
        self.send(&HostMessage::Stats)?;
        match self.recv()? {
            AgentMessage::Stats(s) => Ok(*s),
            AgentMessage::Error { kind, message } => Err(ClientError::Agent { kind, message }),
            other => Err(ClientError::Unexpected(format!(
                "{other:?} instead of Stats"
            ))),
        }
    }

    /// Sends `Processes` (runc's `ps`) and returns the container's processes.
    pub fn processes(&mut self) -> Result<Vec<crate::ProcessEntry>, ClientError> {
        self.send(&HostMessage::Processes)?;
        match self.recv()? {
            AgentMessage::Processes(list) => Ok(list),
            AgentMessage::Error { kind, message } => Err(ClientError::Agent { kind, message }),
            other => Err(ClientError::Unexpected(format!(
                "{other:?} instead of Processes"
            ))),
        }
    }

    /// Sends `Run` and waits for `Started`. When the agent answers with an
    /// error (for instance, command not found), returns it as
    /// [`ClientError::Agent`]; an `Exited` message follows on the connection.
    pub fn start(&mut self, req: RunRequest) -> Result<u32, ClientError> {
        self.send(&HostMessage::Run(Box::new(req)))?;
        match self.recv()? {
            AgentMessage::Started { pid } => Ok(pid),
            AgentMessage::Error { kind, message } => Err(ClientError::Agent { kind, message }),
            other => Err(ClientError::Unexpected(format!(
                "{other:?} instead of Started"
            ))),
        }
    }

    /// Sends `Exec` (runc's `exec`: another process in the container a
    /// `Create` or `Run` made on another connection) and waits for
    /// `Started`. An `Error` answer is [`ClientError::Agent`]: with kind
    /// `NoContainer`, `ContainerStopped` or `InvalidRequest` (the id is in
    /// use) nothing follows and the connection may `exec` again; with an
    /// exec failure kind (`ExecNotFound`, `ExecPermissionDenied`,
    /// `ExecFailed`) an `Exited` message follows, as after [`Self::start`].
    pub fn exec(&mut self, req: ExecRequest) -> Result<u32, ClientError> {
        self.send(&HostMessage::Exec(Box::new(req)))?;
        match self.recv()? {
            AgentMessage::Started { pid } => Ok(pid),
            AgentMessage::Error { kind, message } => Err(ClientError::Agent { kind, message }),
            other => Err(ClientError::Unexpected(format!(
                "{other:?} instead of Started"
            ))),
        }
    }

    /// Sends `Create` and waits for `Created`: the process is set up (its
    /// executable found) and waits for [`Self::start_created`]. An `Error`
    /// answer (for instance, command not found) is [`ClientError::Agent`];
    /// the connection then has no process (no `Exited` follows) and may
    /// `create` again.
    pub fn create(&mut self, req: RunRequest) -> Result<u32, ClientError> {
        self.send(&HostMessage::Create(Box::new(req)))?;
        match self.recv()? {
            AgentMessage::Created { pid } => Ok(pid),
            AgentMessage::Error { kind, message } => Err(ClientError::Agent { kind, message }),
            other => Err(ClientError::Unexpected(format!(
                "{other:?} instead of Created"
            ))),
        }
    }

    /// Sends `Start` for the process [`Self::create`] prepared and waits for
    /// `Started`. An `Error` answer (the exec failed) is
    /// [`ClientError::Agent`]; an `Exited` message follows on the connection.
    /// If the created process was killed before (a `Signal`), its `Exited`
    /// may arrive first: that is [`ClientError::Unexpected`], and `Exited`
    /// is the last message.
    pub fn start_created(&mut self) -> Result<u32, ClientError> {
        self.send(&HostMessage::Start)?;
        match self.recv()? {
            AgentMessage::Started { pid } => Ok(pid),
            AgentMessage::Error { kind, message } => Err(ClientError::Agent { kind, message }),
            other => Err(ClientError::Unexpected(format!(
                "{other:?} instead of Started"
            ))),
        }
    }

    /// Runs a process to completion: sends `Run`, writes `stdin` from a second
    /// thread in chunks followed by `CloseStdin` (when `stdin` is `Some`), and
    /// collects every message until `Exited`. `deadline` bounds the whole run.
    pub fn run(
        &mut self,
        req: RunRequest,
        stdin: Option<Vec<u8>>,
        deadline: Duration,
    ) -> Result<RunOutcome, ClientError> {
        let end = Instant::now() + deadline;
        self.send(&HostMessage::Run(Box::new(req)))?;
        self.collect(stdin, end, deadline, RunOutcome::default())
    }

    /// Runs a process in the container to completion, as [`Self::run`] does
    /// for the init: sends `Exec`, then (once `Started` came) writes `stdin`
    /// and collects every message until `Exited`. A refusal that leaves no
    /// process (`NoContainer`, `ContainerStopped`, `InvalidRequest`,
    /// `Protocol`) is [`ClientError::Agent`]; an exec failure is in the
    /// outcome (`error`, then `code` 126 or 127).
    pub fn run_exec(
        &mut self,
        req: ExecRequest,
        stdin: Option<Vec<u8>>,
        deadline: Duration,
    ) -> Result<RunOutcome, ClientError> {
        let end = Instant::now() + deadline;
        self.send(&HostMessage::Exec(Box::new(req)))?;
        let mut out = RunOutcome::default();
        let first = self.recv()?;
        out.events.push(first.clone());
        match first {
            AgentMessage::Started { pid } => out.pid = Some(pid),
            AgentMessage::Error {
                kind:
                    kind @ (ErrorKind::ExecNotFound
                    | ErrorKind::ExecPermissionDenied
                    | ErrorKind::ExecFailed),
                message,
            } => {
                out.error = Some((kind, message));
                return self.collect(None, end, deadline, out);
            }
            AgentMessage::Error { kind, message } => {
                return Err(ClientError::Agent { kind, message });
            }
            other => {
                return Err(ClientError::Unexpected(format!(
                    "{other:?} instead of Started"
                )));
            }
        }
        self.collect(stdin, end, deadline, out)
    }

    /// Writes `stdin` (then `CloseStdin`) from a second thread when given,
    /// and adds every message to `out` until `Exited`.
    fn collect(
        &mut self,
        stdin: Option<Vec<u8>>,
        end: Instant,
        deadline: Duration,
        mut out: RunOutcome,
    ) -> Result<RunOutcome, ClientError> {
        let writer = match stdin {
            Some(data) => {
                let mut w = self.stream.try_clone_conn()?;
                Some(thread::spawn(move || -> Result<(), ProtocolError> {
                    for c in data.chunks(MAX_STDIO_CHUNK) {
                        write_message(&mut w, &HostMessage::Stdin(c.to_vec()))?;
                    }
                    write_message(&mut w, &HostMessage::CloseStdin)
                }))
            }
            None => None,
        };
        loop {
            if Instant::now() >= end {
                return Err(ClientError::Timeout(deadline));
            }
            let msg = self.recv()?;
            out.events.push(msg.clone());
            match msg {
                AgentMessage::Started { pid } => out.pid = Some(pid),
                AgentMessage::Stdout(b) => out.stdout.extend_from_slice(&b),
                AgentMessage::Stderr(b) => out.stderr.extend_from_slice(&b),
                AgentMessage::Error { kind, message } => {
                    if out.error.is_none() {
                        out.error = Some((kind, message));
                    }
                }
                AgentMessage::Exited { code } => {
                    out.code = code;
                    break;
                }
                other => {
                    return Err(ClientError::Unexpected(format!("{other:?} during a run")));
                }
            }
        }
        if let Some(w) = writer {
            // The process may exit without reading all of stdin; the agent then
            // closes the connection and the writer fails: that is not an error.
            let _ = w.join();
        }
        Ok(out)
    }
}
