//! `kata-snap boot`.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use vmm::seccomp::SeccompMode;
use vmm::vm::virtio::{DiskSpec, FsSpec, NetSpec, SpareSlot, VirtioSpecs, VsockHost, VsockSpec};

/// Default of `--vsock-max-conns`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = vmm::vm::virtio::DEFAULT_VSOCK_MAX_CONNECTIONS as u32;
use vmm::vm::{
    AfterSnapshot, BootSpec, Guest, HostResources, ShellConfig, SnapshotOnReady, VmShell,
    check_boot,
};
use vmm::{KernelImage, SerialOutput, VmReport};

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
    pub vcpus: u32,
    /// Listen for control requests (pause, resume, status, stop) on this Unix socket; see
    /// `kata-snap vm --help`.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Append the guest's serial console to this file instead of writing it to stdout.
    #[arg(long, value_name = "PATH")]
    pub serial_log: Option<PathBuf>,
    /// Attach a virtio-blk disk backed by PATH; `ro` makes it read-only, `id=NAME` sets the id the
    /// guest reads (default: the file name). Repeat for several disks. Disks, then vsock, then
    /// rng, then net devices take the virtio-mmio slots in order; each is announced as `virtio_mmio.device=` on the
    /// kernel command line.
    #[arg(long, value_name = "PATH[,ro][,id=NAME]", value_parser = parse_disk)]
    pub disk: Vec<DiskSpec>,
    /// Add an empty spare disk slot named NAME (repeatable): a disk whose backing file is chosen
    /// when a snapshot of this VM is restored (`restore --disk-slot NAME=PATH`). Until then it
    /// has no sectors. This is how a container's rootfs reaches a VM restored from a template.
    /// `ro` offers it read-only: restores then open their file read-only (a shared lock), so
    /// clones of the template can share one image.
    #[arg(long = "disk-slot", value_name = "NAME[,ro]", value_parser = parse_slot)]
    pub disk_slot: Vec<SpareSlot>,
    /// Attach virtio-vsock with guest CID `CID`; the host side is the Unix socket PATH: connect to
    /// it and send `CONNECT <port>\n` to reach a guest port; guest connections to port P arrive on
    /// `PATH_P`.
    #[arg(long, value_name = "CID,PATH", value_parser = parse_vsock)]
    pub vsock: Option<VsockSpec>,
    /// Most vsock connections at once, guest- and host-initiated (the excess is refused with
    /// RST); lowered to keep 128 fds in reserve under the open-file limit.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS, requires = "vsock", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub vsock_max_conns: u32,
    /// Attach virtio-rng (entropy from the host's getrandom).
    #[arg(long)]
    pub rng: bool,
    /// Attach a virtio-net device named ID (repeatable; after every other device). `tap=NAME`
    /// backs it with that tap (created if missing, which needs CAP_NET_ADMIN); without it the
    /// device is a slot: link down, frames dropped, until a restore attaches a tap
    /// (`restore --net-slot ID=TAP`). `mac=MAC` sets the guest's MAC (default: random,
    /// locally administered).
    #[arg(long, value_name = "ID[,tap=NAME][,mac=MAC]", value_parser = parse_net)]
    pub net: Vec<NetSpec>,
    /// Share the host directory DIR with the guest as virtio-fs tag TAG (repeatable; after every
    /// other device); the guest mounts it with `mount -t virtiofs TAG /dir`. `ro` refuses every
    /// change (EROFS). `--fs TAG` alone makes a slot: a device with no directory until a restore
    /// attaches one (`restore --fs-slot TAG=DIR[,ro]`). A snapshot is refused while the guest has
    /// a share mounted.
    #[arg(long, value_name = "TAG[=DIR[,ro]]", value_parser = parse_fs)]
    pub fs: Vec<FsSpec>,
    /// Take a snapshot into this directory (which must not exist) at the exact exit where the
    /// guest writes READY (1) to port 0xf4: how templates are made.
    #[arg(long, value_name = "DIR")]
    pub snapshot_on_ready: Option<PathBuf>,
    /// After --snapshot-on-ready: stop the VM (exit status 0) or let the guest continue.
    #[arg(
        long,
        value_enum,
        default_value = "exit",
        requires = "snapshot_on_ready"
    )]
    pub after_snapshot: AfterSnapshotArg,
    /// Print timing (process start to first serial byte and to READY) when the VM stops.
    #[arg(long)]
    pub timing: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AfterSnapshotArg {
    /// Stop the VM once the snapshot is written.
    Exit,
    /// Let the guest run on.
    Continue,
}

