//! The configs runc, containerd and Docker write, loaded as kata-snap will.

mod common;

use agent_protocol::{Mount, RlimitKind, RootfsSource, Validate};
use common::{TestBundle, fixture};
use oci_bundle::{ConfigError, FileCopy, Resources};

fn mount_types(mounts: &[Mount]) -> Vec<(&str, &str)> {
    mounts
        .iter()
        .map(|m| (m.destination.as_str(), m.fs_type.as_str()))
        .collect()
}

fn has(ignored: &[String], prefix: &str) -> bool {
    ignored.iter().any(|i| i.starts_with(prefix))
}

#[test]
fn test_runc_default_spec_loaded() {
    let b = TestBundle::new();
    b.write(&fixture("runc-default.json"));
    let bundle = b.load().unwrap();
    assert_eq!(bundle.dir, b.path().canonicalize().unwrap());
    let c = &bundle.config;
    assert_eq!(c.oci_version, "1.0.2-dev");
    assert_eq!(c.root, b.path().join("rootfs").canonicalize().unwrap());
    assert!(c.readonly);
    assert_eq!(c.process.args, ["sh"]);
    assert!(c.process.terminal);
    assert!(c.process.no_new_privileges);
    assert_eq!(c.process.cwd, "/");
    assert_eq!((c.process.user.uid, c.process.user.gid), (0, 0));
    assert_eq!(c.process.rlimits.len(), 1);
    assert_eq!(c.process.rlimits[0].kind, RlimitKind::Nofile);
    assert_eq!(
        (c.process.rlimits[0].soft, c.process.rlimits[0].hard),
        (1024, 1024)
    );
    assert_eq!(c.hostname.as_deref(), Some("runc"));
    assert_eq!(
        mount_types(&c.mounts),
        [
            ("/proc", "proc"),
            ("/dev", "tmpfs"),
            ("/dev/pts", "devpts"),
            ("/dev/shm", "tmpfs"),
            ("/dev/mqueue", "mqueue"),
            ("/sys", "sysfs"),
            ("/sys/fs/cgroup", "cgroup2"),
        ]
    );
    let cg = &c.mounts[6];
    assert_eq!(cg.options, ["nosuid", "noexec", "nodev", "relatime", "ro"]);
    assert_eq!(c.resources, Resources::default());
    for field in ["linux.namespaces", "linux.resources.devices"] {
        assert!(has(&c.ignored, field), "{field} not in {:#?}", c.ignored);
    }
    // Applied in the guest now, as runc applies them.
    for field in [
        "process.capabilities",
        "linux.maskedPaths",
        "linux.readonlyPaths",
    ] {
        assert!(!has(&c.ignored, field), "{field} in {:#?}", c.ignored);
    }
    // CAP_AUDIT_WRITE (29), CAP_KILL (5), CAP_NET_BIND_SERVICE (10); no inheritable set.
    let default = (1 << 29) | (1 << 5) | (1 << 10);
    assert_eq!(
        c.process.capabilities,
        Some(agent_protocol::Capabilities {
            bounding: default,
            effective: default,
            permitted: default,
            inheritable: 0,
            ambient: default,
        })
    );
    assert_eq!(c.masked_paths.len(), 10);
    assert_eq!(c.masked_paths[2], "/proc/kcore");
    assert_eq!(
        c.readonly_paths,
        [
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger"
        ]
    );
}

#[test]
fn test_runc_rootless_spec_sys_bind_becomes_sysfs() {
    let b = TestBundle::new();
    b.write(&fixture("runc-rootless.json"));
    let c = b.load().unwrap().config;
    let sys = c.mounts.iter().find(|m| m.destination == "/sys").unwrap();
    assert_eq!(sys.fs_type, "sysfs");
    assert_eq!(sys.source, "sysfs");
    assert_eq!(sys.options, ["nosuid", "noexec", "nodev", "ro"]);
    assert!(
        has(&c.ignored, "mount /sys: bind of host /sys"),
        "{:#?}",
        c.ignored
    );
    assert!(has(&c.ignored, "linux.uidMappings"));
    assert!(
        has(&c.ignored, "linux.namespaces (pid, ipc, uts, mnt, user)")
            || has(&c.ignored, "linux.namespaces")
    );
}

