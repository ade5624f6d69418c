//! Field by field: what is honoured, ignored or refused.

mod common;

use agent_protocol::Validate;
use common::{TestBundle, minimal};
use oci_bundle::{ConfigError, Network};
use serde_json::json;

fn load_with(edit: impl FnOnce(&mut serde_json::Value)) -> (TestBundle, serde_json::Value) {
    let b = TestBundle::new();
    let mut c = minimal(&["sh"]);
    edit(&mut c);
    b.write(&c);
    (b, c)
}

#[test]
fn test_process_missing_refused() {
    let (b, _) = load_with(|c| {
        c.as_object_mut().unwrap().remove("process");
    });
    assert!(matches!(b.refused(), ConfigError::NoProcess));
}

#[test]
fn test_args_empty_or_missing_refused_with_runc_wording() {
    let (b, _) = load_with(|c| c["process"]["args"] = json!([]));
    let e = b.refused();
    assert!(matches!(e, ConfigError::EmptyArgs));
    assert_eq!(e.to_string(), "args must not be empty");
    let (b, _) = load_with(|c| {
        c["process"].as_object_mut().unwrap().remove("args");
    });
    assert!(matches!(b.refused(), ConfigError::EmptyArgs));
}

#[test]
fn test_root_missing_refused() {
    let (b, _) = load_with(|c| {
        c.as_object_mut().unwrap().remove("root");
    });
    assert!(matches!(b.refused(), ConfigError::NoRoot));
}

#[test]
fn test_oci_version_other_major_refused() {
    let (b, _) = load_with(|c| c["ociVersion"] = "2.0.0".into());
    assert!(matches!(b.refused(), ConfigError::OciVersion(_)));
    let (b, _) = load_with(|c| {
        c.as_object_mut().unwrap().remove("ociVersion");
    });
    assert!(matches!(b.refused(), ConfigError::OciVersion(_)));
    let (b, _) = load_with(|c| c["ociVersion"] = "1.2.1".into());
    b.load().unwrap();
}

#[test]
fn test_cwd_relative_refused() {
    let (b, _) = load_with(|c| c["process"]["cwd"] = "work".into());
    let e = b.refused();
    assert!(matches!(e, ConfigError::RelativeCwd(_)));
    assert!(
        e.to_string()
            .contains("cwd property must be an absolute path")
    );
}

#[test]
fn test_cwd_with_dotdot_refused_by_validation() {
    let (b, _) = load_with(|c| c["process"]["cwd"] = "/a/../b".into());
    assert!(matches!(b.refused(), ConfigError::Invalid(_)));
}

#[test]
fn test_user_and_groups_honoured() {
    let (b, _) = load_with(|c| {
        c["process"]["user"] = json!({"uid": 1000, "gid": 100, "additionalGids": [5, 6]});
    });
    let u = b.load().unwrap().config.process.user;
    assert_eq!((u.uid, u.gid, u.additional_gids), (1000, 100, vec![5, 6]));
}

#[test]
fn test_umask_carried_to_the_agent_and_out_of_range_refused() {
    let (b, _) = load_with(|c| c["process"]["user"]["umask"] = 0o077.into());
    let p = b.load().unwrap().config.process;
    assert_eq!(p.umask, Some(0o077));
    assert_eq!(p.agent_process().umask, Some(0o077));
    let (b, _) = load_with(|_| {});
    assert_eq!(b.load().unwrap().config.process.umask, None);
    let (b, _) = load_with(|c| c["process"]["user"]["umask"] = 0o1777.into());
    let e = b.refused();
    assert!(matches!(e, ConfigError::Umask(0o1777)));
    assert!(e.to_string().contains("0o1777"), "{e}");
}

#[test]
fn test_env_without_equals_refused() {
    let (b, _) = load_with(|c| c["process"]["env"] = json!(["PATH=/bin", "JUNK"]));
    assert!(matches!(b.refused(), ConfigError::Invalid(_)));
}

