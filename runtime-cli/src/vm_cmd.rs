//! `kata-snap vm`: requests to a running VM's control socket.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use vmm::control::{ControlRequest, send_request};

#[derive(Debug, Args)]
#[command(
    after_help = "The control socket speaks JSON lines: send {\"action\":\"pause\"} (or resume, \
status, stop) and read one JSON reply, e.g. {\"ok\":true,\"state\":\"paused\"}. See the README."
)]
pub struct VmArgs {
    /// What to do.
    #[arg(value_enum)]
    pub action: Action,
    /// The VM's control socket (the --api-sock it was booted with).
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    /// For `snapshot`: the snapshot directory to create (must not exist).
    #[arg(long, value_name = "DIR", required_if_eq("action", "snapshot"))]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Action {
    /// Pause every vCPU.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Print the VM's state, vCPUs, memory, uptime, exit counters and host check as JSON.
    Status,
    /// Stop the VM (its `boot` exits with status 4).
    Stop,
    /// Pause the VM, write a snapshot to --out, and resume it if it was running.
    Snapshot,
    /// End the start-up working set a `restore --record-workingset` is recording, and write it.
    FinishWorkingset,
}

pub fn run(args: VmArgs) -> Result<i32> {
    let req = match args.action {
        Action::Pause => ControlRequest::Pause,
        Action::Resume => ControlRequest::Resume,
        Action::Status => ControlRequest::Status,
        Action::Stop => ControlRequest::Stop,
        Action::FinishWorkingset => ControlRequest::FinishWorkingset,
        Action::Snapshot => {
            let out = args.out.as_ref().expect("clap requires --out");
            let out = std::path::absolute(out).unwrap_or_else(|_| out.clone());
            ControlRequest::Snapshot {
                path: out.display().to_string(),
            }
        }
    };
    let resp = send_request(&args.api_sock, req)?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_else(|| "request failed".into()));
    }
    if let Some(path) = resp.snapshot {
        println!("{path} ({:.1} ms)", resp.elapsed_ms.unwrap_or_default());
        return Ok(0);
    }
    match (resp.status, resp.state) {
        (Some(status), _) => println!("{}", serde_json::to_string_pretty(&status)?),
        (None, Some(state)) => println!("{}", serde_json::to_string(&state)?.trim_matches('"')),
        (None, None) => println!("ok"),
    }
    Ok(0)
}
