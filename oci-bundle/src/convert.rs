//! oci-spec's [`Spec`] to a [`BundleConfig`]: every field honoured,
//! ignored (with a note) or refused, as the table in the crate doc says.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agent_protocol::{Capabilities, Rlimit, RlimitKind, User, validate::validate_hostname};
use oci_spec::runtime::{Hooks, Linux, Process, Spec};

use crate::error::ConfigError;
use crate::{BundleConfig, ConsoleSize, Network, ProcessConfig, Resources, mounts, resources};

/// The umask a guest process gets when `process.user.umask` is not set: the
/// kernel's initial one, as with runc.
pub const GUEST_UMASK: u32 = 0o022;

/// Device nodes the agent gives every container (as runc does); listing them
/// in `linux.devices` asks for nothing more.
const DEFAULT_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/ptmx",
];

/// Converts a parsed config. `dir` is the absolute bundle directory;
/// `capabilities` is `process.capabilities` as written in the JSON.
pub fn convert(
    dir: &Path,
    spec: &Spec,
    notes: Vec<String>,
    capabilities: Option<&serde_json::Value>,
    seccomp: Option<&serde_json::Value>,
) -> Result<BundleConfig, ConfigError> {
    let mut ignored = notes;
    let oci_version = spec.version().clone();
    if oci_version.split('.').next() != Some("1") {
        return Err(ConfigError::OciVersion(oci_version));
    }
    for (name, present) in [
        ("solaris", spec.solaris().is_some()),
        ("windows", spec.windows().is_some()),
        ("vm", spec.vm().is_some()),
        ("zos", spec.zos().is_some()),
    ] {
        if present {
            return Err(ConfigError::Platform(name));
        }
    }
    let root_spec = spec.root().as_ref().ok_or(ConfigError::NoRoot)?;
    let root = rootfs(dir, root_spec.path())?;
    let readonly = root_spec.readonly().unwrap_or(false);
    let process = process(
        spec.process().as_ref().ok_or(ConfigError::NoProcess)?,
        capabilities,
        &mut ignored,
    )?;
    let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
    if let Some(h) = &hostname {
        validate_hostname(h)?;
    }
    if spec.domainname().as_ref().is_some_and(|d| !d.is_empty()) {
        ignored.push("domainname: not set in the guest".into());
    }
    let hooks = match spec.hooks() {
        Some(h) => hooks(h)?,
        None => crate::Hooks::default(),
    };
    let mounts::Translated {
        mounts,
        files,
        shares,
    } = mounts::translate(
        dir,
        spec.mounts().as_deref().unwrap_or_default(),
        &mut ignored,
    )?;
    let (resources, network) = match spec.linux() {
        Some(linux) => self::linux(linux, &mut ignored)?,
        None => (Resources::default(), Network::Host),
    };
    let seccomp = match seccomp.filter(|v| !v.is_null()) {
        Some(raw) => crate::seccomp::compile(raw, &mut ignored)?,
        None => None,
    };
    let paths = |list: &Option<Vec<String>>| list.clone().unwrap_or_default();
    let (masked_paths, readonly_paths) = match spec.linux() {
        Some(l) => (paths(l.masked_paths()), paths(l.readonly_paths())),
        None => (Vec::new(), Vec::new()),
    };
    let cgroups_path = match spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
    {
        Some(p) => Some(utf8("linux.cgroupsPath", p)?),
        None => None,
    };
    let annotations: BTreeMap<String, String> = spec
        .annotations()
        .as_ref()
        .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok(BundleConfig {
        oci_version,
        root,
        readonly,
        process,
        hostname,
        mounts,
        files,
        annotations,
        resources,
        cgroups_path,
        masked_paths,
        readonly_paths,
        seccomp,
        network,
        hooks,
        shares,
        ignored,
    })
}

/// The number of the capability named `name` (`CAP_CHOWN` is 0), if known.
pub fn capability_number(name: &str) -> Option<u32> {
    crate::spec::CAPABILITIES
        .iter()
        .position(|c| *c == name)
        .map(|n| n as u32)
}

