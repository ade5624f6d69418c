//! OCI process configuration: env, cwd, user, hostname, rlimits,
//! no_new_privileges, rootfs overlay and mounts.

mod common;

use agent_protocol::{ErrorKind, Mount, Rlimit, RlimitKind, User};
use common::{Agent, err, out};

#[test]
fn test_config_env_exactly_as_requested_plus_home() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["env"]);
    req.process.env = vec!["PATH=/bin".into(), "FOO=bar baz".into(), "EMPTY=".into()];
    let o = agent.run_req(req, None).unwrap();
    let text = out(&o);
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    // Without HOME in the request, runc adds it from /etc/passwd.
    assert_eq!(
        lines,
        vec!["EMPTY=", "FOO=bar baz", "HOME=/root", "PATH=/bin"]
    );
}

#[test]
fn test_config_path_from_env_used_for_lookup() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["echo", "x"]);
    req.process.env = vec!["PATH=/nonexistent".into()];
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 127);
    assert_eq!(o.error.unwrap().0, ErrorKind::ExecNotFound);
}

#[test]
fn test_config_cwd_applied() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["pwd"]);
    req.process.cwd = "/tmp".into();
    assert_eq!(out(&agent.run_req(req, None).unwrap()), "/tmp\n");
}

#[test]
fn test_config_cwd_missing_created_and_private_dir_entered_before_the_user_as_runc() {
    require_harness!();
    let agent = Agent::start();
    // A working directory the image lacks is created (runc's prepareRootfs).
    let mut req = agent.request(&["pwd"]);
    req.process.cwd = "/work/new/dir".into();
    assert_eq!(out(&agent.run_req(req, None).unwrap()), "/work/new/dir\n");
    // A root-only directory as the cwd of another user: entered as root before the user is
    // set, as runc does (the process then runs there, unable to list it).
    let private = agent.rootfs.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let mut req = agent.request(&["sh", "-c", "pwd; ls . >/dev/null 2>&1 || echo denied"]);
    req.process.cwd = "/private".into();
    req.process.user = User {
        uid: 1000,
        gid: 1000,
        additional_gids: vec![],
    };
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 0, "{}", err(&o));
    assert_eq!(out(&o), "/private\ndenied\n");
}

#[test]
fn test_config_uid_gid_groups_applied() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["sh", "-c", "id -u; id -g; id -G"]);
    req.process.user = User {
        uid: 1000,
        gid: 1000,
        additional_gids: vec![2000, 3000],
    };
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 0, "{}", err(&o));
    let text = out(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(lines[1], "1000");
    let mut groups: Vec<&str> = lines[2].split_whitespace().collect();
    groups.sort();
    assert_eq!(groups, vec!["1000", "2000", "3000"]);
}

#[test]
fn test_config_non_root_cannot_write_root_owned_dir() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["sh", "-c", "touch /etc/x"]);
    req.process.user = User {
        uid: 1000,
        gid: 1000,
        additional_gids: vec![],
    };
    let o = agent.run_req(req, None).unwrap();
    assert_ne!(o.code, 0);
    assert!(err(&o).contains("Permission denied"), "{}", err(&o));
}

#[test]
fn test_config_hostname_set() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["hostname"]);
    req.hostname = Some("kata-guest-1".into());
    assert_eq!(out(&agent.run_req(req, None).unwrap()), "kata-guest-1\n");
    // The harness runs in its own UTS namespace: the host keeps its name.
    assert_ne!(nix::unistd::gethostname().unwrap(), "kata-guest-1");
}

#[test]
fn test_config_rlimits_soft_and_hard_applied() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["sh", "-c", "ulimit -Sn; ulimit -Hn; ulimit -Sc"]);
    req.process.rlimits = vec![
        Rlimit {
            kind: RlimitKind::Nofile,
            soft: 123,
            hard: 456,
        },
        Rlimit {
            kind: RlimitKind::Core,
            soft: 0,
            hard: 0,
        },
    ];
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(out(&o), "123\n456\n0\n");
}

#[test]
fn test_config_no_new_privileges_set_only_when_asked() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["grep", "NoNewPrivs", "/proc/self/status"]);
    req.process.no_new_privileges = true;
    assert_eq!(
        out(&agent.run_req(req.clone(), None).unwrap()),
        "NoNewPrivs:\t1\n"
    );
    req.process.no_new_privileges = false;
    assert_eq!(out(&agent.run_req(req, None).unwrap()), "NoNewPrivs:\t0\n");
}

#[test]
fn test_rootfs_overlay_writable_and_lower_untouched() {
    require_harness!();
    let agent = Agent::start();
    let o = agent.run(&[
        "sh",
        "-c",
        "echo hi > /newfile && cat /newfile && rm /etc/hostname && echo rm-ok",
    ]);
    assert_eq!(
        (o.code, out(&o).as_str()),
        (0, "hi\nrm-ok\n"),
        "{}",
        err(&o)
    );
    assert!(
        !agent.rootfs.join("newfile").exists(),
        "write leaked into the lower layer"
    );
    assert!(
        agent.rootfs.join("etc/hostname").exists(),
        "delete leaked into the lower layer"
    );
    // Each run gets a fresh upper layer.
    let o = agent.run(&["cat", "/newfile"]);
    assert_ne!(o.code, 0);
}

