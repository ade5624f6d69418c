//! VM templates: a snapshot of the guest kernel and agent taken at the agent's READY, from which
//! every container's VM is restored.
//!
//! A template is keyed by what its guest state depends on: the kernel and initramfs files (path,
//! device, inode, size, mtime and ctime: a rebuilt file is a new template, and nothing is read
//! from them to make the key; a built-in test guest by its name and bytes), the vCPU count, the
//! memory size, the command line and this kata-snap's version and snapshot format. It lives in `DATA/templates/KEY/` and is warmed on
//! first use: a cold boot to READY that snapshots into a temporary directory, synced and renamed
//! into place, then made read-only. Concurrent first uses warm once: an exclusive `flock` on
//! `DATA/templates/KEY.lock`, the template looked for again once the lock is held.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vmm::seccomp::SeccompMode;
use vmm::vm::virtio::{SpareSlot, VirtioSpecs, VsockHost, VsockSpec};
use vmm::vm::{
    AfterSnapshot, BootSpec, Guest, HostResources, ShellConfig, SnapshotOnReady, VmShell,
};
use vmm::{KernelImage, SerialOutput, StopReason};

use super::assets::{self, GuestAssets};

/// The spare disk slot a container's rootfs image goes into.
pub const ROOTFS_SLOT: &str = "rootfs";
/// The device the rootfs slot is in the guest (the template's only disk).
pub const ROOTFS_DEVICE: &str = "/dev/vda";
/// The net device of a networked template: a slot (link down) that a container joining a
/// network namespace gets a tap in at restore. Containers without one restore a template that
/// has no net device (loopback only): a device a container never uses is left out, and the rig
/// froze repeatedly with an idle guest holding one (see `TemplateSpec::net`).
pub const NET_SLOT: &str = "eth0";
/// The virtio-fs slot of a template for containers that bind host paths: a restore attaches
/// the container's staged shares to it (tag [`oci_bundle::SHARED_TAG`], which the agent mounts).
/// Only such containers restore a template with one, as with [`NET_SLOT`].
pub const FS_SLOT: &str = oci_bundle::SHARED_TAG;
/// The guest's vsock CID.
pub const GUEST_CID: u64 = 3;
/// The guest command line: serial console, reset through the i8042, no PCI, quiet.
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodules quiet \
                           i8042.noaux i8042.nomux i8042.dumbkbd";
/// Bound on a cold boot reaching READY while warming.
const WARM_TIMEOUT: Duration = Duration::from_secs(300);
/// Bumped when what a template holds changes (2: networked templates have a net slot; 3: a
/// virtio-fs slot for containers that bind host paths).
const TEMPLATE_FORMAT: u32 = 3;

/// The shape of a template.
#[derive(Debug, Clone)]
pub struct TemplateSpec {
    /// Guest kernel and initramfs.
    pub assets: GuestAssets,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// A virtio-net slot ([`NET_SLOT`]): for containers that join a network namespace.
    pub net: bool,
    /// A virtio-fs slot ([`FS_SLOT`]): for containers that bind host paths.
    pub fs: bool,
}

/// What `DATA/templates/KEY/meta.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateMeta {
    /// The key.
    pub key: String,
    /// The kernel it booted.
    pub kernel: PathBuf,
    /// The initramfs it booted.
    pub initramfs: PathBuf,
    /// vCPUs.
    pub vcpus: u8,
    /// Memory in MiB.
    pub mem_mib: u64,
    /// It has the net slot.
    #[serde(default)]
    pub net: bool,
    /// It has the virtio-fs slot.
    #[serde(default)]
    pub fs: bool,
    /// When it was warmed (RFC 3339).
    pub created: String,
    /// How long the warm took, in ms (cold boot to READY and snapshot).
    pub warm_ms: f64,
    /// The kata-snap version that made it.
    pub version: String,
}

/// A template ready to restore.
#[derive(Debug, Clone)]
pub struct Template {
    /// `DATA/templates/KEY`.
    pub dir: PathBuf,
    /// The snapshot directory to restore.
    pub snapshot: PathBuf,
    /// What it is.
    pub meta: TemplateMeta,
    /// Whether this call warmed it (a first use).
    pub warmed: bool,
    /// Time spent finding it, or waiting for another warm, or warming it.
    pub elapsed: Duration,
}

