//! `kata-snap boot`.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use vmm::{KernelImage, SerialOutput, VmConfig, VmReport};

/// Command line for a Linux guest when none is given: serial console, reboot through the i8042
/// (which ends the VM), no PCI, no module loading.
pub const DEFAULT_LINUX_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodules i8042.noaux i8042.nomux i8042.dumbkbd";

#[derive(Debug, Args)]
pub struct BootArgs {
    /// The kernel: a path to an ELF vmlinux or a bzImage, or `builtin:NAME` for a built-in test
    /// guest (builtin:hello, builtin:ready, builtin:bootinfo, builtin:memtouch, builtin:compute,
    /// builtin:spin, builtin:triplefault, builtin:halt).
    #[arg(long, value_name = "PATH")]
    pub kernel: String,
    /// An initrd (initramfs) to load for the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line [default for a file kernel: the Linux serial-console line; for a
    /// built-in guest: empty].
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest memory in MiB (16 up to the host's RAM).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub mem_mib: u64,
    /// Number of vCPUs (1 to 32).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u8,
    /// Listen for control requests (pause, resume, status, stop) on this Unix socket; see
    /// `kata-snap vm --help`.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Append the guest's serial console to this file instead of writing it to stdout.
    #[arg(long, value_name = "PATH")]
    pub serial_log: Option<PathBuf>,
    /// Print timing (process start to first serial byte and to READY) when the VM stops.
    #[arg(long)]
    pub timing: bool,
}

/// Resolves `--kernel` into an image, checking a file is there and looks like a kernel.
pub fn kernel_image(spec: &str) -> Result<KernelImage> {
    if let Some(name) = spec.strip_prefix("builtin:") {
        let guest = test_guests::by_name(name).with_context(|| {
            let names: Vec<&str> = test_guests::ALL.iter().map(|g| g.name).collect();
            format!(
                "no built-in guest named {name:?} (there are: {})",
                names.join(", ")
            )
        })?;
        return Ok(KernelImage::Builtin {
            name: guest.name,
            bytes: guest.elf,
        });
    }
    let path = PathBuf::from(spec);
    vmm::vm::check_kernel_file(&path)?;
    Ok(KernelImage::Path(path))
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// One line per milestone, for `--timing` and the demo.
pub fn timing_lines(report: &VmReport) -> Vec<String> {
    let opt = |d: Option<Duration>| d.map(ms).unwrap_or_else(|| "-".into());
    vec![
        format!(
            "process start -> vCPUs running: {}",
            ms(report.vcpus_started_after)
        ),
        format!(
            "process start -> first serial byte: {}",
            opt(report.first_serial_byte_after)
        ),
        format!("process start -> READY: {}", opt(report.ready_after)),
        format!("guest run time: {}", ms(report.run_time)),
        format!(
            "exits: {} pio in, {} pio out, {} mmio, {} unhandled",
            report.exits.pio_in,
            report.exits.pio_out,
            report.exits.mmio_read + report.exits.mmio_write,
            report.exits.unhandled
        ),
    ]
}

pub fn run(args: BootArgs, process_start: Instant) -> Result<i32> {
    let kernel = kernel_image(&args.kernel)?;
    if args.vcpus == 0 {
        bail!("--vcpus must be at least 1");
    }
    let cmdline = args.cmdline.unwrap_or_else(|| match kernel {
        KernelImage::Path(_) => DEFAULT_LINUX_CMDLINE.to_string(),
        KernelImage::Builtin { .. } => String::new(),
    });
    let serial = match &args.serial_log {
        Some(path) => SerialOutput::File(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open serial log {}", path.display()))?,
        ),
        None => SerialOutput::Stdout,
    };
    let config = VmConfig {
        kernel,
        initrd: args.initrd,
        cmdline,
        mem_mib: args.mem_mib,
        vcpus: args.vcpus,
        api_sock: args.api_sock,
        serial,
        forward_stdin: true,
        process_start,
    };
    let report = vmm::vm::run(config)?;
    eprintln!("kata-snap: {}", report.reason);
    if args.timing {
        for line in timing_lines(&report) {
            eprintln!("kata-snap: {line}");
        }
    }
    Ok(report.reason.exit_code())
}