/// `process.capabilities` (as written in the JSON) to bit masks. An unknown
/// name is skipped with a note, as runc skips it with a warning; a missing
/// set is empty.
pub(crate) fn capabilities(
    raw: Option<&serde_json::Value>,
    ignored: &mut Vec<String>,
) -> Result<Option<Capabilities>, ConfigError> {
    let Some(raw) = raw.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Some(obj) = raw.as_object() else {
        return Err(ConfigError::CapabilityShape("(all)".into()));
    };
    let mut set = |key: &str| -> Result<u64, ConfigError> {
        let mut mask = 0u64;
        let names = match obj.get(key) {
            None | Some(serde_json::Value::Null) => return Ok(0),
            Some(serde_json::Value::Array(a)) => a,
            Some(_) => return Err(ConfigError::CapabilityShape(key.into())),
        };
        for n in names {
            let name = n
                .as_str()
                .ok_or_else(|| ConfigError::CapabilityShape(key.into()))?;
            match capability_number(name) {
                Some(bit) => mask |= 1 << bit,
                None => ignored.push(format!(
                    "process.capabilities.{key} {}: unknown capability, skipped",
                    name.chars().take(64).collect::<String>()
                )),
            }
        }
        Ok(mask)
    };
    Ok(Some(Capabilities {
        bounding: set("bounding")?,
        effective: set("effective")?,
        permitted: set("permitted")?,
        inheritable: set("inheritable")?,
        ambient: set("ambient")?,
    }))
}

/// The name an oci-spec enum has in config.json (its serde name, e.g.
/// `RLIMIT_NOFILE`, `network`; its `Display` differs for some).
fn oci_name<T: serde::Serialize + std::fmt::Debug>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{v:?}"))
}

fn utf8(field: &'static str, p: &Path) -> Result<String, ConfigError> {
    p.to_str().map(str::to_owned).ok_or(ConfigError::NotUtf8 {
        field,
        value: p.to_string_lossy().into_owned(),
    })
}

/// `root.path`, relative to the bundle unless absolute: an existing directory.
fn rootfs(dir: &Path, path: &Path) -> Result<PathBuf, ConfigError> {
    let joined = dir.join(path);
    match std::fs::metadata(&joined) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(ConfigError::RootfsNotDir(joined)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ConfigError::RootfsMissing(joined));
        }
        Err(source) => {
            return Err(ConfigError::RootfsAccess {
                path: joined,
                source,
            });
        }
    }
    joined
        .canonicalize()
        .map_err(|source| ConfigError::RootfsAccess {
            path: joined,
            source,
        })
}

pub(crate) fn process(
    p: &Process,
    raw_capabilities: Option<&serde_json::Value>,
    ignored: &mut Vec<String>,
) -> Result<ProcessConfig, ConfigError> {
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(ConfigError::EmptyArgs);
    }
    let cwd = utf8("process.cwd", p.cwd())?;
    if !cwd.starts_with('/') {
        return Err(ConfigError::RelativeCwd(cwd));
    }
    let u = p.user();
    let umask = match u.umask() {
        Some(m) if m > 0o777 => return Err(ConfigError::Umask(m)),
        m => m,
    };
    if u.username().is_some() {
        ignored.push("process.user.username: Windows only".into());
    }
    let user = User {
        uid: u.uid(),
        gid: u.gid(),
        additional_gids: u.additional_gids().clone().unwrap_or_default(),
    };
    let mut rlimits = Vec::new();
    for r in p.rlimits().as_deref().unwrap_or_default() {
        let name = oci_name(&r.typ());
        let kind = RlimitKind::from_oci_name(&name).ok_or(ConfigError::UnknownRlimit(name))?;
        rlimits.push(Rlimit {
            kind,
            soft: r.soft(),
            hard: r.hard(),
        });
    }
    let console_size = p
        .console_size()
        .as_ref()
        .filter(|b| b.height() > 0 && b.width() > 0)
        .map(|b| ConsoleSize {
            rows: u16::try_from(b.height()).unwrap_or(u16::MAX),
            cols: u16::try_from(b.width()).unwrap_or(u16::MAX),
        });
    for (name, present, why) in [
        (
            "apparmorProfile",
            p.apparmor_profile().is_some(),
            "no LSM in the guest",
        ),
        (
            "selinuxLabel",
            p.selinux_label().is_some(),
            "no LSM in the guest",
        ),
        (
            "oomScoreAdj",
            p.oom_score_adj().is_some(),
            "the container is alone in its VM",
        ),
        (
            "ioPriority",
            p.io_priority().is_some(),
            "the container is alone in its VM",
        ),
        (
            "scheduler",
            p.scheduler().is_some(),
            "the container is alone in its VM",
        ),
        (
            "execCPUAffinity",
            p.exec_cpu_affinity().is_some(),
            "vCPUs are not host CPUs",
        ),
        ("commandLine", p.command_line().is_some(), "Windows only"),
    ] {
        if present {
            ignored.push(format!("process.{name}: {why}"));
        }
    }
    Ok(ProcessConfig {
        args,
        env: p.env().clone().unwrap_or_default(),
        cwd,
        user,
        terminal: p.terminal().unwrap_or(false),
        console_size,
        rlimits,
        no_new_privileges: p.no_new_privileges().unwrap_or(false),
        umask,
        capabilities: capabilities(raw_capabilities, ignored)?,
    })
}