/// The right to record a template's working set, held by one container at a time (a
/// non-blocking `flock` on `DATA/templates/KEY.ws.lock`): the recording restores in `uffd`
/// mode into `file`, and [`Recorder::install`] moves it into the template.
#[derive(Debug)]
pub struct Recorder {
    _lock: Flock<fs::File>,
    /// Where the recording goes (beside the template, on its filesystem).
    pub file: PathBuf,
    lock: PathBuf,
    into: PathBuf,
}

/// Opens (creating) the lock file `path` and takes an exclusive `flock` on it, waiting for it,
/// or not (`None` when another process holds it) when `wait` is false.
fn lock(path: &Path, wait: bool) -> Result<Option<Flock<fs::File>>> {
    // Read-only (O_CREAT through custom flags: std refuses create without write): a jailed
    // supervisor keeps the working set's lock, and no writable descriptor outside its jail.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CREAT | libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let arg = if wait {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockExclusiveNonblock
    };
    match Flock::lock(file, arg) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) if !wait => Ok(None),
        Err((_, e)) => bail!("cannot lock {}: {e}", path.display()),
    }
}

/// The working set of the template in `dir` (restores prefetch it when it exists).
pub fn workingset_path(dir: &Path) -> PathBuf {
    dir.join("snapshot").join("workingset")
}

/// Takes the right to record `dir`'s working set, if the template has none yet and no other
/// container is recording it.
pub fn recorder(dir: &Path) -> Option<Recorder> {
    let root = dir.parent()?;
    let key = dir.file_name()?.to_str()?;
    let into = workingset_path(dir);
    if into.exists() {
        return None;
    }
    let lock = lock(&root.join(format!("{key}.ws.lock")), false).ok()??;
    if into.exists() {
        return None;
    }
    Some(Recorder {
        _lock: lock,
        file: root.join(format!(".ws-{key}-{}", std::process::id())),
        lock: root.join(format!("{key}.lock")),
        into,
    })
}

impl Recorder {
    /// Moves the recording into the template (under the template's lock, the snapshot
    /// directory writable only for the rename).
    pub fn install(self) -> Result<()> {
        let _lock = lock(&self.lock, true)?;
        let snap = self.into.parent().unwrap_or(Path::new("/"));
        let result = (|| -> Result<()> {
            if !self.file.is_file() {
                bail!("no working set was recorded at {}", self.file.display());
            }
            fs::set_permissions(&self.file, fs::Permissions::from_mode(0o444))?;
            fs::File::open(&self.file)?.sync_all()?;
            fs::set_permissions(snap, fs::Permissions::from_mode(0o755))?;
            let renamed = fs::rename(&self.file, &self.into);
            fs::set_permissions(snap, fs::Permissions::from_mode(0o555))?;
            renamed?;
            fs::File::open(snap)?.sync_all()?;
            Ok(())
        })();
        let _ = fs::remove_file(&self.file);
        result.with_context(|| format!("cannot install the working set {}", self.into.display()))
    }
}

/// Installs a working set that a jailed supervisor recorded in its container's directory
/// (`recorded`, which the jail's uid could write: read as a hostile file, not followed, bounded;
/// the restores that read it check it against the snapshot) into `template`, if the template has
/// none yet. Returns whether it did.
pub fn install_recording(template: &Path, recorded: &Path) -> Result<bool> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    /// A working set lists each page at most once: 8 bytes a page of up to 64 GiB of memory.
    const MAX: u64 = 128 << 20;
    let (Some(root), Some(key)) = (
        template.parent(),
        template.file_name().and_then(|k| k.to_str()),
    ) else {
        bail!("{} is not a template", template.display());
    };
    let into = workingset_path(template);
    if into.exists() || !template.join("meta.json").is_file() {
        return Ok(false);
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(recorded)
        .with_context(|| format!("cannot open {}", recorded.display()))?;
    if !f.metadata()?.is_file() {
        bail!("{} is not a regular file", recorded.display());
    }
    let mut bytes = Vec::new();
    f.take(MAX + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX {
        bail!("{} is larger than {MAX} bytes", recorded.display());
    }
    let Some(lock) = lock(&root.join(format!("{key}.ws.lock")), true)? else {
        return Ok(false);
    };
    if into.exists() {
        return Ok(false);
    }
    let file = root.join(format!(".ws-{key}-{}", std::process::id()));
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&file)
        .with_context(|| format!("cannot create {}", file.display()))?;
    std::io::Write::write_all(&mut out, &bytes)?;
    drop(out);
    Recorder {
        _lock: lock,
        file,
        lock: root.join(format!("{key}.lock")),
        into,
    }
    .install()?;
    Ok(true)
}