#[test]
fn test_containerd_spec_resources_and_mounts() {
    let b = TestBundle::new();
    b.write(&fixture("containerd-ctr.json"));
    let c = b.load().unwrap().config;
    assert!(!c.readonly);
    assert_eq!(c.process.user.additional_gids, [0, 10]);
    // 256 MiB + 64 MiB guest overhead; quota 1.5 CPUs -> 2 vCPUs.
    assert_eq!(
        c.resources,
        Resources {
            mem_mib: Some(320),
            vcpus: Some(2)
        }
    );
    assert_eq!(
        mount_types(&c.mounts).last(),
        Some(&("/sys/fs/cgroup", "cgroup2"))
    );
    assert!(
        c.mounts
            .iter()
            .any(|m| m.destination == "/run" && m.fs_type == "tmpfs")
    );
    assert_eq!(
        c.annotations
            .get("io.containerd.image.name")
            .map(String::as_str),
        Some("docker.io/library/busybox:latest")
    );
    assert_eq!(c.cgroups_path.as_deref(), Some("/default/demo"));
    let field = "linux.resources.cpu.shares";
    assert!(has(&c.ignored, field), "{field} not in {:#?}", c.ignored);
    // containerd's default profile is compiled for the guest.
    let sc = c.seccomp.as_ref().expect("seccomp program");
    assert!(!sc.filters.is_empty());
    let caps = c.process.capabilities.expect("capabilities");
    // Docker's default 14, bounding = effective = permitted, no ambient.
    assert_eq!(caps.bounding.count_ones(), 14);
    assert_eq!(caps.effective, caps.bounding);
    assert_eq!(caps.permitted, caps.bounding);
    assert_eq!(caps.ambient, 0);
    // CAP_CHOWN (0), CAP_SYS_CHROOT (18), no CAP_SYS_ADMIN (21).
    assert_eq!(
        caps.bounding & (1 << 0 | 1 << 18 | 1 << 21),
        1 << 0 | 1 << 18
    );
}

/// Docker: the network identity binds become file copies, the libnetwork
/// hook is kept (it configures the container's network namespace),
/// everything else of Docker's runs.
#[test]
fn test_docker_spec_loaded_with_network_files_copied() {
    let b = TestBundle::new();
    let mut config = fixture("docker.json");
    // Docker gives an absolute root.path.
    let root = b.path().join("rootfs");
    config["root"]["path"] = root.to_str().unwrap().into();
    b.write(&config);
    let c = b.load().unwrap().config;
    assert_eq!(c.root, root.canonicalize().unwrap());
    assert_eq!(c.process.cwd, "/home/app");
    assert_eq!((c.process.user.uid, c.process.user.gid), (1000, 1000));
    assert_eq!(c.hostname.as_deref(), Some("4e1f0a2b3c4d"));
    assert_eq!(
        c.cgroups_path.as_deref(),
        Some("system.slice:docker:4e1f0a2b3c4d5e6f")
    );
    assert!(
        !c.mounts.iter().any(|m| m.destination.starts_with("/etc/")),
        "{:?}",
        c.mounts
    );
    assert_eq!(c.mounts.len(), 7);
    let dir = "/var/lib/docker/containers/4e1f0a2b3c4d5e6f";
    let copy = |name: &str, destination: &str| FileCopy {
        source: format!("{dir}/{name}").into(),
        destination: destination.into(),
        read_only: false,
    };
    assert_eq!(
        c.files,
        [
            copy("resolv.conf", "/etc/resolv.conf"),
            copy("hostname", "/etc/hostname"),
            copy("hosts", "/etc/hosts"),
        ]
    );
    // Copied, not ignored.
    for field in [
        "mount /etc/resolv.conf",
        "mount /etc/hosts",
        "mount /etc/hostname",
    ] {
        assert!(!has(&c.ignored, field), "{field} in {:#?}", c.ignored);
    }
    // The request the bundle makes carries no contents: the runtime reads them at create.
    let req = c.run_request(RootfsSource::Block {
        device: "/dev/vdb".into(),
        fs: None,
    });
    assert!(req.files.is_empty());
    // 512 MiB + 64; quota 2.5 CPUs -> 3, cpuset 0-1 -> 2: the smaller.
    assert_eq!(
        c.resources,
        Resources {
            mem_mib: Some(576),
            vcpus: Some(2)
        }
    );
    assert_eq!(c.hooks.prestart.len(), 1);
    assert_eq!(c.hooks.prestart[0].path.to_str(), Some("/proc/4242/exe"));
    assert!(
        c.hooks.prestart[0]
            .args
            .iter()
            .any(|a| a == "libnetwork-setkey")
    );
    assert_eq!(c.network, oci_bundle::Network::New);
    for field in [
        "linux.sysctl net.ipv4.ip_unprivileged_port_start",
        "linux.sysctl net.ipv4.ping_group_range",
        "process.apparmorProfile",
        "process.oomScoreAdj",
        "linux.resources.memory.swap",
        "linux.resources.blockIO",
    ] {
        assert!(has(&c.ignored, field), "{field} not in {:#?}", c.ignored);
    }
}