#[test]
fn test_rootfs_readonly_refuses_writes() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["sh", "-c", "echo x > /dev/null; echo x > /newfile"]);
    req.rootfs.readonly = true;
    let o = agent.run_req(req, None).unwrap();
    assert_ne!(o.code, 0);
    assert!(err(&o).contains("Read-only file system"), "{}", err(&o));
}

#[test]
fn test_rootfs_readonly_tmpfs_at_missing_dir_works_root_stays_readonly() {
    require_harness!();
    let agent = Agent::start();
    assert!(!agent.rootfs.join("data").exists());
    let mut req = agent.request(&[
        "sh",
        "-c",
        "echo kept > /data/new/f && cat /data/new/f; touch /x || echo touch-failed",
    ]);
    req.rootfs.readonly = true;
    req.mounts.push(Mount {
        destination: "/data/new".into(),
        fs_type: "tmpfs".into(),
        source: "tmpfs".into(),
        options: vec!["size=1m".into()],
    });
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(
        (o.code, out(&o).as_str()),
        (0, "kept\ntouch-failed\n"),
        "{o:?}"
    );
    assert!(err(&o).contains("Read-only file system"), "{}", err(&o));
    assert!(
        !agent.rootfs.join("data").exists(),
        "mount point leaked into the image"
    );
}

/// The `HOME` a process of `uid` sees with `env`.
fn home_of(agent: &Agent, uid: u32, env: &[&str]) -> String {
    let mut req = agent.request(&["sh", "-c", "echo \"$HOME\""]);
    req.process.env = env.iter().map(|s| s.to_string()).collect();
    req.process.user = User {
        uid,
        gid: uid,
        additional_gids: vec![],
    };
    out(&agent.run_req(req, None).unwrap())
}

#[test]
fn test_home_from_passwd_when_env_has_none() {
    require_harness!();
    let agent = Agent::start();
    assert_eq!(home_of(&agent, 0, &["PATH=/bin"]), "/root\n");
    assert_eq!(home_of(&agent, 1001, &["PATH=/bin"]), "/home/app\n");
    assert_eq!(home_of(&agent, 4242, &["PATH=/bin"]), "/\n");
    // An empty HOME counts as none, as in runc.
    assert_eq!(
        home_of(&agent, 1001, &["PATH=/bin", "HOME="]),
        "/home/app\n"
    );
}

#[test]
fn test_home_explicit_kept() {
    require_harness!();
    let agent = Agent::start();
    assert_eq!(
        home_of(&agent, 1001, &["PATH=/bin", "HOME=/custom"]),
        "/custom\n"
    );
}

#[test]
fn test_home_without_passwd_file_is_slash() {
    require_harness!();
    let agent = Agent::start();
    std::fs::remove_file(agent.rootfs.join("etc/passwd")).unwrap();
    assert_eq!(home_of(&agent, 0, &["PATH=/bin"]), "/\n");
}

#[test]
fn test_umask_027_files_created_0640_default_0644() {
    require_harness!();
    let agent = Agent::start();
    let script = "umask; touch /tmp/f; stat -c %a /tmp/f";
    let mut req = agent.request(&["sh", "-c", script]);
    req.process.umask = Some(0o027);
    assert_eq!(out(&agent.run_req(req, None).unwrap()), "0027\n640\n");
    assert_eq!(out(&agent.run(&["sh", "-c", script])), "0022\n644\n");
}

#[test]
fn test_home_and_umask_applied_to_exec_too() {
    require_harness!();
    let agent = Agent::start();
    let _init = agent.start_init(&["sleep", "300"]);
    let mut req = agent.exec_request("e", &["sh", "-c", "echo $HOME; umask"]);
    req.process.env = vec!["PATH=/bin".into()];
    req.process.user.uid = 1001;
    req.process.umask = Some(0o077);
    let o = agent.exec_req(req, None).unwrap();
    assert_eq!(out(&o), "/home/app\n0077\n");
}

#[test]
fn test_mounts_tmpfs_with_options_applied() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["grep", " /scratch ", "/proc/mounts"]);
    req.mounts.push(Mount {
        destination: "/scratch".into(),
        fs_type: "tmpfs".into(),
        source: "tmpfs".into(),
        options: ["nosuid", "nodev", "size=1m", "mode=750"]
            .map(String::from)
            .to_vec(),
    });
    let o = agent.run_req(req, None).unwrap();
    let line = out(&o);
    assert!(
        line.starts_with("tmpfs /scratch tmpfs rw,nosuid,nodev"),
        "{line:?}"
    );
    assert!(
        line.contains("size=1024k") && line.contains("mode=750"),
        "{line:?}"
    );
}