fn file_identity(h: &mut Sha256, path: &Path) -> Result<()> {
    let m = fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    h.update(path.as_os_str().as_encoded_bytes());
    h.update([0]);
    for v in [
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime() as u64,
        m.mtime_nsec() as u64,
        m.ctime() as u64,
        m.ctime_nsec() as u64,
    ] {
        h.update(v.to_le_bytes());
    }
    Ok(())
}

/// The template key of `spec`: 32 hex digits.
pub fn key(spec: &TemplateSpec) -> Result<String> {
    let mut h = Sha256::new();
    h.update(TEMPLATE_FORMAT.to_le_bytes());
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update([0]);
    match &spec.assets {
        GuestAssets::Linux { kernel, initramfs } => {
            file_identity(&mut h, kernel)?;
            file_identity(&mut h, initramfs)?;
        }
        GuestAssets::TestGuest { name, elf } => {
            // A few KiB built into this binary: its bytes are its identity.
            h.update(b"test-guest\0");
            h.update(name.as_bytes());
            h.update([0]);
            h.update(elf);
        }
    }
    h.update([spec.vcpus]);
    h.update(spec.mem_mib.to_le_bytes());
    h.update([u8::from(spec.net), u8::from(spec.fs)]);
    h.update(CMDLINE.as_bytes());
    let digest = h.finalize();
    Ok(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
}

fn templates_dir(data: &Path) -> Result<PathBuf> {
    let dir = data.join("templates");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn read_meta(dir: &Path) -> Result<TemplateMeta> {
    let path = dir.join("meta.json");
    let text = super::read_small_file(&path, 1 << 16)?;
    serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
}

/// The template for `spec`, warmed first if there is none yet (`progress` is told).
pub fn ensure(
    data: &Path,
    spec: &TemplateSpec,
    seccomp: SeccompMode,
    progress: &dyn Fn(&str),
) -> Result<Template> {
    let t0 = Instant::now();
    let key = key(spec)?;
    let root = templates_dir(data)?;
    let dir = root.join(&key);
    let found = |warmed: bool| -> Result<Template> {
        Ok(Template {
            snapshot: dir.join("snapshot"),
            meta: read_meta(&dir)?,
            dir: dir.clone(),
            warmed,
            elapsed: t0.elapsed(),
        })
    };
    if dir.join("meta.json").is_file() {
        return found(false);
    }
    let _lock = lock(&root.join(format!("{key}.lock")), true)?;
    if dir.join("meta.json").is_file() {
        // Another process warmed it while this one waited.
        return found(false);
    }
    progress(&format!(
        "warming template {key} ({} vCPU, {} MiB): cold boot to the agent's READY",
        spec.vcpus, spec.mem_mib
    ));
    warm(&root, &dir, &key, spec, seccomp)?;
    found(true)
}

/// Cold-boots the guest into `ROOT/.warm-KEY-PID`, snapshots it at READY, syncs and renames it
/// to `dir`, then makes it read-only.
fn warm(
    root: &Path,
    dir: &Path,
    key: &str,
    spec: &TemplateSpec,
    seccomp: SeccompMode,
) -> Result<()> {
    let tmp = root.join(format!(".warm-{key}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = warm_into(&tmp, key, spec, seccomp).and_then(|meta| {
        let text = serde_json::to_vec_pretty(&meta)?;
        super::write_file_synced(&tmp.join("meta.json"), &text)?;
        let _ = fs::remove_file(tmp.join("console.log"));
        make_read_only(&tmp)?;
        fs::rename(&tmp, dir)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
        fs::File::open(root)?.sync_all()?;
        Ok(())
    });
    if result.is_err() {
        let _ = make_writable(&tmp);
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn warm_into(
    tmp: &Path,
    key: &str,
    spec: &TemplateSpec,
    seccomp: SeccompMode,
) -> Result<TemplateMeta> {
    let t0 = Instant::now();
    let console = tmp.join("console.log");
    let (kernel, initrd) = match &spec.assets {
        GuestAssets::Linux { kernel, initramfs } => {
            (KernelImage::Path(kernel.clone()), Some(initramfs.clone()))
        }
        GuestAssets::TestGuest { name, elf } => (KernelImage::Builtin { name, bytes: elf }, None),
    };
    let boot = BootSpec {
        kernel,
        initrd,
        cmdline: CMDLINE.into(),
        mem_mib: spec.mem_mib,
        virtio: VirtioSpecs {
            disks: vec![],
            spare_slots: vec![SpareSlot {
                name: ROOTFS_SLOT.into(),
                read_only: true,
            }],
            vsock: Some(VsockSpec {
                cid: GUEST_CID,
                host: VsockHost::new(tmp.join("v.sock")),
            }),
            rng: false,
            // A slot: the container's tap is given at restore (`supervisor`, `net.rs`). Every
            // clone reads this MAC at boot; the agent gives each the one of its namespace.
            nets: spec
                .net
                .then(|| vmm::vm::virtio::NetSpec {
                    id: NET_SLOT.into(),
                    tap: None,
                    mac: None,
                })
                .into_iter()
                .collect(),
            // A slot: the container's staged shares are attached at restore (`supervisor`).
            fs: spec
                .fs
                .then(|| vmm::vm::virtio::FsSpec {
                    tag: FS_SLOT.into(),
                    share: None,
                })
                .into_iter()
                .collect(),
        },
        snapshot_on_ready: Some(SnapshotOnReady {
            dir: tmp.join("snapshot"),
            after: AfterSnapshot::Exit,
        }),
    };
    vmm::vm::check_boot(&boot, spec.vcpus)?;
    let shell = VmShell::new(ShellConfig {
        vcpus: spec.vcpus,
        api_sock: None,
        process_start: t0,
        seccomp,
        memory_class: None,
        stop_on_signals: true,
        kvm: None,
    })?;
    let serial = fs::File::create(&console)
        .with_context(|| format!("cannot create {}", console.display()))?;
    let host = HostResources::new(SerialOutput::File(serial));
    let vm = shell.load(Guest::Boot(Box::new(boot)), host)?.start()?;
    let ready = vm.wait_ready(WARM_TIMEOUT);
    if ready.is_none() {
        vm.stop();
    }
    let report = vm.wait()?;
    let tail = || console_tail(&console);
    match (&report.reason, ready) {
        (StopReason::SnapshotTaken { .. }, _) => {}
        (_, None) => bail!(
            "the guest did not say READY within {} s while warming the template{}",
            WARM_TIMEOUT.as_secs(),
            tail()
        ),
        (reason, Some(_)) => bail!("warming the template failed: {reason}{}", tail()),
    }
    let (kernel, initramfs) = match &spec.assets {
        GuestAssets::Linux { kernel, initramfs } => (kernel.clone(), initramfs.clone()),
        GuestAssets::TestGuest { name, .. } => {
            (PathBuf::from(format!("builtin:{name}")), PathBuf::new())
        }
    };
    Ok(TemplateMeta {
        key: key.into(),
        kernel,
        initramfs,
        vcpus: spec.vcpus,
        mem_mib: spec.mem_mib,
        net: spec.net,
        fs: spec.fs,
        created: super::state::rfc3339_now(),
        warm_ms: t0.elapsed().as_secs_f64() * 1e3,
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// The last lines of the guest console, for an error message.
fn console_tail(path: &Path) -> String {
    let text = super::read_small_file(path, 1 << 20).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return " (the guest console is empty)".into();
    }
    let start = lines.len().saturating_sub(8);
    format!("; guest console ends:\n  {}", lines[start..].join("\n  "))
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path, bool) -> std::io::Result<()>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let is_dir = entry.file_type()?.is_dir();
        if is_dir {
            walk(&entry.path(), f)?;
        }
        f(&entry.path(), is_dir)?;
    }
    f(dir, true)
}

fn make_read_only(dir: &Path) -> Result<()> {
    walk(dir, &mut |p, is_dir| {
        fs::set_permissions(
            p,
            fs::Permissions::from_mode(if is_dir { 0o555 } else { 0o444 }),
        )
    })
    .with_context(|| format!("cannot make {} read-only", dir.display()))
}

fn make_writable(dir: &Path) -> std::io::Result<()> {
    // Parents first, so their entries can be listed and removed.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            make_writable(&entry.path())?;
        } else {
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o644))?;
        }
    }
    Ok(())
}

