//! OCI mounts inside the container rootfs, and the default device nodes.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use agent_protocol::Mount;
use nix::mount::{MsFlags, mount};
use thiserror::Error;

/// Errors of applying OCI mounts.
#[derive(Debug, Error)]
pub enum MountError {
    /// The destination goes through too many symbolic links (a loop).
    #[error("mount destination {0:?}: too many levels of symbolic links")]
    Symlink(String),
    /// Creating the mount point failed.
    #[error("cannot create mount point {path}: {source}")]
    MountPoint {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// `mount(2)` failed.
    #[error("cannot mount {fs_type} on {destination}: {source}")]
    Mount {
        /// Type.
        fs_type: String,
        /// Destination in the container.
        destination: String,
        /// Cause.
        source: nix::Error,
    },
}

/// Flags and data string of an OCI option list, as runc splits them:
/// known flags become mount flags, anything else goes to the data string.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedOptions {
    /// Flags for `mount(2)`.
    pub flags: MsFlags,
    /// Comma-separated filesystem-specific options.
    pub data: String,
    /// `rbind` was asked for (recursive bind).
    pub recursive: bool,
    /// Flags an option clears explicitly and no later option sets again
    /// (`rw`, `suid`, `dev`, `exec`...).
    pub cleared: MsFlags,
}

/// Splits OCI mount options into flags and data.
pub fn parse_options(options: &[String]) -> ParsedOptions {
    let mut p = ParsedOptions {
        flags: MsFlags::empty(),
        data: String::new(),
        recursive: false,
        cleared: MsFlags::empty(),
    };
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => {
                p.recursive = true;
                (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty())
            }
            // Propagation is left private: one container per VM.
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => (MsFlags::empty(), MsFlags::empty()),
            other => {
                data.push(other);
                (MsFlags::empty(), MsFlags::empty())
            }
        };
        p.flags.insert(set);
        p.flags.remove(clear);
        p.cleared.remove(set);
        p.cleared.insert(clear);
    }
    p.data = data.join(",");
    p
}

/// Most symbolic links [`resolve_in_rootfs`] follows for one path (the kernel's
/// `MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

/// `rootfs` joined with the absolute container path `dest`, as runc's
/// `securejoin` does: symbolic links on the way are followed as the container
/// would see them, an absolute one from the container's root, and `..` stops
/// at that root, so the result is always inside `rootfs` (a hostile image
/// cannot point a mount outside it). At most [`MAX_SYMLINKS`] links.
pub fn resolve_in_rootfs(rootfs: &Path, dest: &str) -> Result<PathBuf, MountError> {
    use std::ffi::OsString;
    // What is left to walk, last component first.
    let mut pending: Vec<OsString> = Vec::new();
    let push_path = |pending: &mut Vec<OsString>, p: &Path| {
        let parts: Vec<OsString> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_owned()),
                Component::ParentDir => Some("..".into()),
                _ => None,
            })
            .collect();
        pending.extend(parts.into_iter().rev());
    };
    push_path(&mut pending, Path::new(dest));
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let mut path = rootfs.to_path_buf();
        path.extend(&resolved);
        path.push(&name);
        let link = match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => fs::read_link(&path).ok(),
            _ => None,
        };
        match link {
            Some(target) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(MountError::Symlink(dest.to_owned()));
                }
                if target.is_absolute() {
                    resolved.clear();
                }
                push_path(&mut pending, &target);
            }
            None => resolved.push(name),
        }
    }
    let mut path = rootfs.to_path_buf();
    path.extend(&resolved);
    Ok(path)
}

/// Whether `m` is a read-only mount that [`apply_mount`] makes writable and
/// [`seal_readonly_mounts`] makes read-only after every mount: as runc does
/// for a read-only tmpfs (`/dev` above all), so mount points and device nodes
/// can still be made in it.
fn deferred_readonly(m: &Mount, opts: &ParsedOptions) -> bool {
    m.fs_type == "tmpfs" && opts.flags.contains(MsFlags::MS_RDONLY)
}