#[test]
fn test_mounts_cgroup2_read_only_applied() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["grep", " /sys/fs/cgroup ", "/proc/mounts"]);
    req.mounts.push(Mount {
        destination: "/sys/fs/cgroup".into(),
        fs_type: "cgroup2".into(),
        source: "cgroup2".into(),
        options: ["nosuid", "noexec", "nodev", "relatime", "ro"]
            .map(String::from)
            .to_vec(),
    });
    let o = agent.run_req(req, None).unwrap();
    let line = out(&o);
    assert!(
        line.starts_with("cgroup2 /sys/fs/cgroup cgroup2 ro,nosuid,nodev,noexec,relatime"),
        "{line:?} {}",
        err(&o)
    );
}

#[test]
fn test_mounts_default_devices_present() {
    require_harness!();
    let agent = Agent::start();
    let o = agent.run(&[
        "sh",
        "-c",
        "echo gone > /dev/null && head -c 4 /dev/zero | od -An -tx1",
    ]);
    assert_eq!(o.code, 0, "{}", err(&o));
    assert_eq!(out(&o).trim(), "00 00 00 00");
}

#[test]
fn test_mounts_destination_through_absolute_symlink_resolved_in_the_root() {
    require_harness!();
    let agent = Agent::start();
    // runc's mounts.bats: /conf -> /real/conf (absolute, the container's), a tmpfs on
    // /conf/stack lands on /real/conf/stack inside the root.
    std::fs::create_dir_all(agent.rootfs.join("real/conf")).unwrap();
    std::os::unix::fs::symlink("/real/conf", agent.rootfs.join("conf")).unwrap();
    let mut req = agent.request(&[
        "sh",
        "-c",
        "ls -ld /conf/stack/ | cut -c1-10; grep -c ' /real/conf/stack tmpfs ' /proc/mounts",
    ]);
    req.mounts.push(Mount {
        destination: "/conf/stack".into(),
        fs_type: "tmpfs".into(),
        source: "tmpfs".into(),
        options: ["ro", "relatime"].map(String::from).to_vec(),
    });
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 0, "{}", err(&o));
    assert_eq!(
        out(&o).split_whitespace().collect::<Vec<_>>(),
        ["drwxrwxrwt", "1"]
    );
}

#[test]
fn test_mounts_destination_symlink_loop_refused() {
    require_harness!();
    let agent = Agent::start();
    std::os::unix::fs::symlink("l2", agent.rootfs.join("l1")).unwrap();
    std::os::unix::fs::symlink("l1", agent.rootfs.join("l2")).unwrap();
    let mut req = agent.request(&["true"]);
    req.mounts.push(Mount {
        destination: "/l1/x".into(),
        fs_type: "tmpfs".into(),
        source: "tmpfs".into(),
        options: vec![],
    });
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 126);
    let (kind, msg) = o.error.unwrap();
    assert_eq!(kind, ErrorKind::Rootfs);
    assert!(msg.contains("symbolic links"), "{msg}");
    assert!(o.pid.is_none());
}

#[test]
fn test_mounts_read_only_dev_before_its_mount_points() {
    require_harness!();
    let agent = Agent::start();
    // runc's mounts.bats: the /dev tmpfs read-only, the /dev/pts and /dev/shm mount points
    // made in it afterwards, the default devices too; /dev ends read-only.
    let mut req = agent.request(&[
        "sh",
        "-c",
        "grep '^tmpfs /dev ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1; ls -d /dev/pts /dev/shm; echo x > /dev/null && echo null-ok; touch /dev/f 2>/dev/null || echo ro",
    ]);
    let tmpfs = |dest: &str, o: &[&str]| Mount {
        destination: dest.into(),
        fs_type: "tmpfs".into(),
        source: "tmpfs".into(),
        options: o.iter().map(|s| s.to_string()).collect(),
    };
    req.mounts.push(tmpfs(
        "/dev",
        &["nosuid", "strictatime", "mode=755", "size=65536k", "ro"],
    ));
    req.mounts.push(Mount {
        destination: "/dev/pts".into(),
        fs_type: "devpts".into(),
        source: "devpts".into(),
        options: [
            "nosuid",
            "noexec",
            "newinstance",
            "ptmxmode=0666",
            "mode=0620",
        ]
        .map(String::from)
        .to_vec(),
    });
    req.mounts.push(tmpfs(
        "/dev/shm",
        &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
    ));
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 0, "{}", err(&o));
    assert_eq!(
        out(&o).split_whitespace().collect::<Vec<_>>(),
        ["ro", "/dev/pts", "/dev/shm", "null-ok", "ro"]
    );
}

#[test]
fn test_rootfs_missing_directory_reported() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["true"]);
    req.rootfs.source = agent_protocol::RootfsSource::Directory {
        path: "/nonexistent/rootfs".into(),
    };
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 126);
    assert_eq!(o.error.unwrap().0, ErrorKind::Rootfs);
}

#[test]
fn test_terminal_belongs_to_the_process_user() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["sh", "-c", "stat -L -c %u /proc/self/fd/0"]);
    req.process.terminal = true;
    req.process.user = User {
        uid: 1000,
        gid: 100,
        additional_gids: vec![],
    };
    let o = agent.run_req(req, None).unwrap();
    assert_eq!(o.code, 0, "{} {}", err(&o), out(&o));
    assert_eq!(out(&o).trim(), "1000");
}