/// Every template in `data`.
pub fn list(data: &Path) -> Result<Vec<(TemplateMeta, u64)>> {
    let root = data.join("templates");
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", root.display())),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') || !path.is_dir() {
            continue;
        }
        if let Ok(meta) = read_meta(&path) {
            let mut bytes = 0;
            let _ = walk(&path, &mut |p, is_dir| {
                if !is_dir {
                    // Allocated bytes: the memory file is sparse.
                    bytes += fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0);
                }
                Ok(())
            });
            out.push((meta, bytes));
        }
    }
    out.sort_by(|a, b| a.0.created.cmp(&b.0.created));
    Ok(out)
}

/// Removes the template `key` (under its lock, so a warm in progress finishes first).
pub fn remove(data: &Path, key: &str) -> Result<()> {
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("no template {key:?}: a key is hex digits, as `kata-snap template list` prints");
    }
    let root = data.join("templates");
    let dir = root.join(key);
    if !dir.is_dir() {
        bail!("no template {key}");
    }
    let _lock = lock(&root.join(format!("{key}.lock")), true)?;
    // Out of the way first (a rename is atomic), so no restore finds a half-removed template.
    let doomed = root.join(format!(".rm-{key}-{}", std::process::id()));
    fs::rename(&dir, &doomed).with_context(|| format!("cannot remove {}", dir.display()))?;
    make_writable(&doomed)?;
    fs::remove_dir_all(&doomed).with_context(|| format!("cannot remove {}", doomed.display()))?;
    // The lock file stays: removing it would let a waiter and a newcomer lock different files.
    Ok(())
}

