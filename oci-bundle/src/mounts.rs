//! OCI mounts to the mounts the guest agent makes.

use agent_protocol::Mount;
use oci_spec::runtime::Mount as OciMount;

use crate::error::ConfigError;

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

/// Files Docker bind-mounts from its per-container directory. They carry the
/// container's network identity; the VM has no network yet and the hostname
/// comes from `hostname`, so they are dropped, not refused (refusing them
/// would make every `docker run` fail).
const NETWORK_IDENTITY_FILES: &[&str] = &["/etc/resolv.conf", "/etc/hosts", "/etc/hostname"];

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

/// Translates the OCI mounts, in order. Dropped mounts are explained in
/// `ignored`; anything the guest cannot provide is refused.
pub fn translate(
    mounts: &[OciMount],
    ignored: &mut Vec<String>,
) -> Result<Vec<Mount>, ConfigError> {
    let mut out = Vec::with_capacity(mounts.len());
    for m in mounts {
        if let Some(t) = translate_one(m, ignored)? {
            out.push(t);
        }
    }
    Ok(out)
}

fn translate_one(m: &OciMount, ignored: &mut Vec<String>) -> Result<Option<Mount>, ConfigError> {
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
        if NETWORK_IDENTITY_FILES.contains(&dest) {
            ignored.push(format!(
                "mount {destination} (bind of host {source}): the VM has no network yet; \
                 the rootfs's own file is used"
            ));
            return Ok(None);
        }
        if dest == "/sys" && source.trim_end_matches('/') == "/sys" {
            // `runc spec --rootless` binds the host's /sys because an
            // unprivileged user cannot mount sysfs; the guest can.
            ignored.push(format!(
                "mount {destination}: bind of host /sys replaced by the guest's own sysfs"
            ));
            let options = flags_only(&options);
            return Ok(Some(Mount {
                destination,
                fs_type: "sysfs".into(),
                source: "sysfs".into(),
                options,
            }));
        }
        return Err(ConfigError::HostBind {
            destination,
            host_path: source,
        });
    }
    match fs_type.as_str() {
        t if GUEST_TYPES.contains(&t) => Ok(Some(Mount {
            destination,
            source: if source.is_empty() { t.into() } else { source },
            fs_type,
            options,
        })),
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
            Ok(Some(Mount {
                destination,
                fs_type: "cgroup2".into(),
                source: "cgroup2".into(),
                options: kept,
            }))
        }
        _ => Err(ConfigError::UnsupportedMountType {
            destination,
            fs_type,
        }),
    }
}
