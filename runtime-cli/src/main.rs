//! `kata-snap`: boot and control micro-VMs.

mod boot_cmd;
#[cfg(feature = "builtin-guests")]
mod demo;
mod oci;
mod pool;
mod restore_cmd;
mod vm_cmd;

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

/// kata-snap: a micro-VMM that gives containers the isolation of a VM at close to the start-up
/// speed of a plain container.
#[derive(Debug, Parser)]
///
/// As a container runtime it takes runc's commands and flags (`create`, `start`, `run`, `state`,
/// `kill`, `delete`, `list`, ...): each container runs in its own VM, restored from a template.
#[command(
    name = "kata-snap",
    disable_version_flag = true,
    subcommand_required = false,
    arg_required_else_help = true,
    max_term_width = 100
)]
struct Cli {
    /// Print the version (in the three lines runc prints: version, commit, spec).
    #[arg(long, short = 'v')]
    version: bool,

    #[command(flatten)]
    oci: oci::GlobalOpts,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,

    /// Seccomp filters on the VMM's threads, always `kill` (a syscall outside a thread's
    /// allow-list kills the VMM) in a release build. `log` (allowed, and logged to the kernel
    /// log) and `off` are for tests and debugging: only a debug build accepts them, from this
    /// flag or `$KATA_SNAP_SECCOMP`.
    #[arg(long, global = true, value_enum, hide = true)]
    seccomp: Option<SeccompArg>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SeccompArg {
    Off,
    Log,
    Kill,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a kernel (ELF vmlinux, bzImage or a built-in test guest) and run it until it stops.
    ///
    /// The guest's serial console goes to stdout (or --serial-log), and stdin goes to the guest.
    /// Exit status: 0 when the guest resets or halts, 3 when it crashes (triple fault, KVM
    /// error), 4 when stopped through the control socket, 128+N on signal N, 1 on a VMM error.
    Boot(boot_cmd::BootArgs),
    /// Restore a VM from a snapshot and run it until it stops.
    ///
    /// The guest continues exactly where it was snapshotted, serial output included. Exit status
    /// as for `boot`.
    Restore(restore_cmd::RestoreArgs),
    /// Control a running VM through its control socket (--api-sock of `boot`).
    Vm(vm_cmd::VmArgs),
    /// Keep pre-started VMMs ready so that restores skip creating the VM (`start`, `status`,
    /// `stop`); `restore` uses a running pool by itself.
    Pool(pool::PoolArgs),
    /// Cold-boot the built-in test guest, snapshot it at READY, restore it in every mode and
    /// print a table of the timings: the quickest way to see kata-snap work on this host.
    #[cfg(feature = "builtin-guests")]
    Demo(demo::DemoArgs),
    /// Tell whether this host's KVM can run guests, and whether Linux guests boot at speed.
    Check,
    #[command(flatten)]
    Oci(oci::OciCommand),
}

/// No core dumps, from any kata-snap process: a VMM's core would hold its guest's memory (and a
/// supervisor's, the container's stdio), written wherever the host's core pattern says. The
/// limit is inherited by everything started from here (mkfs.erofs too).
fn no_core_dumps() {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one rlimit that lives across the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) } != 0 {
        eprintln!(
            "kata-snap: cannot turn core dumps off: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Marks every descriptor this process inherited above stdio close-on-exec, as runc closes them:
/// the daemons kata-snap starts (a container's or an exec's supervisor) must not keep a caller's
/// pipe open, or whoever waits for its end (a test harness, an engine) waits for the container.
/// Descriptors handed on on purpose (a supervisor's sync socket) are made inheritable again by
/// their owner.
fn inherited_fds_cloexec() {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC takes plain integers and only sets a flag.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return;
    }
    // Before Linux 5.11: one descriptor at a time.
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_SETFD on a descriptor number; one that is not open fails with EBADF.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// Makes sure fds 0-2 are open, so no file the VMM opens lands on them by accident.
fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor's flags.
        let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
        if !open {
            let flags = if fd == 0 {
                libc::O_RDONLY
            } else {
                libc::O_WRONLY
            };
            // SAFETY: a valid NUL-terminated path; the lowest free fd (this one) is taken.
            unsafe { libc::open(c"/dev/null".as_ptr(), flags) };
        }
    }
}

/// The log: to `file` (the runtime's --log) or stderr; `runc_format` gives runc's logrus lines
/// (the OCI commands, which engines and runc's users parse), else tracing's own.
fn init_logging(
    level: &str,
    file: Option<&std::path::Path>,
    runc_format: Option<oci::log::LogFormat>,
) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let file = file.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match (file, runc_format) {
        // The runtime's --log: the VMM's log goes there with the errors, off the container's
        // stderr.
        (Some(f), Some(format)) => builder
            .with_writer(std::sync::Mutex::new(f))
            .event_format(oci::log::RuncFormat(format))
            .init(),
        (Some(f), None) => builder
            .with_writer(std::sync::Mutex::new(f))
            .with_ansi(false)
            .init(),
        (None, Some(format)) => builder
            .with_writer(std::io::stderr)
            .event_format(oci::log::RuncFormat(format))
            .init(),
        (None, None) => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .without_time()
            .init(),
    }
}