/// Remounts read-only the read-only tmpfs mounts of `mounts` that
/// [`apply_mount`] left writable (call after the mounts and the devices).
pub fn seal_readonly_mounts(rootfs: &Path, mounts: &[Mount]) -> Result<(), MountError> {
    for m in mounts {
        let opts = parse_options(&m.options);
        if !deferred_readonly(m, &opts) {
            continue;
        }
        let target = resolve_in_rootfs(rootfs, &m.destination)?;
        let keep = opts.flags
            & (MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC
                | MsFlags::MS_NOATIME
                | MsFlags::MS_NODIRATIME
                | MsFlags::MS_RELATIME
                | MsFlags::MS_STRICTATIME);
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | keep,
            None::<&str>,
        )
        .map_err(mount_err(m))?;
    }
    Ok(())
}

fn mount_err(m: &Mount) -> impl Fn(nix::Error) -> MountError + '_ {
    move |source| MountError::Mount {
        fs_type: m.fs_type.clone(),
        destination: m.destination.clone(),
        source,
    }
}

/// Applies one OCI mount under `rootfs`.
pub fn apply_mount(rootfs: &Path, m: &Mount) -> Result<(), MountError> {
    let target = resolve_in_rootfs(rootfs, &m.destination)?;
    let opts = parse_options(&m.options);
    let is_bind = m.fs_type == "bind" || opts.flags.contains(MsFlags::MS_BIND);
    // Anything but a directory (a regular file, a device node...) is bound on a file, made
    // empty when missing with its parents, as runc does.
    let source_is_file = is_bind && fs::metadata(&m.source).is_ok_and(|s| !s.is_dir());
    let made = if source_is_file {
        if let Some(parent) = target.parent() {
            let _ = fs::create_dir_all(parent);
        }
        // Non-blocking: the image may hold a FIFO there.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&target)
            .map(|_| ())
    } else {
        fs::create_dir_all(&target)
    };
    made.map_err(|source| MountError::MountPoint {
        path: target.clone(),
        source,
    })?;
    let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
    if is_bind {
        let flags = MsFlags::MS_BIND | (opts.flags & MsFlags::MS_REC);
        mount(
            Some(m.source.as_str()),
            &target,
            None::<&str>,
            flags,
            None::<&str>,
        )
        .map_err(mount_err(m))?;
        let remount = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        if !remount.is_empty() {
            // A bind remount sets every per-mount flag: keep the nosuid, nodev and noexec the
            // bind took from its source's mount (the shared filesystem's nosuid,nodev above
            // all) unless an option clears them, as runc keeps the locked ones.
            let kept = mount_flags(&target).map_err(mount_err(m))? & !opts.cleared;
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | remount | kept,
                None::<&str>,
            )
            .map_err(mount_err(m))?;
        }
    } else {
        let mut flags = opts.flags;
        if deferred_readonly(m, &opts) {
            flags.remove(MsFlags::MS_RDONLY);
        }
        mount(
            Some(m.source.as_str()),
            &target,
            Some(m.fs_type.as_str()),
            flags,
            data,
        )
        .map_err(mount_err(m))?;
    }
    tracing::debug!(fs_type = %m.fs_type, destination = %m.destination, "mounted");
    Ok(())
}