/// The memory size classes of templates, in MiB: 128, 192, 256, 384, 512, 768, ... 16384, each
/// power of two and the midpoint 1.5 times it. A container's VM gets the smallest class at least
/// the memory it asks for (at most 1.5 times that), so containers whose limits differ by a MiB
/// share one template (and one pool of shells) instead of warming one each: 15 classes at most.
/// Past the last class, sizes round up to a multiple of 4 GiB.
pub fn memory_class(mib: u64) -> u64 {
    let mut class = 128u64;
    while class < mib && class < 16384 {
        let mid = class + class / 2;
        if mid >= mib {
            return mid;
        }
        class *= 2;
    }
    if mib <= class {
        class
    } else {
        mib.div_ceil(4096).saturating_mul(4096)
    }
}

/// The template a container of this shape restores: the host must run Linux guests at speed,
/// and the guest kernel and agent must exist; the config file's defaults fill what is not given.
/// A built-in test guest (config `testGuest`) is no Linux guest: the host check is not made.
pub fn spec_for(
    vcpus: Option<u8>,
    mem_mib: Option<u64>,
    net: bool,
    fs: bool,
) -> Result<TemplateSpec> {
    let rc = assets::RuntimeConfig::load()?;
    if rc.test_guest.is_none() {
        let host = vmm::host::check_host();
        if !host.can_boot_linux {
            bail!(
                "this host cannot run Linux guests at speed: {}",
                host.summary
            );
        }
    }
    Ok(TemplateSpec {
        assets: assets::guest_assets(&rc)?,
        vcpus: vcpus.or(rc.default_vcpus).unwrap_or(assets::DEFAULT_VCPUS),
        mem_mib: memory_class(
            mem_mib
                .or(rc.default_mem_mib)
                .unwrap_or(assets::DEFAULT_MEM_MIB),
        ),
        net,
        fs,
    })
}

#[cfg(test)]
mod tests {
    use super::memory_class;

    #[test]
    fn test_memory_class_rounds_up_to_few_classes() {
        assert_eq!(memory_class(1), 128);
        assert_eq!(memory_class(128), 128);
        assert_eq!(memory_class(129), 192);
        assert_eq!(memory_class(255), 256);
        assert_eq!(memory_class(256), 256);
        assert_eq!(memory_class(257), 384);
        assert_eq!(memory_class(320), 384);
        assert_eq!(memory_class(1000), 1024);
        assert_eq!(memory_class(16384), 16384);
        assert_eq!(memory_class(16385), 20480);
        let mut classes: Vec<u64> = (1..=16384).map(memory_class).collect();
        classes.dedup();
        assert_eq!(classes.len(), 15, "{classes:?}");
        for mib in 1..=16384u64 {
            let c = memory_class(mib);
            assert!(c >= mib && (mib < 128 || c * 2 <= mib * 3), "{mib} -> {c}");
        }
    }
}
