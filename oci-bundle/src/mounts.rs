//! OCI mounts to the mounts the guest agent makes.

use std::path::Path;

use agent_protocol::Mount;
use oci_spec::runtime::Mount as OciMount;

use crate::error::ConfigError;
use crate::{FileCopy, HostShare};

/// Types the guest makes itself, passed through unchanged.
const GUEST_TYPES: &[&str] = &["proc", "sysfs", "tmpfs", "devpts", "mqueue"];

/// Options that are mount flags (as the agent's option parser knows them):
/// the only options kept when a mount changes type (cgroup v1 to cgroup2,
/// a bind of /sys to sysfs).
const FLAG_OPTIONS: &[&str] = &[
    "ro",
    "rw",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "sync",
    "async",
    "noatime",
    "nodiratime",
    "relatime",
    "strictatime",
];

/// Files Docker (and nerdctl, CRI) bind-mount from its per-container
/// directory: the container's network identity. A VM cannot bind a host file
/// (no shared filesystem yet), so each becomes a [`FileCopy`]: the runtime
/// reads the host file at create and the agent writes its content there.
pub const NETWORK_IDENTITY_FILES: &[&str] = &["/etc/resolv.conf", "/etc/hosts", "/etc/hostname"];

fn utf8(field: &'static str, p: &std::path::Path) -> Result<String, ConfigError> {
    p.to_str().map(str::to_owned).ok_or(ConfigError::NotUtf8 {
        field,
        value: p.to_string_lossy().into_owned(),
    })
}

fn flags_only(options: &[String]) -> Vec<String> {
    options
        .iter()
        .filter(|o| FLAG_OPTIONS.contains(&o.as_str()))
        .cloned()
        .collect()
}

/// What the OCI mounts become.
#[derive(Debug, Default)]
pub struct Translated {
    /// The mounts the guest makes, in order.
    pub mounts: Vec<Mount>,
    /// The host files copied in, one per destination.
    pub files: Vec<FileCopy>,
    /// The host directories and files shared with the guest, in the order of their binds
    /// (share `i` is at `SHARED_DIR/i` in the guest, which `mounts` binds).
    pub shares: Vec<HostShare>,
}

/// Where the guest mounts the shared filesystem of a container's host directories and files
/// (virtio-fs, tag [`SHARED_TAG`]): share `i` is `SHARED_DIR/i`.
pub const SHARED_DIR: &str = "/run/kata-snap/shared";
/// The tag of the virtio-fs device that shares them.
pub const SHARED_TAG: &str = "kata-shared";
/// The most host paths one container binds (each is a mount in its VMM's jail).
pub const MAX_SHARES: usize = 24;

/// Translates the OCI mounts, in order. `dir` is the absolute bundle
/// directory (a relative bind source is relative to it, as in runc). Dropped
/// mounts are explained in `ignored`; anything the guest cannot provide is
/// refused.
pub fn translate(
    dir: &Path,
    mounts: &[OciMount],
    ignored: &mut Vec<String>,
) -> Result<Translated, ConfigError> {
    let mut out = Translated::default();
    for m in mounts {
        match translate_one(dir, m, ignored)? {
            Some(Translation::Mount(t)) => out.mounts.push(t),
            Some(Translation::Share(share, mut mount)) => {
                if out.shares.len() == MAX_SHARES {
                    return Err(ConfigError::TooManyShares(MAX_SHARES));
                }
                mount.source = format!("{SHARED_DIR}/{}", out.shares.len());
                out.shares.push(share);
                out.mounts.push(mount);
            }
            Some(Translation::File(f)) => {
                // A later mount on the same file hides an earlier one.
                if let Some(i) = out
                    .files
                    .iter()
                    .position(|g| g.destination == f.destination)
                {
                    ignored.push(format!(
                        "mount {} (bind of host {}): hidden by a later bind on the same file",
                        f.destination,
                        out.files[i].source.display()
                    ));
                    out.files.remove(i);
                }
                out.files.push(f);
            }
            None => {}
        }
    }
    Ok(out)
}

