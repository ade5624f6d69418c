//! A real engine: Docker (dockerd, started by the test with its own containerd) runs an
//! imported busybox image with kata-snap as a registered runtime (`--add-runtime`), beside
//! runc, Docker's default: `docker run` (output, status, stdin) and `docker exec` (output,
//! status, stdin, into a running container), then `docker rm -f`; the /etc/hostname,
//! /etc/hosts and /etc/resolv.conf Docker binds (copied by kata-snap), one of them read-only.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{BIN, Output, collect, run_command};
use crate::guest::*;
use crate::runtime::*;

const DOCKERD: &str = "/usr/sbin/dockerd";
const DOCKER: &str = "/usr/bin/docker";
const IMAGE: &str = "ks-busybox:latest";

/// What one runtime gave for each step.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    run: (String, i32),
    run_stdin: (String, i32),
    exec: (String, i32),
    exec_stdin: (String, i32),
    rm: i32,
    /// Docker's /etc/hostname, a `-v` read-only /etc/hosts, its /etc/resolv.conf.
    files: (String, i32),
}

#[test]
fn test_docker_runs_and_execs_through_kata_snap_as_with_runc() {
    let Some(art) = setup() else { return };
    for b in [DOCKERD, DOCKER, "/usr/bin/containerd"] {
        if !Path::new(b).exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must provide Docker in the rig (scripts/install-deps.sh, scripts/rig/rung4.sh)"
            );
            println!("SKIPPED: {b} missing (apt-get install docker.io)");
            return;
        }
    }
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let d = dir.path();
    let sock = d.join("docker.sock");
    let host = format!("unix://{}", sock.display());
    step("start dockerd");
    // No network set-up (no iptables, no bridge: the containers use --network none), the vfs
    // storage driver (works on any filesystem), cgroupfs.
    let mut daemon = Command::new(DOCKERD)
        .arg("--data-root")
        .arg(d.join("root"))
        .arg("--exec-root")
        .arg(d.join("exec"))
        .arg("--pidfile")
        .arg(d.join("docker.pid"))
        .arg("-H")
        .arg(&host)
        .args([
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
            "--storage-driver=vfs",
            "--exec-opt",
            "native.cgroupdriver=cgroupfs",
        ])
        .arg("--add-runtime")
        .arg(format!("kata-snap={BIN}"))
        .env("KATA_SNAP_CONFIG", &e.config)
        .env("KATA_SNAP_DATA_DIR", &e.data)
        // The rig's root is an initramfs, where runc's pivot_root fails: Docker's switch for
        // that makes its runtimes run with --no-pivot (kata-snap accepts and ignores it).
        .env("DOCKER_RAMDISK", "1")
        .stdin(Stdio::null())
        .stdout(fs::File::create(d.join("dockerd.log")).unwrap())
        .stderr(fs::File::create(d.join("dockerd.err")).unwrap())
        .spawn()
        .unwrap();
    let logs = || {
        format!(
            "\ndockerd: {}",
            fs::read_to_string(d.join("dockerd.err"))
                .unwrap_or_default()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    };
    let docker = || {
        let mut c = Command::new(DOCKER);
        c.arg("-H").arg(&host);
        c
    };
    let end = Instant::now() + T;
    while run_it(docker(), &["version"]).code() != 0 {
        assert!(Instant::now() < end, "dockerd did not come up{}", logs());
        std::thread::sleep(Duration::from_millis(300));
    }
    let rootfs = busybox_tree(&d.join("image-rootfs"));
    let tar = d.join("rootfs.tar");
    let o = run_command(
        {
            let mut c = Command::new("tar");
            c.arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg(".");
            c
        },
        T,
    );
    assert_eq!(o.code(), 0, "tar: {o:?}");
    let o = run_it(docker(), &["import", tar.to_str().unwrap(), IMAGE]);
    assert_eq!(o.code(), 0, "docker import: {o:?}{}", logs());

    let with_stdin = |args: &[&str], input: &[u8]| -> Output {
        let mut c = docker();
        c.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        collect(child, T, &args.join(" "))
    };
    let mut seen = Vec::new();
    for runtime in ["kata-snap", "runc"] {
        step(format!("docker with runtime {runtime}"));
        let base = ["--runtime", runtime, "--network", "none"];
        let t0 = Instant::now();
        let mut args = vec!["run", "--rm"];
        args.extend(base);
        args.extend([IMAGE, "sh", "-c", "echo from docker; echo err >&2; exit 3"]);
        let run = run_it(docker(), &args);
        measure(&format!("docker_run_{runtime}"), ms_since(t0));
        assert!(run.stderr.contains("err"), "{runtime}: {run:?}{}", logs());

        let mut args = vec!["run", "--rm", "-i"];
        args.extend(base);
        args.extend([IMAGE, "sh", "-c", "cat; echo done"]);
        let run_stdin = with_stdin(&args, b"hi\n");

        let mut args = vec!["run", "-d", "--name", "d2"];
        args.extend(base);
        args.extend([IMAGE, "sleep", "600"]);
        let o = run_it(docker(), &args);
        assert_eq!(o.code(), 0, "{runtime}: {o:?}{}", logs());
        let t0 = Instant::now();
        let exec = run_it(
            docker(),
            &["exec", "d2", "sh", "-c", "echo from exec; exit 4"],
        );
        measure(&format!("docker_exec_{runtime}"), ms_since(t0));
        let exec_stdin = with_stdin(&["exec", "-i", "d2", "sh", "-c", "cat; echo done"], b"in\n");
        let rm = run_it(docker(), &["rm", "-f", "d2"]);
        // Docker binds its own hostname and resolv.conf, and the user's hosts (`-v ...:ro`
        // replaces Docker's): kata-snap copies them in, the hosts read-only.
        let hosts = d.join("hosts");
        fs::write(&hosts, "127.0.0.1 mine\n").unwrap();
        let volume = format!("{}:/etc/hosts:ro", hosts.display());
        let mut args = vec!["run", "--rm", "--hostname", "ks-host", "-v", &volume];
        args.extend(base);
        args.extend([
            IMAGE,
            "sh",
            "-c",
            "cat /etc/hostname /etc/hosts; test -e /etc/resolv.conf && echo resolv; \
             echo x >> /etc/hosts 2>/dev/null || echo hosts-ro; \
             echo y >> /etc/hostname && echo hostname-rw",
        ]);
        let files = run_it(docker(), &args);
        assert_eq!(
            fs::read_to_string(&hosts).unwrap(),
            "127.0.0.1 mine\n",
            "{runtime}"
        );
        seen.push((
            runtime,
            Seen {
                run: (run.stdout.clone(), run.code()),
                run_stdin: (run_stdin.stdout.clone(), run_stdin.code()),
                exec: (exec.stdout.clone(), exec.code()),
                exec_stdin: (exec_stdin.stdout.clone(), exec_stdin.code()),
                rm: rm.code(),
                files: (files.stdout.clone(), files.code()),
            },
        ));
        if runtime == "kata-snap" {
            let want = Seen {
                run: ("from docker\n".into(), 3),
                run_stdin: ("hi\ndone\n".into(), 0),
                exec: ("from exec\n".into(), 4),
                exec_stdin: ("in\ndone\n".into(), 0),
                rm: 0,
                files: (
                    "ks-host\n127.0.0.1 mine\nresolv\nhosts-ro\nhostname-rw\n".into(),
                    0,
                ),
            };
            assert_eq!(seen[0].1, want, "{}", logs());
            // Nothing is left in Docker's runtime state for kata-snap.
            let ps = run_it(docker(), &["ps", "-aq"]);
            assert_eq!(ps.stdout.trim(), "", "{ps:?}");
        }
    }
    if let [(_, ks), (_, runc)] = &seen[..] {
        assert_eq!(ks, runc, "kata-snap vs runc");
    }
    // SIGTERM: dockerd stops the containerd it started (SIGKILL would leave it running).
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    if crate::common::wait_deadline(&mut daemon, Duration::from_secs(60)).is_none() {
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
}