#[test]
fn test_rlimits_all_oci_names_mapped() {
    let names = [
        "RLIMIT_AS",
        "RLIMIT_CORE",
        "RLIMIT_CPU",
        "RLIMIT_DATA",
        "RLIMIT_FSIZE",
        "RLIMIT_LOCKS",
        "RLIMIT_MEMLOCK",
        "RLIMIT_MSGQUEUE",
        "RLIMIT_NICE",
        "RLIMIT_NOFILE",
        "RLIMIT_NPROC",
        "RLIMIT_RSS",
        "RLIMIT_RTPRIO",
        "RLIMIT_RTTIME",
        "RLIMIT_SIGPENDING",
        "RLIMIT_STACK",
    ];
    let (b, _) = load_with(|c| {
        c["process"]["rlimits"] = names
            .iter()
            .map(|n| json!({"type": n, "soft": 1, "hard": 2}))
            .collect();
    });
    let r = b.load().unwrap().config.process.rlimits;
    assert_eq!(r.len(), names.len());
    for (l, n) in r.iter().zip(names) {
        assert_eq!(Some(l.kind), agent_protocol::RlimitKind::from_oci_name(n));
    }
}

#[test]
fn test_rlimit_soft_above_hard_refused() {
    let (b, _) = load_with(|c| {
        c["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 5}]);
    });
    assert!(matches!(b.refused(), ConfigError::Invalid(_)));
}

#[test]
fn test_terminal_console_size_and_no_new_privileges() {
    let (b, _) = load_with(|c| {
        c["process"]["terminal"] = false.into();
        c["process"]["noNewPrivileges"] = false.into();
        c["process"]["consoleSize"] = json!({"height": 40, "width": 120});
    });
    let p = b.load().unwrap().config.process;
    assert!(!p.terminal && !p.no_new_privileges);
    assert_eq!(
        p.console_size,
        Some(oci_bundle::ConsoleSize {
            rows: 40,
            cols: 120
        })
    );
}

#[test]
fn test_hostname_invalid_refused_empty_is_none() {
    let (b, _) = load_with(|c| c["hostname"] = "bad host!".into());
    assert!(matches!(b.refused(), ConfigError::Invalid(_)));
    let (b, _) = load_with(|c| c["hostname"] = "".into());
    assert_eq!(b.load().unwrap().config.hostname, None);
}

#[test]
fn test_root_readonly_false_when_absent() {
    let (b, _) = load_with(|c| c["root"] = json!({"path": "rootfs"}));
    assert!(!b.load().unwrap().config.readonly);
}

#[test]
fn test_mount_unknown_type_refused_naming_mount() {
    let (b, _) = load_with(|c| {
        c["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/mnt/x", "type": "nfs", "source": "server:/export"
        }));
    });
    let e = b.refused();
    let msg = e.to_string();
    assert!(matches!(e, ConfigError::UnsupportedMountType { .. }));
    assert!(
        msg.contains("mount /mnt/x") && msg.contains("\"nfs\""),
        "{msg}"
    );
}

#[test]
fn test_mount_missing_type_refused() {
    let (b, _) = load_with(|c| {
        c["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/x", "source": "y"}));
    });
    assert!(matches!(
        b.refused(),
        ConfigError::UnsupportedMountType { .. }
    ));
}