/// `resolve_in_rootfs` for a masked or read-only path: `None` when it does
/// not exist (runc skips it), its type otherwise.
fn existing_in_rootfs(rootfs: &Path, path: &str) -> Result<Option<(PathBuf, bool)>, MountError> {
    let target = resolve_in_rootfs(rootfs, path)?;
    match fs::symlink_metadata(&target) {
        Ok(m) => Ok(Some((target, m.is_dir()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(MountError::MountPoint {
            path: target,
            source,
        }),
    }
}

fn path_err<'a>(fs_type: &'a str, path: &'a str) -> impl Fn(nix::Error) -> MountError + 'a {
    move |source| MountError::Mount {
        fs_type: fs_type.into(),
        destination: path.into(),
        source,
    }
}

/// The nosuid, nodev and noexec flags of the mount `path` is on.
fn mount_flags(path: &Path) -> nix::Result<MsFlags> {
    use nix::sys::statvfs::FsFlags;
    let f = nix::sys::statvfs::statvfs(path)?.flags();
    let mut k = MsFlags::empty();
    k.set(MsFlags::MS_NOSUID, f.contains(FsFlags::ST_NOSUID));
    k.set(MsFlags::MS_NODEV, f.contains(FsFlags::ST_NODEV));
    k.set(MsFlags::MS_NOEXEC, f.contains(FsFlags::ST_NOEXEC));
    Ok(k)
}

/// OCI `linux.readonlyPaths`, as runc applies them after the mounts: each
/// existing path is bind-mounted (recursively) onto itself, then remounted
/// read-only, keeping its nosuid/nodev/noexec. A missing path is skipped.
pub fn apply_readonly_paths(rootfs: &Path, paths: &[String]) -> Result<(), MountError> {
    for p in paths {
        let Some((target, _)) = existing_in_rootfs(rootfs, p)? else {
            continue;
        };
        let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
        mount(Some(&target), &target, None::<&str>, bind, None::<&str>)
            .map_err(path_err("bind", p))?;
        // A bind remount must repeat the locked flags of the mount it remounts.
        let kept = mount_flags(&target).map_err(path_err("bind", p))?;
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            bind | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | kept,
            None::<&str>,
        )
        .map_err(path_err("bind", p))?;
        tracing::debug!(path = %p, "read-only path");
    }
    Ok(())
}

/// OCI `linux.maskedPaths`, as runc applies them after the mounts: an
/// existing directory gets an empty read-only tmpfs, anything else the
/// agent's `/dev/null` bound over it. A missing path is skipped.
pub fn apply_masked_paths(rootfs: &Path, paths: &[String]) -> Result<(), MountError> {
    for p in paths {
        let Some((target, is_dir)) = existing_in_rootfs(rootfs, p)? else {
            continue;
        };
        if is_dir {
            mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(path_err("tmpfs", p))?;
        } else {
            mount(
                Some("/dev/null"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(path_err("bind", p))?;
        }
        tracing::debug!(path = %p, "masked path");
    }
    Ok(())
}

/// A read-only rootfs gets its own `/dev`: unless the OCI mounts provide
/// one, a tmpfs is mounted there first (as the default OCI spec does), so
/// the default device nodes do not land in the root that is sealed
/// read-only afterwards. Call before applying the OCI mounts.
pub fn prepare_dev(rootfs: &Path, mounts: &[Mount], readonly: bool) -> Result<(), MountError> {
    if !readonly
        || mounts
            .iter()
            .any(|m| m.destination.trim_end_matches('/') == "/dev")
    {
        return Ok(());
    }
    apply_mount(
        rootfs,
        &Mount {
            destination: "/dev".into(),
            fs_type: "tmpfs".into(),
            source: "tmpfs".into(),
            options: ["nosuid", "strictatime", "mode=755", "size=65536k"]
                .map(String::from)
                .to_vec(),
        },
    )
}

/// Device nodes every container gets (bind-mounted from the agent's /dev),
/// as runc creates them.
pub const DEFAULT_DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Makes the default devices and /dev symlinks exist in the container's /dev
/// when the rootfs or its mounts do not provide them.
pub fn populate_dev(rootfs: &Path) -> Result<(), MountError> {
    let dev = resolve_in_rootfs(rootfs, "/dev")?;
    fs::create_dir_all(&dev).map_err(|source| MountError::MountPoint {
        path: dev.clone(),
        source,
    })?;
    for name in DEFAULT_DEVICES {
        let target = dev.join(name);
        if fs::symlink_metadata(&target).is_ok() {
            continue;
        }
        fs::File::create(&target).map_err(|source| MountError::MountPoint {
            path: target.clone(),
            source,
        })?;
        let host = Path::new("/dev").join(name);
        mount(
            Some(&host),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| MountError::Mount {
            fs_type: "bind".into(),
            destination: format!("/dev/{name}"),
            source,
        })?;
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let path = dev.join(link);
        if fs::symlink_metadata(&path).is_err() {
            let _ = std::os::unix::fs::symlink(to, &path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> ParsedOptions {
        parse_options(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn test_parse_options_flags_and_data_split() {
        let p = opts(&["nosuid", "noexec", "mode=755", "size=65536k", "ro"]);
        assert_eq!(
            p.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY
        );
        assert_eq!(p.data, "mode=755,size=65536k");
        assert!(!p.recursive);
    }

    #[test]
    fn test_parse_options_later_option_overrides_earlier() {
        let p = opts(&["ro", "rw", "nosuid", "suid"]);
        assert_eq!(p.flags, MsFlags::empty());
    }

    #[test]
    fn test_parse_options_records_what_is_cleared_last() {
        let p = opts(&["suid", "nodev", "dev", "ro", "rw", "noexec"]);
        assert_eq!(p.flags, MsFlags::MS_NOEXEC);
        assert_eq!(
            p.cleared,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
        let p = opts(&["rw", "ro", "exec", "noexec"]);
        assert_eq!(p.flags, MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC);
        assert_eq!(p.cleared, MsFlags::empty());
    }

    #[test]
    fn test_parse_options_rbind_is_recursive_bind() {
        let p = opts(&["rbind", "rprivate"]);
        assert_eq!(p.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(p.recursive);
        assert_eq!(p.data, "");
    }

    #[test]
    fn test_resolve_in_rootfs_follows_links_inside_the_root_only() {
        use std::os::unix::fs::symlink;
        let dir = std::env::temp_dir().join(format!("agent-mounts-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("real/conf")).unwrap();
        // runc's mounts.bats: /conf -> /real/conf, a mount on /conf/stack.
        symlink("/real/conf", dir.join("conf")).unwrap();
        // Absolute and relative links out of the root stay inside it.
        symlink("/etc", dir.join("evil")).unwrap();
        symlink("../../../../etc", dir.join("real/up")).unwrap();
        symlink("loop2", dir.join("loop1")).unwrap();
        symlink("loop1", dir.join("loop2")).unwrap();
        symlink("conf/../conf", dir.join("real/rel")).unwrap();
        assert_eq!(
            resolve_in_rootfs(&dir, "/real/x").unwrap(),
            dir.join("real/x")
        );
        assert_eq!(
            resolve_in_rootfs(&dir, "/conf/stack").unwrap(),
            dir.join("real/conf/stack")
        );
        assert_eq!(
            resolve_in_rootfs(&dir, "/evil/x").unwrap(),
            dir.join("etc/x")
        );
        assert_eq!(
            resolve_in_rootfs(&dir, "/real/up/passwd").unwrap(),
            dir.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_rootfs(&dir, "/real/rel/a").unwrap(),
            dir.join("real/conf/a")
        );
        assert!(matches!(
            resolve_in_rootfs(&dir, "/loop1/x"),
            Err(MountError::Symlink(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_only_read_only_tmpfs_is_deferred() {
        let m = |fs_type: &str, o: &[&str]| Mount {
            destination: "/dev".into(),
            fs_type: fs_type.into(),
            source: fs_type.into(),
            options: o.iter().map(|s| s.to_string()).collect(),
        };
        let d = |m: &Mount| deferred_readonly(m, &parse_options(&m.options));
        assert!(d(&m("tmpfs", &["nosuid", "ro", "mode=755"])));
        assert!(!d(&m("tmpfs", &["nosuid", "mode=755"])));
        assert!(!d(&m("sysfs", &["ro"])));
    }
}