/// Parses `--disk PATH[,ro][,id=NAME]`.
pub fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    let mut parts = s.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("--disk needs a path")?;
    let mut spec = DiskSpec {
        path: PathBuf::from(path),
        read_only: false,
        id: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => spec.read_only = true,
            Some(("id", id)) if !id.is_empty() && id.len() <= 20 && id.is_ascii() => {
                spec.id = Some(id.to_string())
            }
            Some(("id", _)) => return Err("id=NAME must be 1 to 20 ASCII characters".into()),
            _ => return Err(format!("unknown disk option {opt:?} (known: ro, id=NAME)")),
        }
    }
    if !spec.path.is_file() {
        return Err(format!("{} is not a file", spec.path.display()));
    }
    Ok(spec)
}

/// Parses `--disk-slot NAME[,ro]`.
pub fn parse_slot(s: &str) -> Result<SpareSlot, String> {
    let (name, read_only) = match s.split_once(',') {
        None => (s, false),
        Some((name, "ro")) => (name, true),
        Some((_, opt)) => return Err(format!("unknown disk slot option {opt:?} (known: ro)")),
    };
    if name.is_empty() || name.len() > 20 || !name.is_ascii() {
        return Err("the slot name must be 1 to 20 ASCII characters".into());
    }
    Ok(SpareSlot {
        name: name.to_string(),
        read_only,
    })
}