#[test]
fn test_host_binds_shared_in_order_each_bound_from_its_share() {
    let (b, _) = load_with(|c| {
        let m = c["mounts"].as_array_mut().unwrap();
        m.push(json!({
            "destination": "/data", "type": "none", "source": "/home/me/data",
            "options": ["rbind", "ro", "nosuid", "rprivate"]
        }));
        m.push(json!({"destination": "/data/tmp", "type": "tmpfs", "source": "tmpfs"}));
        m.push(json!({
            "destination": "/etc/app.conf", "type": "bind", "source": "conf/app.conf",
            "options": ["ro", "rw"]
        }));
    });
    let c = b.load().unwrap().config;
    let dir = b.path().canonicalize().unwrap();
    assert_eq!(
        c.shares,
        [
            oci_bundle::HostShare {
                source: "/home/me/data".into(),
                destination: "/data".into(),
                read_only: true,
                recursive: true,
            },
            oci_bundle::HostShare {
                source: dir.join("conf/app.conf"),
                destination: "/etc/app.conf".into(),
                read_only: false,
                recursive: false,
            },
        ]
    );
    // Each share is bound where its OCI mount was, among the others.
    let tail: Vec<_> = c.mounts[c.mounts.len() - 3..]
        .iter()
        .map(|m| {
            (
                m.destination.as_str(),
                m.fs_type.as_str(),
                m.source.as_str(),
                m.options.clone(),
            )
        })
        .collect();
    assert_eq!(
        tail,
        [
            (
                "/data",
                "bind",
                "/run/kata-snap/shared/0",
                vec!["bind".to_string(), "ro".into(), "nosuid".into()]
            ),
            ("/data/tmp", "tmpfs", "tmpfs", vec![]),
            (
                "/etc/app.conf",
                "bind",
                "/run/kata-snap/shared/1",
                vec!["bind".to_string(), "ro".into(), "rw".into()]
            ),
        ]
    );
    // The agent is asked to mount the shared filesystem there, and the request is valid.
    let req = c.run_request(agent_protocol::RootfsSource::Block {
        device: "/dev/vda".into(),
        fs: None,
    });
    let shared = req.shared_fs.clone().unwrap();
    assert_eq!(
        (shared.tag.as_str(), shared.mount_point.as_str()),
        ("kata-shared", "/run/kata-snap/shared")
    );
    req.validate().unwrap();
}

#[test]
fn test_host_bind_without_source_or_too_many_refused() {
    let (b, _) = load_with(|c| {
        c["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/data", "type": "bind", "options": ["rbind"]
        }));
    });
    let e = b.refused();
    assert!(
        matches!(&e, ConfigError::HostBind { destination, .. } if destination == "/data"),
        "{e}"
    );
    let (b, _) = load_with(|c| {
        let m = c["mounts"].as_array_mut().unwrap();
        for i in 0..=oci_bundle::MAX_SHARES {
            m.push(json!({
                "destination": format!("/v{i}"), "type": "bind", "source": format!("/srv/{i}")
            }));
        }
    });
    let e = b.refused();
    assert!(matches!(e, ConfigError::TooManyShares(_)), "{e}");
}

#[test]
fn test_mount_relative_destination_refused() {
    let (b, _) = load_with(|c| {
        c["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "tmp", "type": "tmpfs", "source": "tmpfs"
        }));
    });
    assert!(matches!(b.refused(), ConfigError::Invalid(_)));
}

#[test]
fn test_cgroup_v1_options_dropped_for_cgroup2() {
    let (b, _) = load_with(|c| {
        c["mounts"][6]["options"] = json!(["ro", "nosuid", "cpu,cpuacct"]);
    });
    let c = b.load().unwrap().config;
    let cg = &c.mounts[6];
    assert_eq!(
        (cg.fs_type.as_str(), cg.source.as_str()),
        ("cgroup2", "cgroup2")
    );
    assert_eq!(cg.options, ["ro", "nosuid"]);
    assert!(c.ignored.iter().any(|i| i.contains("cgroup options")));
}

#[test]
fn test_idmapped_mount_refused() {
    let (b, _) = load_with(|c| {
        c["mounts"][0]["uidMappings"] = json!([{"containerID": 0, "hostID": 1000, "size": 1}]);
        c["mounts"][0]["gidMappings"] = json!([{"containerID": 0, "hostID": 1000, "size": 1}]);
    });
    assert!(matches!(b.refused(), ConfigError::IdmappedMount(_)));
}

