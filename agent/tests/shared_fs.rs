//! `RunRequest::shared_fs` and the binds of host paths it carries: a failed
//! mount of the shared filesystem fails the `Create` with a clear message and
//! leaves nothing mounted; binds of a directory and of a file (onto a path
//! the image lacks) work, `ro` makes them read-only, and a read-only bind
//! keeps the nosuid and nodev of its source's mount (the shared filesystem is
//! mounted nosuid,nodev; the harness has no virtio-fs, so a tmpfs mounted the
//! same way stands for it).

mod common;

use std::fs;
use std::path::Path;

use agent_protocol::{ClientError, ErrorKind, Mount, SharedFs};
use common::{Agent, TestDir, err, out};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};

#[test]
fn test_shared_fs_mount_failure_fails_the_create_clearly() {
    require_harness!();
    let agent = Agent::start();
    let at = agent.dir.path.join("state/shared");
    let mut req = agent.request(&["true"]);
    req.shared_fs = Some(SharedFs {
        tag: "kata-shared".into(),
        mount_point: at.display().to_string(),
    });
    let mut c = agent.client();
    match c.create(req.clone()) {
        Err(ClientError::Agent { kind, message }) => {
            assert_eq!(kind, ErrorKind::Rootfs);
            // This host has no virtio-fs device (or no virtiofs at all).
            let want = format!(
                "cannot mount the shared filesystem kata-shared at {}: ",
                at.display()
            );
            assert!(message.starts_with(&want), "{message}");
        }
        other => panic!("expected the create to fail, got {other:?}"),
    }
    // Nothing of the attempt is left; the connection may Create again.
    assert_eq!(agent.state_mounts(), Vec::<String>::new());
    assert!(c.create(req).is_err());
    drop(c);
    // Without it, the next container runs.
    assert_eq!(agent.run(&["true"]).code, 0);
}

#[test]
fn test_shared_fs_in_a_container_directory_refused() {
    require_harness!();
    let agent = Agent::start();
    let mut req = agent.request(&["true"]);
    req.shared_fs = Some(SharedFs {
        tag: "kata-shared".into(),
        mount_point: agent.dir.path.join("state/c7/share").display().to_string(),
    });
    match agent.client().create(req) {
        Err(ClientError::Agent { kind, message }) => {
            assert_eq!(kind, ErrorKind::Rootfs);
            assert!(message.contains("container's directory"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn bind(source: &Path, destination: &str, options: &[&str]) -> Mount {
    Mount {
        destination: destination.into(),
        fs_type: "bind".into(),
        source: source.display().to_string(),
        options: options.iter().map(|s| s.to_string()).collect(),
    }
}

/// The mount options of `dest` in a mountinfo text.
fn options_of(mountinfo: &str, dest: &str) -> Vec<String> {
    let line = mountinfo
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(dest))
        .unwrap_or_else(|| panic!("no mount at {dest} in:\n{mountinfo}"));
    line.split(' ')
        .nth(5)
        .unwrap()
        .split(',')
        .map(str::to_owned)
        .collect()
}

#[test]
fn test_binds_of_a_directory_and_a_file_from_a_nosuid_share() {
    require_harness!();
    // A mount namespace of this thread's own (the agent spawned from it inherits it), where a
    // nosuid,nodev tmpfs stands for the shared filesystem.
    std::thread::spawn(|| {
        unshare(CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("make / private");
        let share = TestDir::new();
        mount(
            Some("tmpfs"),
            &share.path,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        )
        .expect("tmpfs share");
        binds_in_share(&share.path);
        umount2(&share.path, MntFlags::MNT_DETACH).unwrap();
    })
    .join()
    .expect("the test thread");
}

fn binds_in_share(share: &Path) {
    fs::create_dir(share.join("0")).unwrap();
    fs::write(share.join("0/a.txt"), "in the directory\n").unwrap();
    fs::write(share.join("1"), "a file\n").unwrap();
    let agent = Agent::start();
    let mut req = agent.request(&[
        "sh",
        "-c",
        "cat /data/a.txt /etc/app/config.conf; \
         echo new > /data/b.txt || echo dir-rw-refused; \
         echo x > /data-ro/c.txt || echo dir-ro-refused; \
         echo x > /etc/app/config.conf || echo file-ro-refused; \
         echo y > /work/rw.conf || echo file-rw-refused; \
         test -c /etc/null && echo null-is-a-device; \
         cat /proc/self/mountinfo",
    ]);
    req.mounts.extend([
        bind(&share.join("0"), "/data", &["rbind", "rprivate"]),
        bind(&share.join("0"), "/data-ro", &["rbind", "ro"]),
        // Neither /etc/app nor the file exists in the image.
        bind(&share.join("1"), "/etc/app/config.conf", &["bind", "ro"]),
        bind(&share.join("1"), "/work/rw.conf", &["bind"]),
        bind(Path::new("/dev/null"), "/etc/null", &["bind"]),
    ]);
    let o = match agent.run_req(req, None) {
        Ok(o) => o,
        Err(e) => panic!("run failed: {e}; agent log:\n{}", agent.log()),
    };
    let stdout = out(&o);
    assert_eq!(o.code, 0, "stderr: {}\nlog:\n{}", err(&o), agent.log());
    assert!(stdout.starts_with("in the directory\na file\n"), "{stdout}");
    assert!(!stdout.contains("dir-rw-refused"), "{stdout}");
    assert!(stdout.contains("dir-ro-refused"), "{stdout}");
    assert!(stdout.contains("file-ro-refused"), "{stdout}");
    assert!(!stdout.contains("file-rw-refused"), "{stdout}");
    assert!(stdout.contains("null-is-a-device"), "{stdout}");
    assert!(err(&o).contains("Read-only file system"), "{}", err(&o));
    // The writes through the read-write binds reached the share, the others did not.
    assert_eq!(fs::read_to_string(share.join("0/b.txt")).unwrap(), "new\n");
    assert!(!share.join("0/c.txt").exists());
    assert_eq!(fs::read_to_string(share.join("1")).unwrap(), "y\n");
    // Each bind is read-only as asked and keeps the share's nosuid,nodev.
    for (dest, ro) in [
        ("/data", false),
        ("/data-ro", true),
        ("/etc/app/config.conf", true),
        ("/work/rw.conf", false),
    ] {
        let opts = options_of(&stdout, dest);
        assert_eq!(opts[0], if ro { "ro" } else { "rw" }, "{dest}: {opts:?}");
        for f in ["nosuid", "nodev"] {
            assert!(opts.iter().any(|o| o == f), "{dest}: {opts:?}");
        }
    }
    // The file destination was made in the container's root, not in the image.
    assert!(!agent.rootfs.join("etc/app").exists());
}
