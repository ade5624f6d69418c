//! `kata-agent`: PID 1 of the kata-snap guest (or a test harness process).

use std::path::PathBuf;
use std::process::ExitCode;

use agent::config::{AgentConfig, Listen, Mode};
use clap::Parser;

/// kata-snap guest agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Where to listen: `vsock`, `vsock:PORT`, or `unix:PATH`. A Unix socket
    /// selects harness mode (new namespaces, no clock/entropy/port writes).
    #[arg(long, default_value = "vsock")]
    listen: Listen,
    /// Directory for per-container mount points.
    #[arg(long, default_value = "/run/kata-snap")]
    state_dir: PathBuf,
    /// Root of the cgroup v2 tree the containers' groups go in [default:
    /// /sys/fs/cgroup in the VM (cgroup2 mounted there if it is not); none
    /// in harness mode]. A plain directory works too (tests).
    #[arg(long, value_name = "DIR")]
    cgroup_root: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KATA_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let is_init = std::process::id() == 1;
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // As /init the kernel may pass stray command-line words: use defaults.
        Err(e) if is_init => {
            tracing::warn!(error = %e, "ignoring unparsable arguments");
            Cli::parse_from(["kata-agent"])
        }
        Err(e) => e.exit(),
    };
    let config = AgentConfig::new(cli.listen, cli.state_dir).with_cgroup_root(cli.cgroup_root);
    match run(&config) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("fatal: {e:#}");
            if config.mode == Mode::Vm && is_init {
                // PID 1 must not exit (the kernel would panic): power off.
                // SAFETY: reboot(2) takes a command constant and no pointers.
                unsafe { libc::reboot(libc::RB_POWER_OFF) };
            }
            ExitCode::FAILURE
        }
    }
}

fn run(config: &AgentConfig) -> anyhow::Result<ExitCode> {
    match config.mode {
        Mode::Harness => {
            if let agent::harness::Side::Outside(code) =
                agent::harness::enter_namespaces(&config.state_dir)?
            {
                return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
            }
        }
        Mode::Vm => {
            // VM mode mounts over /dev, /run...: never do that to a host.
            anyhow::ensure!(
                std::process::id() == 1,
                "VM mode (listening on vsock) only runs as PID 1 of the guest; \
                 use --listen unix:PATH for the test harness"
            );
            agent::init::mount_pseudo_filesystems()?
        }
    }
    // Before listening, so before the template's snapshot: free at restore.
    // In harness mode this is the harness's own network namespace.
    if let Err(e) = agent::network::bring_up_loopback() {
        tracing::warn!("cannot bring the loopback interface up: {e}");
    }
    agent::server::run(config)?;
    Ok(ExitCode::SUCCESS)
}