/// `--version` in the shape go-runc and runc's own tests parse (`runc version X` / `commit: Y` /
/// `spec: Z`), then kata-snap's own line.
fn print_version() {
    let v = env!("CARGO_PKG_VERSION");
    println!("runc version {v}");
    println!(
        "commit: {}",
        option_env!("KATA_SNAP_COMMIT").unwrap_or(concat!("kata-snap-", env!("CARGO_PKG_VERSION")))
    );
    println!("spec: {}", oci::state::OCI_VERSION);
    println!("kata-snap: {v} (runc's command line; each container runs in its own VM)");
}

/// Sets what a write to a closed pipe does. Commands that only print (state, list, `--version`,
/// help...) die of SIGPIPE as any Unix tool does (`kata-snap list | head -1`), instead of the
/// panic Rust's println! gives on EPIPE; commands that hold sockets, children or a VM ignore it
/// and see EPIPE on the one write that failed.
fn set_sigpipe(die: bool) {
    let handler = if die { libc::SIG_DFL } else { libc::SIG_IGN };
    // SAFETY: SIG_DFL and SIG_IGN install no handler code.
    unsafe { libc::signal(libc::SIGPIPE, handler) };
}

/// Help in the shape of runc's (urfave/cli: `NAME:` then `BIN - what it does`), which runc's users
/// and tests read, under the name this binary was invoked by (`runc` when installed as one).
fn parse_command_line() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let invoked = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "kata-snap".into());
    let mut cmd = Cli::command().bin_name(&invoked).help_template(format!(
        "NAME:\n   {invoked} - Open Container Initiative runtime (kata-snap: each container in its \
         own VM)\n\nUSAGE:\n   {{usage}}\n\nDESCRIPTION:\n{{about-with-newline}}\n{{all-args}}{{after-help}}"
    ));
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    for name in names {
        let template = format!(
            "NAME:\n   {invoked} {name} - {{about-with-newline}}\nUSAGE:\n   {{usage}}\n\n{{all-args}}{{after-help}}"
        );
        cmd = cmd.mut_subcommand(name, |c| c.help_template(template));
    }
    let matches = cmd.try_get_matches().unwrap_or_else(|e| {
        // runc (urfave/cli) answers help for a command it does not know with this line.
        if e.kind() == clap::error::ErrorKind::InvalidSubcommand
            && let Some(clap::error::ContextValue::String(name)) =
                e.get(clap::error::ContextKind::InvalidSubcommand)
            && std::env::args().any(|a| a == "-h" || a == "--help")
        {
            eprintln!("No help topic for '{name}'");
            std::process::exit(3);
        }
        e.exit()
    });
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    vmm::seccomp::prepare_process();
    ensure_std_fds();
    inherited_fds_cloexec();
    no_core_dumps();
    set_sigpipe(true);
    let cli = parse_command_line();
    if cli.version {
        print_version();
        return ExitCode::SUCCESS;
    }
    let Some(command) = cli.command else {
        eprintln!("kata-snap: no command given (see kata-snap --help)");
        return ExitCode::from(1);
    };
    if let Command::Oci(c) = &command
        && let Some(keep) = c.keeps_inherited_fds()
    {
        // Nothing of this process owns a descriptor yet.
        oci::jail::close_inherited_fds(&keep);
    }
    set_sigpipe(match &command {
        Command::Check => true,
        Command::Oci(c) => c.only_prints(),
        _ => false,
    });
    // The demo draws a progress display, and the runtime's commands share the container's
    // stderr: keep per-VM info logs out of them unless asked for.
    let level = match &command {
        _ if cli.oci.debug => "debug",
        #[cfg(feature = "builtin-guests")]
        Command::Demo(_) if cli.log_level == "info" => "warn",
        Command::Oci(_) if cli.log_level == "info" => "warn",
        _ => cli.log_level.as_str(),
    };
    oci::log::init(cli.oci.log.clone(), cli.oci.log_format);
    let runc_format = matches!(command, Command::Oci(_)).then_some(cli.oci.log_format);
    init_logging(level, cli.oci.log.as_deref(), runc_format);
    let env = std::env::var_os("KATA_SNAP_SECCOMP");
    let seccomp = match seccomp_mode(cli.seccomp, env.as_deref(), cfg!(debug_assertions)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("kata-snap: error: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match command {
        Command::Oci(cmd) => {
            return ExitCode::from(
                oci::run(cmd, &cli.oci, seccomp, process_start).clamp(0, 255) as u8,
            );
        }
        Command::Boot(args) => boot_cmd::run(args, process_start, seccomp),
        Command::Restore(args) => restore_cmd::run(args, process_start, seccomp),
        Command::Vm(args) => vm_cmd::run(args),
        Command::Pool(args) => pool::run(args, seccomp, cli.oci.root.clone()),
        #[cfg(feature = "builtin-guests")]
        Command::Demo(args) => demo::run(args, seccomp),
        Command::Check => {
            let check = vmm::host::check_host();
            println!("{}", check.summary);
            Ok(if check.kvm_accessible { 0 } else { 1 })
        }
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("kata-snap: error: {}", error_line(&e));
            ExitCode::from(1)
        }
    }
}