/// `hooks`, each list in order. A hook's `path` must be absolute and its
/// `timeout`, when set, greater than zero (runtime-spec `config.md`).
fn hooks(h: &Hooks) -> Result<crate::Hooks, ConfigError> {
    let list = |kind: &'static str,
                list: &Option<Vec<oci_spec::runtime::Hook>>|
     -> Result<Vec<crate::Hook>, ConfigError> {
        list.as_deref()
            .unwrap_or_default()
            .iter()
            .map(|hook| {
                let path = hook.path().clone();
                if !path.is_absolute() {
                    return Err(ConfigError::HookPath {
                        kind,
                        path: path.to_string_lossy().into_owned(),
                    });
                }
                let timeout = match hook.timeout() {
                    Some(t) if t <= 0 => {
                        return Err(ConfigError::HookTimeout {
                            kind,
                            path: path.to_string_lossy().into_owned(),
                            timeout: t,
                        });
                    }
                    Some(t) => Some(u32::try_from(t).unwrap_or(u32::MAX)),
                    None => None,
                };
                Ok(crate::Hook {
                    path,
                    args: hook.args().clone().unwrap_or_default(),
                    env: hook.env().clone().unwrap_or_default(),
                    timeout,
                })
            })
            .collect()
    };
    #[allow(deprecated)]
    let prestart = list("prestart", h.prestart())?;
    Ok(crate::Hooks {
        prestart,
        create_runtime: list("createRuntime", h.create_runtime())?,
        create_container: list("createContainer", h.create_container())?,
        start_container: list("startContainer", h.start_container())?,
        poststart: list("poststart", h.poststart())?,
        poststop: list("poststop", h.poststop())?,
    })
}

fn linux(l: &Linux, ignored: &mut Vec<String>) -> Result<(Resources, Network), ConfigError> {
    for (name, present) in [
        ("personality", l.personality().is_some()),
        ("timeOffsets", l.time_offsets().is_some()),
        ("netDevices", l.net_devices().is_some()),
    ] {
        if present {
            return Err(ConfigError::UnsupportedLinux(name));
        }
    }
    let mut network = Network::Host;
    if let Some(ns) = l.namespaces() {
        let mut names = Vec::new();
        for n in ns {
            let ty = oci_name(&n.typ());
            if ty == "network" {
                network = match n.path() {
                    Some(p) if p.is_absolute() => Network::Join(p.clone()),
                    Some(p) => {
                        return Err(ConfigError::RelativeNamespacePath(
                            p.to_string_lossy().into_owned(),
                        ));
                    }
                    None => Network::New,
                };
                continue;
            }
            if let Some(path) = n.path() {
                return Err(ConfigError::JoinNamespace {
                    ns: ty,
                    path: path.to_string_lossy().into_owned(),
                });
            }
            // The guest gives every container a PID and a cgroup namespace of its own.
            if !matches!(ty.as_str(), "pid" | "cgroup") {
                names.push(ty);
            }
        }
        if !names.is_empty() {
            ignored.push(format!(
                "linux.namespaces ({}): the VM is the isolation boundary",
                names.join(", ")
            ));
        }
    }
    for d in l.devices().as_deref().unwrap_or_default() {
        let path = d.path().to_string_lossy().into_owned();
        if !DEFAULT_DEVICES.contains(&path.as_str()) {
            return Err(ConfigError::Device(path));
        }
        ignored.push(format!("linux.devices {path}: the guest provides it"));
    }
    if let Some(sysctl) = l.sysctl() {
        let mut keys: Vec<&String> = sysctl.keys().collect();
        keys.sort();
        for k in keys {
            ignored.push(format!("linux.sysctl {k}: not applied in the guest"));
        }
    }
    for (name, present, why) in [
        (
            "uidMappings",
            l.uid_mappings().is_some(),
            "the VM is the isolation boundary",
        ),
        (
            "gidMappings",
            l.gid_mappings().is_some(),
            "the VM is the isolation boundary",
        ),
        (
            "rootfsPropagation",
            l.rootfs_propagation().is_some(),
            "one container per VM",
        ),
        (
            "mountLabel",
            l.mount_label().is_some(),
            "no LSM in the guest",
        ),
        (
            "intelRdt",
            l.intel_rdt().is_some(),
            "vCPUs are not host CPUs",
        ),
        (
            "memoryPolicy",
            l.memory_policy().is_some(),
            "the guest has one NUMA node",
        ),
    ] {
        if present {
            ignored.push(format!("linux.{name}: {why}"));
        }
    }
    let resources = match l.resources() {
        Some(r) => resources::from_oci(r, ignored)?,
        None => Resources::default(),
    };
    Ok((resources, network))
}