#[test]
fn test_hooks_kept_in_order_with_their_fields() {
    let (b, _) = load_with(|c| {
        c["hooks"] = json!({
            "prestart": [{"path": "/bin/pre"}],
            "createRuntime": [
                {"path": "/usr/local/bin/nerdctl",
                 "args": ["nerdctl", "internal", "oci-hook", "createRuntime"],
                 "env": ["A=1"], "timeout": 5},
                {"path": "/bin/second"}
            ],
            "createContainer": [{"path": "/bin/cc"}],
            "startContainer": [{"path": "/bin/sc"}],
            "poststart": [{"path": "/bin/ps"}],
            "poststop": [{"path": "/usr/local/bin/cleanup", "args": ["cleanup", "-v"]}]
        });
    });
    let h = b.load().unwrap().config.hooks;
    let order: Vec<_> = h
        .at_create()
        .map(|(k, h)| (k, h.path.to_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        order,
        [
            ("prestart", "/bin/pre".to_string()),
            ("createRuntime", "/usr/local/bin/nerdctl".into()),
            ("createRuntime", "/bin/second".into()),
            ("createContainer", "/bin/cc".into()),
        ]
    );
    let nerdctl = &h.create_runtime[0];
    assert_eq!(nerdctl.args[..2], ["nerdctl", "internal"]);
    assert_eq!(
        (nerdctl.env.as_slice(), nerdctl.timeout),
        (&["A=1".to_string()][..], Some(5))
    );
    assert_eq!(h.poststop[0].args, ["cleanup", "-v"]);
    assert_eq!(h.start_container[0].path.to_str(), Some("/bin/sc"));
    assert_eq!(h.poststart[0].path.to_str(), Some("/bin/ps"));
    assert!(h.any_at_create());
    let (b, _) = load_with(|c| {
        c["hooks"] = json!({"poststop": [{"path": "/bin/x"}]});
    });
    assert!(!b.load().unwrap().config.hooks.any_at_create());
}

#[test]
fn test_hook_relative_path_or_bad_timeout_refused() {
    let (b, _) = load_with(|c| {
        c["hooks"] = json!({"poststop": [{"path": "bin/cleanup"}]});
    });
    let msg = b.refused().to_string();
    assert!(
        msg.contains("hooks.poststop") && msg.contains("not absolute"),
        "{msg}"
    );
    for t in [0, -3] {
        let (b, _) = load_with(|c| {
            c["hooks"] = json!({"createRuntime": [{"path": "/bin/h", "timeout": t}]});
        });
        let msg = b.refused().to_string();
        assert!(
            msg.contains("hooks.createRuntime: hook /bin/h: timeout")
                && msg.contains("greater than zero"),
            "{msg}"
        );
    }
}

#[test]
fn test_namespace_with_path_refused_but_network() {
    let (b, _) = load_with(|c| {
        c["linux"]["namespaces"][1] = json!({"type": "ipc", "path": "/proc/1/ns/ipc"});
    });
    let msg = b.refused().to_string();
    assert!(msg.contains("ipc namespace at /proc/1/ns/ipc"), "{msg}");

    // The network namespace of Docker, CNI and Kubernetes is joined: its interface goes to the
    // guest.
    let (b, _) = load_with(|c| {
        c["linux"]["namespaces"] =
            json!([{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]);
    });
    assert_eq!(
        b.load().unwrap().config.network,
        Network::Join("/var/run/netns/cni-1".into())
    );
    let (b, _) = load_with(|c| {
        c["linux"]["namespaces"] = json!([{"type": "network", "path": "netns/cni-1"}]);
    });
    let msg = b.refused().to_string();
    assert!(msg.contains("\"netns/cni-1\" is not absolute"), "{msg}");
    // A new one (runc: loopback only), and none at all (runc: the host's; the guest: loopback).
    let (b, _) = load_with(|c| {
        c["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "network"}]);
    });
    assert_eq!(b.load().unwrap().config.network, Network::New);
    let (b, _) = load_with(|c| {
        c["linux"]["namespaces"] = json!([{"type": "pid"}]);
    });
    assert_eq!(b.load().unwrap().config.network, Network::Host);
}

#[test]
fn test_devices_default_ignored_others_refused() {
    let (b, _) = load_with(|c| {
        c["linux"]["devices"] = json!([{"path": "/dev/null", "type": "c", "major": 1, "minor": 3}]);
    });
    b.load().unwrap();
    let (b, _) = load_with(|c| {
        c["linux"]["devices"] = json!([{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]);
    });
    assert!(matches!(b.refused(), ConfigError::Device(d) if d == "/dev/sda"));
}

#[test]
fn test_personality_and_platform_sections_refused() {
    let (b, _) = load_with(|c| c["linux"]["personality"] = json!({"domain": "LINUX32"}));
    assert!(matches!(
        b.refused(),
        ConfigError::UnsupportedLinux("personality")
    ));
    let (b, _) = load_with(|c| c["windows"] = json!({"layerFolders": ["C:\\l"]}));
    assert!(matches!(b.refused(), ConfigError::Platform("windows")));
}

#[test]
fn test_memory_limit_above_max_refused() {
    let (b, _) = load_with(|c| {
        c["linux"]["resources"]["memory"] = json!({"limit": 64_i64 << 30});
    });
    let msg = b.refused().to_string();
    assert!(
        msg.contains("above the largest supported limit of 16320 MiB"),
        "{msg}"
    );
}

#[test]
fn test_bad_cpuset_refused() {
    let (b, _) = load_with(|c| c["linux"]["resources"]["cpu"] = json!({"cpus": "0-x"}));
    assert!(matches!(b.refused(), ConfigError::BadCpuList(_)));
}

#[test]
fn test_cpuset_sizes_vcpus() {
    let (b, _) = load_with(|c| c["linux"]["resources"]["cpu"] = json!({"cpus": "0-3,6"}));
    assert_eq!(b.load().unwrap().config.resources.vcpus, Some(5));
}

#[test]
fn test_load_process_converts_as_config_json_and_refuses_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("process.json");
    let mut p = minimal(&["sh", "-c", "id"])["process"].clone();
    p["env"] = json!(["PATH=/bin", "A=b"]);
    p["cwd"] = json!("/tmp");
    p["user"] = json!({"uid": 1000, "gid": 100, "umask": 0o027});
    p["terminal"] = json!(true);
    std::fs::write(&good, serde_json::to_vec(&p).unwrap()).unwrap();
    let got = oci_bundle::load_process(&good).unwrap();
    assert_eq!(got.args, ["sh", "-c", "id"]);
    assert_eq!(got.env, ["PATH=/bin", "A=b"]);
    assert_eq!(got.cwd, "/tmp");
    assert_eq!((got.user.uid, got.user.gid), (1000, 100));
    assert_eq!(got.umask, Some(0o027));
    assert!(got.terminal);

    p["args"] = json!([]);
    std::fs::write(&good, serde_json::to_vec(&p).unwrap()).unwrap();
    let e = oci_bundle::load_process(&good).unwrap_err().to_string();
    assert!(e.contains("args must not be empty"), "{e}");

    std::fs::write(&good, b"{not json").unwrap();
    assert!(oci_bundle::load_process(&good).is_err());

    // runc's own tests give a process without `user`: uid 0, gid 0, as runc reads it.
    let mut no_user = p.clone();
    no_user.as_object_mut().unwrap().remove("user");
    no_user["args"] = json!(["true"]);
    std::fs::write(&good, serde_json::to_vec(&no_user).unwrap()).unwrap();
    let got = oci_bundle::load_process(&good).unwrap();
    assert_eq!((got.user.uid, got.user.gid), (0, 0));

    // A pipe is read to its end, as a shell's `-p <(...)` gives it (`/dev/fd/63`, a link to
    // the pipe); a FIFO with no writer reads empty (not JSON) instead of blocking.
    p["args"] = json!(["echo", "piped"]);
    let (r, w) = std::io::pipe().unwrap();
    let mut w = w;
    std::io::Write::write_all(&mut w, &serde_json::to_vec(&p).unwrap()).unwrap();
    drop(w);
    let via = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&r));
    let got = oci_bundle::load_process(std::path::Path::new(&via)).unwrap();
    assert_eq!(got.args, ["echo", "piped"]);
    drop(r);
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let e = oci_bundle::load_process(&fifo).unwrap_err().to_string();
    assert!(e.contains("EOF") || e.contains("expected"), "{e}");
    // A device and a directory are refused without being read.
    let e = oci_bundle::load_process(std::path::Path::new("/dev/zero"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("character device"), "{e}");
    assert!(oci_bundle::load_process(dir.path()).is_err());
}

#[test]
fn test_load_process_capabilities_converted_unknown_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("process.json");
    let mut p = minimal(&["sh"])["process"].clone();
    p["capabilities"] = json!({
        "bounding": ["CAP_SYS_ADMIN", "CAP_CHECKPOINT_RESTORE", "CAP_NEXT_BIG_THING"],
        "effective": ["CAP_SYS_ADMIN"],
        "permitted": ["CAP_SYS_ADMIN"],
        "inheritable": [],
        "ambient": ["CAP_CHOWN"]
    });
    std::fs::write(&file, serde_json::to_vec(&p).unwrap()).unwrap();
    let c = oci_bundle::load_process(&file)
        .unwrap()
        .capabilities
        .unwrap();
    assert_eq!(c.bounding, 1 << 21 | 1 << 40);
    assert_eq!((c.effective, c.permitted), (1 << 21, 1 << 21));
    assert_eq!((c.inheritable, c.ambient), (0, 1));
    // Without capabilities, none (exec then gives the container's).
    p.as_object_mut().unwrap().remove("capabilities");
    std::fs::write(&file, serde_json::to_vec(&p).unwrap()).unwrap();
    assert_eq!(oci_bundle::load_process(&file).unwrap().capabilities, None);
}

#[test]
fn test_masked_and_readonly_paths_reach_the_run_request() {
    let (b, _) = load_with(|c| {
        c["linux"]["maskedPaths"] = json!(["/testfile", "/testdir"]);
        c["linux"]["readonlyPaths"] = json!(["/proc/sys"]);
    });
    let config = b.load().unwrap().config;
    let req = config.run_request(agent_protocol::RootfsSource::Block {
        device: "/dev/vdb".into(),
        fs: None,
    });
    assert_eq!(req.masked_paths, ["/testfile", "/testdir"]);
    assert_eq!(req.readonly_paths, ["/proc/sys"]);
    assert!(
        !config.ignored.iter().any(|i| i.contains("Paths")),
        "{:#?}",
        config.ignored
    );
}

#[test]
fn test_masked_path_relative_refused() {
    let (b, _) = load_with(|c| c["linux"]["maskedPaths"] = json!(["testfile"]));
    let e = b.load().unwrap_err().to_string();
    assert!(e.contains("masked path"), "{e}");
}

#[test]
fn test_capability_numbers_are_the_kernels() {
    for (name, n) in [
        ("CAP_CHOWN", 0),
        ("CAP_KILL", 5),
        ("CAP_NET_BIND_SERVICE", 10),
        ("CAP_SYS_ADMIN", 21),
        ("CAP_AUDIT_WRITE", 29),
        ("CAP_AUDIT_READ", 37),
        ("CAP_CHECKPOINT_RESTORE", 40),
    ] {
        assert_eq!(oci_bundle::capability_number(name), Some(n), "{name}");
    }
    assert_eq!(oci_bundle::capability_number("CAP_NOPE"), None);
    assert_eq!(oci_bundle::capability_number("kill"), None);
}