/// The seccomp mode: `--seccomp`, else `$KATA_SNAP_SECCOMP`, else `kill`, in a debug build
/// (tests turn filters off or to `log` this way). A release build reads no environment variable
/// for it and refuses anything but `kill`: nothing in a container engine's environment, and no
/// flag, turns the filters off in production.
fn seccomp_mode(
    flag: Option<SeccompArg>,
    env: Option<&std::ffi::OsStr>,
    debug_build: bool,
) -> Result<vmm::seccomp::SeccompMode, String> {
    use vmm::seccomp::SeccompMode;
    let from_env = || -> Result<Option<SeccompArg>, String> {
        let Some(v) = env.filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        match v.to_str() {
            Some("off") => Ok(Some(SeccompArg::Off)),
            Some("log") => Ok(Some(SeccompArg::Log)),
            Some("kill") => Ok(Some(SeccompArg::Kill)),
            _ => Err(format!(
                "KATA_SNAP_SECCOMP={}: expected off, log or kill",
                v.to_string_lossy()
            )),
        }
    };
    let arg = match (flag, debug_build) {
        (Some(a), true) => a,
        (None, true) => from_env()?.unwrap_or(SeccompArg::Kill),
        (None | Some(SeccompArg::Kill), false) => SeccompArg::Kill,
        (Some(a), false) => {
            return Err(format!(
                "--seccomp {}: only a debug build (tests) runs without the seccomp filters",
                if matches!(a, SeccompArg::Off) {
                    "off"
                } else {
                    "log"
                }
            ));
        }
    };
    Ok(match arg {
        SeccompArg::Off => SeccompMode::Off,
        SeccompArg::Log => SeccompMode::Log,
        SeccompArg::Kill => SeccompMode::Kill,
    })
}

/// The error and its causes on one line, each cause once: library errors often name their cause
/// in their own message as well as exposing it as their source.
pub(crate) fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open kernel /k: {0}")]
    struct Open(#[source] std::io::Error);

    #[test]
    fn test_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// A release build ignores `KATA_SNAP_SECCOMP` and refuses `--seccomp off|log`; a debug
    /// build (the tests) takes the flag, then the variable.
    #[test]
    fn test_seccomp_mode_release_ignores_env_and_refuses_off() {
        use vmm::seccomp::SeccompMode;
        let off = Some(std::ffi::OsStr::new("off"));
        assert_eq!(seccomp_mode(None, off, false), Ok(SeccompMode::Kill));
        assert_eq!(
            seccomp_mode(None, Some(std::ffi::OsStr::new("log")), false),
            Ok(SeccompMode::Kill)
        );
        assert_eq!(
            seccomp_mode(Some(SeccompArg::Kill), off, false),
            Ok(SeccompMode::Kill)
        );
        for a in [SeccompArg::Off, SeccompArg::Log] {
            let e = seccomp_mode(Some(a), None, false).unwrap_err();
            assert!(e.contains("only a debug build"), "{e}");
        }
        // Debug builds: the flag wins, then the variable, then kill.
        assert_eq!(seccomp_mode(None, off, true), Ok(SeccompMode::Off));
        assert_eq!(
            seccomp_mode(Some(SeccompArg::Log), off, true),
            Ok(SeccompMode::Log)
        );
        assert_eq!(seccomp_mode(None, None, true), Ok(SeccompMode::Kill));
        assert!(seccomp_mode(None, Some(std::ffi::OsStr::new("nope")), true).is_err());
    }

    #[test]
    fn test_error_line_names_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(libc::EISDIR);
        let e = anyhow::Error::new(Open(io)).context("booting");
        let line = error_line(&e);
        assert_eq!(line.matches("Is a directory").count(), 1, "{line}");
        assert!(
            line.starts_with("booting: cannot open kernel /k: "),
            "{line}"
        );
    }
}