/// Parses `--vsock CID,PATH`.
pub fn parse_vsock(s: &str) -> Result<VsockSpec, String> {
    let (cid, path) = s.split_once(',').ok_or("expected CID,PATH")?;
    let cid: u64 = cid
        .parse()
        .map_err(|_| format!("CID {cid:?} is not a number"))?;
    if !(3..=u64::from(u32::MAX)).contains(&cid) {
        return Err(format!("CID {cid} must be 3 or more (0-2 are reserved)"));
    }
    if path.is_empty() {
        return Err("--vsock needs a socket path".into());
    }
    Ok(VsockSpec {
        cid,
        host: VsockHost::new(PathBuf::from(path)),
    })
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff` (unicast).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s} is a multicast address"));
    }
    Ok(mac)
}

/// Parses a virtio-fs share `TAG=DIR[,ro]` (`dir_required`) or, for boot, also a slot `TAG`.
pub fn parse_fs_share(s: &str, dir_required: bool) -> Result<FsSpec, String> {
    let (tag, rest) = match s.split_once('=') {
        Some((t, r)) => (t, Some(r)),
        None if dir_required => return Err("expected TAG=DIR[,ro]".into()),
        None => (s, None),
    };
    vmm::vm::virtio::check_fs_tag(tag).map_err(|e| e.to_string())?;
    let share = match rest {
        None => None,
        Some(r) => {
            let (dir, read_only) = match r.rsplit_once(',') {
                Some((d, "ro")) => (d, true),
                Some((d, "rw")) => (d, false),
                _ => (r, false),
            };
            let dir = PathBuf::from(dir);
            if !dir.is_absolute() {
                return Err(format!(
                    "{}: the shared directory must be an absolute path",
                    dir.display()
                ));
            }
            if !dir.is_dir() {
                return Err(format!("{} is not a directory", dir.display()));
            }
            Some(vmm::vm::virtio::FsShare { dir, read_only })
        }
    };
    Ok(FsSpec {
        tag: tag.to_string(),
        share,
    })
}

fn parse_fs(s: &str) -> Result<FsSpec, String> {
    parse_fs_share(s, false)
}

/// Parses `--net ID[,tap=NAME][,mac=MAC]`.
pub fn parse_net(s: &str) -> Result<NetSpec, String> {
    let mut parts = s.split(',');
    let id = parts.next().unwrap_or_default();
    if id.is_empty() || id.len() > 20 || !id.is_ascii() || id.contains('=') {
        return Err("the net device id must be 1 to 20 ASCII characters, no '='".into());
    }
    let mut spec = NetSpec {
        id: id.to_string(),
        tap: None,
        mac: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            Some(("tap", name)) if !name.is_empty() && name.len() < 16 => {
                spec.tap = Some(name.to_string())
            }
            Some(("tap", _)) => return Err("tap=NAME must be 1 to 15 bytes".into()),
            Some(("mac", mac)) => spec.mac = Some(parse_mac(mac)?),
            _ => {
                return Err(format!(
                    "unknown net option {opt:?} (known: tap=NAME, mac=MAC)"
                ));
            }
        }
    }
    Ok(spec)
}

/// Resolves `--kernel` into an image, checking a file is there and looks like a kernel.
pub fn kernel_image(spec: &str) -> Result<KernelImage> {
    #[cfg(not(feature = "builtin-guests"))]
    if spec.starts_with("builtin:") {
        bail!("this kata-snap was built without the built-in test guests (feature builtin-guests)");
    }
    #[cfg(feature = "builtin-guests")]
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

/// `--serial-log PATH` (appended to) or stdout.
pub fn serial_output(path: Option<&PathBuf>) -> Result<SerialOutput> {
    serial_output_capped(path, None)
}

/// As [`serial_output`], keeping at most `max` bytes of the log file: a guest cannot fill the
/// host's disk through its console (what is dropped is counted in one last line).
pub fn serial_output_capped(path: Option<&PathBuf>, max: Option<u64>) -> Result<SerialOutput> {
    Ok(match path {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open serial log {}", path.display()))?;
            serial_file_capped(file, max)
        }
        None => SerialOutput::Stdout,
    })
}

/// The serial log `file` (opened for appending), capped at `max` bytes when set.
pub fn serial_file_capped(file: std::fs::File, max: Option<u64>) -> SerialOutput {
    match max {
        Some(max) => SerialOutput::Writer(Box::new(CappedLog {
            file,
            left: max,
            dropped: 0,
        })),
        None => SerialOutput::File(file),
    }
}

/// A log file that takes at most `left` more bytes and counts the rest.
struct CappedLog {
    file: std::fs::File,
    left: u64,
    dropped: u64,
}

impl std::io::Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let take = (buf.len() as u64).min(self.left) as usize;
        if take > 0 {
            let n = self.file.write(&buf[..take])?;
            self.left -= n as u64;
            if n < take {
                return Ok(n);
            }
        }
        self.dropped += (buf.len() - take) as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for CappedLog {
    fn drop(&mut self) {
        if self.dropped > 0 {
            use std::io::Write;
            let _ = writeln!(
                self.file,
                "\n[kata-snap: {} more bytes of guest console output dropped: the log is capped]",
                self.dropped
            );
        }
    }
}

/// Prints the stop reason, the timing and the page server's figures; returns the exit status.
pub fn finish(report: &VmReport, timing: bool) -> i32 {
    eprintln!("kata-snap: {}", report.reason);
    if timing {
        for line in timing_lines(report) {
            eprintln!("kata-snap: {line}");
        }
        if let Some(ps) = &report.page_server {
            eprintln!(
                "kata-snap: page server: {} faults, {} pages copied, {} zero pages, fault service median {} us, p99 {} us, {} pages prefetched",
                ps.faults,
                ps.pages_copied,
                ps.pages_zeroed,
                ps.median_us
                    .map(|v| format!("{v:.1}"))
                    .unwrap_or_else(|| "-".into()),
                ps.p99_us
                    .map(|v| format!("{v:.1}"))
                    .unwrap_or_else(|| "-".into()),
                ps.prefetched_pages
            );
            if let (Some(n), Some(hit)) = (ps.workingset_pages, ps.hit_rate()) {
                eprintln!(
                    "kata-snap: working set: {n} pages, hit rate {:.1}% ({} faults on set pages before the prefetcher reached them, {} faults outside the set)",
                    hit * 100.0,
                    ps.faults_in_set,
                    ps.faults_outside_set
                );
            }
        }
        if let Some(snap) = &report.snapshot {
            eprintln!(
                "kata-snap: snapshot: {:.2} ms, {} data pages of {} MiB, {} bytes on disk",
                snap.elapsed_ms,
                snap.memory.data_pages,
                snap.memory.total_bytes >> 20,
                snap.disk_bytes
            );
        }
    }
    report.reason.exit_code()
}

pub fn run(args: BootArgs, process_start: Instant, seccomp: SeccompMode) -> Result<i32> {
    let kernel = kernel_image(&args.kernel)?;
    // One message for every count out of range, whether or not it fits the type.
    let vcpus = u8::try_from(args.vcpus).unwrap_or(u8::MAX);
    if args.vcpus > u32::from(vmm::arch::mptable::MAX_VCPUS) {
        bail!(
            "--vcpus must be between 1 and {}, not {}",
            vmm::arch::mptable::MAX_VCPUS,
            args.vcpus
        );
    }
    if let Some(dir) = &args.snapshot_on_ready
        && dir.exists()
    {
        bail!(
            "snapshot directory {} already exists: choose another path or remove it first",
            dir.display()
        );
    }
    let cmdline = args.cmdline.unwrap_or_else(|| match kernel {
        KernelImage::Path(_) => DEFAULT_LINUX_CMDLINE.to_string(),
        KernelImage::Builtin { .. } => String::new(),
    });
    let serial = serial_output(args.serial_log.as_ref())?;
    let spec = BootSpec {
        kernel,
        initrd: args.initrd,
        cmdline,
        mem_mib: args.mem_mib,
        virtio: VirtioSpecs {
            disks: args.disk,
            spare_slots: args.disk_slot,
            vsock: args.vsock.map(|mut v| {
                v.host.max_connections = args.vsock_max_conns as usize;
                v
            }),
            rng: args.rng,
            nets: args.net,
            fs: args.fs,
        },
        snapshot_on_ready: args.snapshot_on_ready.map(|dir| SnapshotOnReady {
            dir,
            after: match args.after_snapshot {
                AfterSnapshotArg::Exit => AfterSnapshot::Exit,
                AfterSnapshotArg::Continue => AfterSnapshot::Continue,
            },
        }),
    };
    // The lifecycle: check, shell, load, start; then this thread only waits and reports.
    check_boot(&spec, vcpus)?;
    let shell = VmShell::new(ShellConfig {
        vcpus,
        api_sock: args.api_sock,
        process_start,
        seccomp,
        memory_class: None,
        stop_on_signals: true,
        kvm: None,
    })?;
    let host = HostResources {
        forward_stdin: true,
        ..HostResources::new(serial)
    };
    let vm = shell.load(Guest::Boot(Box::new(spec)), host)?.start()?;
    vm.restrict_caller()?;
    let report = vm.wait()?;
    Ok(finish(&report, args.timing))
}

#[cfg(test)]
mod capped_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn test_capped_log_keeps_the_cap_and_counts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let SerialOutput::Writer(mut w) = serial_output_capped(Some(&path), Some(10)).unwrap()
        else {
            panic!("a capped log is a writer");
        };
        w.write_all(b"0123456").unwrap();
        w.write_all(b"789abcdef").unwrap();
        w.write_all(b"more").unwrap();
        drop(w);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("0123456789\n[kata-snap: 10 more bytes"),
            "{text}"
        );
    }
}

#[cfg(test)]
mod net_arg_tests {
    use super::*;

    #[test]
    fn test_parse_net_options_and_refusals() {
        let n = parse_net("eth0,tap=ksn-tap1,mac=02:00:00:aa:bb:cc").unwrap();
        assert_eq!(n.id, "eth0");
        assert_eq!(n.tap.as_deref(), Some("ksn-tap1"));
        assert_eq!(n.mac, Some([2, 0, 0, 0xaa, 0xbb, 0xcc]));
        let slot = parse_net("n1").unwrap();
        assert_eq!((slot.tap, slot.mac), (None, None));
        assert!(parse_net("").is_err());
        assert!(parse_net("n,tap=").is_err());
        assert!(parse_net("n,tap=0123456789abcdef").is_err());
        assert!(parse_net("n,mtu=1500").is_err());
        assert!(parse_net("n,mac=01:00:00:00:00:01").is_err(), "multicast");
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert!(parse_mac("02:00:00:00:00:zz").is_err());
        assert!(parse_mac("002:00:00:00:00:01").is_err());
    }
}

#[cfg(test)]
mod fs_arg_tests {
    use super::parse_fs_share;

    #[test]
    fn test_parse_fs_share_forms_and_refusals() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().display().to_string();
        let s = parse_fs_share(&format!("data={p},ro"), true).unwrap();
        assert_eq!(s.tag, "data");
        let share = s.share.unwrap();
        assert!(share.read_only);
        assert_eq!(share.dir, d.path());
        let rw = parse_fs_share(&format!("data={p}"), true).unwrap();
        assert!(!rw.share.unwrap().read_only);
        // A slot: boot only.
        assert!(parse_fs_share("slot0", false).unwrap().share.is_none());
        assert!(parse_fs_share("slot0", true).is_err());
        assert!(parse_fs_share("data=relative/dir", false).is_err());
        assert!(parse_fs_share(&format!("={p}"), false).is_err());
        assert!(parse_fs_share(&format!("{}={p}", "t".repeat(37)), false).is_err());
        assert!(parse_fs_share("data=/nonexistent/kata-snap-fs", false).is_err());
    }
}
