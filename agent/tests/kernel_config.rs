//! The committed guest kernel config keeps every option the guest needs.
//! (kconfig drops options whose dependencies are missing without a word, so
//! guest/kernel/check-config.sh checks the *built* .config the same way; this
//! test runs that script too, on synthetic configs.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

/// Options the issue requires, independent of required-options.txt so that
/// the list file cannot be trimmed silently.
const REQUIRED: &[&str] = &[
    "64BIT",
    "SMP",
    "VIRTIO_MMIO",
    "VIRTIO_MMIO_CMDLINE_DEVICES",
    "VIRTIO_BLK",
    "SERIAL_8250",
    "SERIAL_8250_CONSOLE",
    "PRINTK",
    "TTY",
    "UNIX",
    "VSOCKETS",
    "VIRTIO_VSOCKETS",
    "HW_RANDOM_VIRTIO",
    "BLK_DEV_INITRD",
    "KVM_GUEST",
    "PARAVIRT",
    "BINFMT_ELF",
    "BINFMT_SCRIPT",
    "FUTEX",
    "EPOLL",
    "SIGNALFD",
    "TIMERFD",
    "EVENTFD",
    "SHMEM",
    "DEVTMPFS",
    "DEVTMPFS_MOUNT",
    "NAMESPACES",
    "UTS_NS",
    "IPC_NS",
    "PID_NS",
    "CGROUPS",
    // The controllers of the containers' groups (runc update / events).
    "MEMCG",
    "CGROUP_SCHED",
    "FAIR_GROUP_SCHED",
    "CFS_BANDWIDTH",
    "CPUSETS",
    "CGROUP_PIDS",
    "OVERLAY_FS",
    "EROFS_FS",
    "EXT4_FS",
    "TMPFS",
    "PROC_FS",
    "SYSFS",
    "NO_HZ_IDLE",
    "HZ_100",
    "MULTIUSER",
    "UNIX98_PTYS",
];
/// Options that must be off.
const FORBIDDEN: &[&str] = &["MODULES", "PCI"];

fn kernel_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../guest/kernel")
}

/// Parses `CONFIG_X=v` and `# CONFIG_X is not set` lines.
fn parse(text: &str) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# CONFIG_")
            && let Some(name) = rest.strip_suffix(" is not set")
        {
            m.insert(name.to_owned(), "n".to_owned());
        } else if let Some(rest) = line.strip_prefix("CONFIG_")
            && let Some((k, v)) = rest.split_once('=')
        {
            m.insert(k.to_owned(), v.to_owned());
        }
    }
    m
}

fn fragment() -> HashMap<String, String> {
    parse(&std::fs::read_to_string(kernel_dir().join("microvm.config")).unwrap())
}

#[test]
fn test_kernel_config_required_options_enabled() {
    let cfg = fragment();
    let missing: Vec<&&str> = REQUIRED
        .iter()
        .filter(|o| cfg.get(**o).map(String::as_str) != Some("y"))
        .collect();
    assert!(
        missing.is_empty(),
        "microvm.config lacks =y for {missing:?}"
    );
}

#[test]
fn test_kernel_config_modules_and_pci_disabled() {
    let cfg = fragment();
    for o in FORBIDDEN {
        assert_eq!(
            cfg.get(*o).map(String::as_str),
            Some("n"),
            "CONFIG_{o} must be 'is not set'"
        );
    }
}

#[test]
fn test_kernel_config_required_list_covers_issue_list() {
    let list = std::fs::read_to_string(kernel_dir().join("required-options.txt")).unwrap();
    let listed: Vec<&str> = list
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("CONFIG_"))
        .collect();
    for o in REQUIRED {
        assert!(listed.contains(o), "required-options.txt lacks CONFIG_{o}");
    }
    // And everything it lists is enabled in the fragment.
    let cfg = fragment();
    for o in listed {
        assert_eq!(
            cfg.get(o).map(String::as_str),
            Some("y"),
            "CONFIG_{o} listed but not =y"
        );
    }
}

fn run_check(config: &str) -> (bool, String) {
    let path =
        std::env::temp_dir().join(format!("kata-kcfg-{}-{}", std::process::id(), config.len()));
    std::fs::write(&path, config).unwrap();
    let out = Command::new("bash")
        .arg(kernel_dir().join("check-config.sh"))
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn test_check_config_script_accepts_complete_and_rejects_dropped_option() {
    let list = std::fs::read_to_string(kernel_dir().join("required-options.txt")).unwrap();
    let good: String = list
        .lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .map(|l| format!("{l}=y\n"))
        .chain(["# CONFIG_MODULES is not set\n".to_owned()])
        .collect();
    let (ok, msg) = run_check(&good);
    assert!(ok, "complete config rejected: {msg}");
    // kconfig dropped EROFS (say, a missing MISC_FILESYSTEMS): must fail.
    let dropped = good.replace("CONFIG_EROFS_FS=y\n", "# CONFIG_EROFS_FS is not set\n");
    let (ok, msg) = run_check(&dropped);
    assert!(!ok);
    assert!(msg.contains("missing: CONFIG_EROFS_FS=y"), "{msg}");
    let (ok, msg) = run_check(&format!("{good}CONFIG_MODULES=y\n"));
    assert!(!ok);
    assert!(msg.contains("forbidden: CONFIG_MODULES=y"), "{msg}");
}