enum Translation {
    Mount(Mount),
    File(FileCopy),
    /// A host path shared with the guest, and the guest's bind of it (its source set by
    /// [`translate`]).
    Share(HostShare, Mount),
}

fn translate_one(
    dir: &Path,
    m: &OciMount,
    ignored: &mut Vec<String>,
) -> Result<Option<Translation>, ConfigError> {
    let destination = utf8("mount destination", m.destination())?;
    let fs_type = m.typ().clone().unwrap_or_default();
    let source = match m.source() {
        Some(s) => utf8("mount source", s)?,
        None => String::new(),
    };
    let options = m.options().clone().unwrap_or_default();
    if m.uid_mappings().is_some() || m.gid_mappings().is_some() {
        return Err(ConfigError::IdmappedMount(destination));
    }
    let is_bind = fs_type == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
    if is_bind {
        let dest = destination.trim_end_matches('/');
        if NETWORK_IDENTITY_FILES.contains(&dest) && !source.is_empty() {
            // The last of `ro`/`rw` wins, as the agent's option parser reads them.
            let read_only = options
                .iter()
                .rev()
                .find(|o| *o == "ro" || *o == "rw")
                .is_some_and(|o| o == "ro");
            return Ok(Some(Translation::File(FileCopy {
                source: dir.join(&source),
                destination: dest.to_owned(),
                read_only,
            })));
        }
        if dest == "/sys" && source.trim_end_matches('/') == "/sys" {
            // `runc spec --rootless` binds the host's /sys because an
            // unprivileged user cannot mount sysfs; the guest can.
            ignored.push(format!(
                "mount {destination}: bind of host /sys replaced by the guest's own sysfs"
            ));
            let options = flags_only(&options);
            return Ok(Some(Translation::Mount(Mount {
                destination,
                fs_type: "sysfs".into(),
                source: "sysfs".into(),
                options,
            })));
        }
        if source.is_empty() {
            return Err(ConfigError::HostBind {
                destination,
                host_path: source,
            });
        }
        // The last of `ro`/`rw` wins, as the agent's option parser reads them.
        let read_only = options
            .iter()
            .rev()
            .find(|o| *o == "ro" || *o == "rw")
            .is_some_and(|o| o == "ro");
        let mut guest_options = vec!["bind".to_string()];
        guest_options.extend(flags_only(&options).into_iter().filter(|o| o != "bind"));
        return Ok(Some(Translation::Share(
            HostShare {
                source: dir.join(&source),
                destination: destination.clone(),
                read_only,
                recursive: options.iter().any(|o| o == "rbind"),
            },
            Mount {
                destination,
                fs_type: "bind".into(),
                source: String::new(),
                options: guest_options,
            },
        )));
    }
    match fs_type.as_str() {
        t if GUEST_TYPES.contains(&t) => Ok(Some(Translation::Mount(Mount {
            destination,
            source: if source.is_empty() { t.into() } else { source },
            fs_type,
            options,
        }))),
        "cgroup" | "cgroup2" => {
            // runc on a cgroup v2 host turns an OCI "cgroup" mount into a
            // cgroup2 mount; the guest kernel has cgroup2 and no v1
            // controllers, so the guest does the same. Data options (v1
            // controller names) would make cgroup2 refuse to mount.
            let kept = flags_only(&options);
            if kept.len() != options.len() {
                ignored.push(format!(
                    "mount {destination}: cgroup options other than mount flags dropped \
                     (cgroup2 in the guest)"
                ));
            }
            Ok(Some(Translation::Mount(Mount {
                destination,
                fs_type: "cgroup2".into(),
                source: "cgroup2".into(),
                options: kept,
            })))
        }
        _ => Err(ConfigError::UnsupportedMountType {
            destination,
            fs_type,
        }),
    }
}