#[test]
fn test_docker_spec_volume_bind_shared() {
    let b = TestBundle::new();
    let mut config = fixture("docker.json");
    config["root"]["path"] = "rootfs".into();
    config["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": "/data", "type": "bind", "source": "/srv/data",
            "options": ["rbind", "rprivate"]
        }));
    b.write(&config);
    let c = b.load().unwrap().config;
    assert_eq!(c.shares.len(), 1);
    assert_eq!(c.shares[0].source.to_str(), Some("/srv/data"));
    assert!(!c.shares[0].read_only);
    let m = c.mounts.last().unwrap();
    assert_eq!(
        (m.destination.as_str(), m.source.as_str()),
        ("/data", "/run/kata-snap/shared/0")
    );
}

/// nerdctl and CRI write the same binds with other options: `ro` makes a
/// read-only copy, a relative source is the bundle's, a later bind on the same
/// file wins; a bind of the same file with no source is refused (a host file
/// elsewhere is shared).
#[test]
fn test_network_file_binds_read_only_relative_and_repeated() {
    let b = TestBundle::new();
    let mut config = fixture("docker.json");
    config["root"]["path"] = "rootfs".into();
    let mounts = config["mounts"].as_array_mut().unwrap();
    mounts.retain(|m| !m["destination"].as_str().unwrap().starts_with("/etc/"));
    mounts.extend([
        serde_json::json!({
            "destination": "/etc/hosts", "type": "bind", "source": "/run/old/hosts",
            "options": ["rbind", "rprivate"]
        }),
        serde_json::json!({
            "destination": "/etc/resolv.conf", "type": "bind", "source": "net/resolv.conf",
            "options": ["rbind", "ro", "nosuid"]
        }),
        serde_json::json!({
            "destination": "/etc/hosts/", "source": "/run/new/hosts",
            "options": ["bind", "ro", "rw"]
        }),
    ]);
    b.write(&config);
    let c = b.load().unwrap().config;
    let dir = b.path().canonicalize().unwrap();
    assert_eq!(
        c.files,
        [
            FileCopy {
                source: dir.join("net/resolv.conf"),
                destination: "/etc/resolv.conf".into(),
                read_only: true,
            },
            FileCopy {
                source: "/run/new/hosts".into(),
                destination: "/etc/hosts".into(),
                read_only: false,
            },
        ]
    );
    assert!(
        has(
            &c.ignored,
            "mount /etc/hosts (bind of host /run/old/hosts): hidden"
        ),
        "{:#?}",
        c.ignored
    );
    assert!(!c.mounts.iter().any(|m| m.destination.starts_with("/etc")));

    // A bind with no source is refused.
    let mut config = fixture("docker.json");
    config["root"]["path"] = "rootfs".into();
    config["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": "/etc/hosts", "type": "bind", "source": "",
            "options": ["rbind"]
        }));
    b.write(&config);
    let e = b.refused();
    assert!(
        matches!(&e, ConfigError::HostBind { destination: d, .. } if d == "/etc/hosts"),
        "{e}"
    );
}

/// Every fixture's request passes the agent's own validation, on both kinds
/// of rootfs source.
#[test]
fn test_fixtures_run_request_round_trips_through_validate() {
    for name in [
        "runc-default.json",
        "runc-rootless.json",
        "containerd-ctr.json",
        "docker.json",
    ] {
        let b = TestBundle::new();
        let mut config = fixture(name);
        config["root"]["path"] = "rootfs".into();
        b.write(&config);
        let c = b.load().unwrap().config;
        for source in [
            RootfsSource::Block {
                device: "/dev/vdb".into(),
                fs: Some(agent_protocol::FsType::Erofs),
            },
            RootfsSource::Directory {
                path: c.root.to_str().unwrap().into(),
            },
        ] {
            let req = c.run_request(source.clone());
            req.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(req.rootfs.source, source);
            assert_eq!(req.rootfs.readonly, c.readonly);
            assert_eq!(req.process.args, c.process.args);
            assert_eq!(req.mounts, c.mounts);
            assert_eq!(req.hostname, c.hostname);
            // Through the wire format and back.
            let msg = agent_protocol::HostMessage::Run(Box::new(req));
            let bytes = agent_protocol::encode_message(&msg).unwrap();
            let back: agent_protocol::HostMessage =
                agent_protocol::decode_message(&bytes[4..]).unwrap();
            assert_eq!(back, msg);
        }
    }
}
