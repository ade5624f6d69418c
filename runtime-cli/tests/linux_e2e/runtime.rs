//! `kata-snap` as an OCI runtime, beside runc on the same busybox bundle: `run` prints the same
//! and exits the same, the create/start/state/kill/delete lifecycle goes through the same
//! states, a terminal through `--console-socket` works, the first container warms the template
//! and the next ones restore it, and 20 containers at once are all correct.

use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::{BIN, Output, collect, run_command, wait_deadline};
use crate::guest::*;

const RUNC: &str = "/usr/sbin/runc";
const T: Duration = Duration::from_secs(240);

/// Where kata-snap keeps templates and images for these tests, and its config naming the
/// guest under test.
struct Env {
    data: PathBuf,
    config: PathBuf,
    dir: PathBuf,
}

fn env(art: &Artifacts) -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ks-runtime-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.json");
        fs::write(
            &config,
            serde_json::json!({"kernel": art.kernel, "initramfs": art.initramfs}).to_string(),
        )
        .unwrap();
        Env {
            data: dir.join("data"),
            config,
            dir,
        }
    })
}

fn runc_present() -> bool {
    if Path::new(RUNC).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must provide runc in the rig (scripts/rig/rung4.sh packs it)"
    );
    println!("SKIPPED (runc part): {RUNC} missing");
    false
}

/// A busybox bundle whose process is `sh -c SCRIPT`.
fn bundle(dir: &Path, name: &str, script: &str, terminal: bool) -> PathBuf {
    bundle_args(dir, name, &["/bin/sh", "-c", script], terminal)
}

/// A busybox bundle whose process is `args`.
fn bundle_args(dir: &Path, name: &str, args: &[&str], terminal: bool) -> PathBuf {
    let b = dir.join(name);
    busybox_tree(&b.join("rootfs"));
    let o = run_command(
        {
            let mut c = Command::new(BIN);
            c.args(["spec", "--bundle"]).arg(&b);
            c
        },
        T,
    );
    assert_eq!(o.code(), 0, "{o:?}");
    let mut spec: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(b.join("config.json")).unwrap()).unwrap();
    spec["process"]["args"] = serde_json::json!(args);
    spec["process"]["terminal"] = terminal.into();
    spec["process"]["env"] = serde_json::json!(["PATH=/bin", "TERM=xterm"]);
    fs::write(b.join("config.json"), spec.to_string()).unwrap();
    b
}

fn ks_cmd(e: &Env, root: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env("KATA_SNAP_CONFIG", &e.config)
        .env("KATA_SNAP_DATA_DIR", &e.data)
        .arg("--root")
        .arg(root);
    c
}

/// Makes a runtime's command line (its binary and `--root`).
type CommandMaker<'a> = Box<dyn Fn() -> Command + 'a>;

fn runc_cmd(root: &Path) -> Command {
    let mut c = Command::new(RUNC);
    c.arg("--root").arg(root);
    c
}

fn run_it(mut c: Command, args: &[&str]) -> Output {
    c.args(args);
    step(format!("{:?}", c.get_args().collect::<Vec<_>>()));
    run_command(c, T)
}

#[test]
fn test_run_matches_runc_output_and_exit_codes() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let runc = runc_present();
    for (name, args) in [
        (
            "ok",
            &[
                "sh",
                "-c",
                "echo hello; echo to-stderr >&2; cat /etc/hostname",
            ][..],
        ),
        ("seven", &["sh", "-c", "echo before; exit 7"]),
        ("missing", &["sh", "-c", "no-such-command"]),
        ("env", &["sh", "-c", "echo $PATH; pwd; id -u; hostname"]),
        // Not found by `create` itself: no process, exit 1 and runc's message.
        ("not-found", &["no-such-command"]),
    ] {
        let b = bundle_args(dir.path(), name, args, false);
        let t0 = Instant::now();
        let ours = run_it(
            ks_cmd(e, &dir.path().join("ks")),
            &["run", "--no-pivot", "--bundle", b.to_str().unwrap(), name],
        );
        measure(&format!("kata-snap_run_{name}"), ms_since(t0));
        if runc {
            let t0 = Instant::now();
            let theirs = run_it(
                runc_cmd(&dir.path().join("runc")),
                // The L1 rig's root is an initramfs, where pivot_root fails: runc needs --no-pivot
                // there (kata-snap accepts it and has its own root in the VM).
                &["run", "--no-pivot", "--bundle", b.to_str().unwrap(), name],
            );
            measure(&format!("runc_run_{name}"), ms_since(t0));
            let both = format!("ours {ours:?}\nrunc {theirs:?}");
            assert_eq!(ours.stdout, theirs.stdout, "{name}: stdout: {both}");
            if name == "not-found" {
                // runc's line has a time and "runc run failed: " first.
                let tail = |o: &Output| {
                    o.stderr
                        .split_once("unable to start container process: ")
                        .map(|(_, t)| t.trim().to_string())
                };
                assert!(tail(&ours).is_some(), "{both}");
                assert_eq!(tail(&ours), tail(&theirs), "{name}: stderr: {both}");
            } else {
                assert_eq!(ours.stderr, theirs.stderr, "{name}: stderr: {both}");
            }
            assert_eq!(ours.code(), theirs.code(), "{name}: exit code: {both}");
        }
        match name {
            "ok" => assert_eq!(ours.stdout, "hello\nimage\n", "{ours:?}"),
            "seven" => assert_eq!(ours.code(), 7, "{ours:?}"),
            "missing" => assert_eq!(ours.code(), 127, "{ours:?}"),
            "not-found" => assert_eq!(ours.code(), 1, "{ours:?}"),
            _ => {}
        }
        // Nothing is left behind by `run`.
        assert!(!dir.path().join("ks").join(name).exists());
    }
}

#[test]
fn test_first_container_warms_the_template_and_the_next_restores_it() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let fresh = Env {
        data: dir.path().join("data"),
        config: e.config.clone(),
        dir: dir.path().to_owned(),
    };
    let b = bundle(dir.path(), "b", "echo warm", false);
    let mut logs = Vec::new();
    for i in 0..3 {
        let log = dir.path().join(format!("log{i}"));
        let mut c = ks_cmd(&fresh, &dir.path().join("ks"));
        c.arg("--log").arg(&log).arg("--debug");
        let t0 = Instant::now();
        let o = run_it(
            c,
            &["run", "--bundle", b.to_str().unwrap(), &format!("w{i}")],
        );
        measure(
            match i {
                0 => "run_template_warmed_first",
                1 => "run_template_restored_in_mmap-prefetch",
                _ => "run_template_restored_again",
            },
            ms_since(t0),
        );
        assert_eq!(o.stdout, "warm\n", "{o:?}");
        logs.push(fs::read_to_string(&log).unwrap_or_default());
    }
    assert!(logs[0].contains("warming template"), "{}", logs[0]);
    assert!(!logs[1].contains("warming template"), "{}", logs[1]);
    // The first container on the template records its start-up working set; the next ones
    // prefetch it.
    assert!(
        logs[0].contains("recording the template's working set")
            && logs[0].contains("the template's working set is recorded"),
        "{}",
        logs[0]
    );
    // With a spare CPU the prefetch runs beside the vCPU; with one (the rig's L1) it would
    // compete with it, and plain mmap is used.
    let want = if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        "restore mode MmapPrefetch"
    } else {
        "restore mode Mmap\n"
    };
    assert!(logs[1].contains(want), "{want}: {}", logs[1]);
    assert!(logs[2].contains(want), "{want}: {}", logs[2]);
    let list = run_it(
        ks_cmd(&fresh, &dir.path().join("ks")),
        &["template", "list"],
    );
    assert_eq!(list.stdout.lines().count(), 2, "{list:?}");
    assert!(list.stdout.contains("recorded"), "{list:?}");
}

/// Polls `state ID` until its status is `want`.
fn wait_status(mut cmd: impl FnMut() -> Command, id: &str, want: &str) -> serde_json::Value {
    let end = Instant::now() + T;
    loop {
        let o = run_it(cmd(), &["state", id]);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&o.stdout)
            && (v["status"] == want || Instant::now() > end)
        {
            assert_eq!(v["status"], want, "{o:?}");
            return v;
        }
        assert!(
            Instant::now() < end,
            "state {id} never became {want}: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn test_lifecycle_goes_through_the_same_states_as_runc() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    // A subreaper, as containerd's shim is: the daemonized container processes are reaped here.
    subreaper();
    let b = bundle(dir.path(), "life", "echo started; sleep 600", false);
    let mut runtimes: Vec<(&str, CommandMaker<'_>)> =
        vec![("kata-snap", Box::new(|| ks_cmd(e, &dir.path().join("ks"))))];
    if runc_present() {
        runtimes.push(("runc", Box::new(|| runc_cmd(&dir.path().join("runc")))));
    }
    let mut seen = Vec::new();
    for (name, cmd) in &runtimes {
        let out = dir.path().join(format!("{name}.out"));
        let err = dir.path().join(format!("{name}.err"));
        let pid_file = dir.path().join(format!("{name}.pid"));
        let mut c = cmd();
        // The container's stdio are files: the container process keeps them (a pipe would not
        // see EOF before it exits, for runc as for kata-snap).
        c.args([
            "create",
            "--no-pivot",
            "--bundle",
            b.to_str().unwrap(),
            "--pid-file",
        ])
        .arg(&pid_file)
        .arg("c1")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap());
        let t0 = Instant::now();
        let mut child = c.spawn().unwrap();
        let status = wait_deadline(&mut child, T).expect("create did not finish");
        measure(&format!("{name}_create"), ms_since(t0));
        assert!(
            status.success(),
            "{name} create: {status:?} {}",
            fs::read_to_string(&err).unwrap_or_default()
        );
        let pid: i32 = fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let created = wait_status(cmd, "c1", "created");
        assert_eq!(created["pid"], pid, "{name}");
        let again = run_it(
            cmd(),
            &[
                "create",
                "--no-pivot",
                "--bundle",
                b.to_str().unwrap(),
                "c1",
            ],
        );
        let start = run_it(cmd(), &["start", "c1"]);
        assert_eq!(start.code(), 0, "{name} start: {start:?}");
        let running = wait_status(cmd, "c1", "running");
        if *name == "kata-snap" {
            // The supervisor's own thread runs under its seccomp filter (mode 2) once the
            // process runs.
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            assert!(status.contains("Seccomp:\t2"), "{status}");
            // The VM pauses and resumes (runc's pause needs a cgroup freezer the rig's L1 may
            // not give it, so only kata-snap's is checked).
            assert_eq!(run_it(cmd(), &["pause", "c1"]).code(), 0);
            wait_status(cmd, "c1", "paused");
            let again = run_it(cmd(), &["pause", "c1"]);
            assert_eq!(again.code(), 1, "{again:?}");
            assert_eq!(run_it(cmd(), &["resume", "c1"]).code(), 0);
            wait_status(cmd, "c1", "running");
        }
        let start_again = run_it(cmd(), &["start", "c1"]);
        let delete_running = run_it(cmd(), &["delete", "c1"]);
        let list = run_it(cmd(), &["list", "--format", "json"]);
        let kill = run_it(cmd(), &["kill", "c1", "KILL"]);
        assert_eq!(kill.code(), 0, "{name} kill: {kill:?}");
        // The container's process: reaped here, the subreaper, as a shim would.
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
        let stopped = wait_status(cmd, "c1", "stopped");
        let delete = run_it(cmd(), &["delete", "c1"]);
        let gone = run_it(cmd(), &["state", "c1"]);
        let text = fs::read_to_string(&out).unwrap();
        seen.push((
            name.to_string(),
            vec![
                again.code().to_string(),
                start_again.code().to_string(),
                delete_running.code().to_string(),
                created["status"].to_string(),
                running["status"].to_string(),
                stopped["status"].to_string(),
                stopped["pid"].to_string(),
                serde_json::from_str::<serde_json::Value>(&list.stdout).unwrap()[0]["status"]
                    .to_string(),
                delete.code().to_string(),
                gone.code().to_string(),
                text,
                format!("{status:?}").replace(&pid.to_string(), "PID"),
            ],
        ));
        assert_eq!(running["pid"], pid);
        assert!(!dir.path().join("ks").join("c1").exists() || *name == "runc");
    }
    if seen.len() == 2 {
        // The stop of the process differs in form: runc's init is killed by the signal, and so
        // is kata-snap's VMM.
        assert_eq!(seen[0].1, seen[1].1, "kata-snap vs runc");
    }
    assert_eq!(seen[0].1[10], "started\n");
}

/// Takes the terminal `child` sends to the console socket `l` (failing the test if `child`
/// exits first or nothing comes in time).
fn recv_fd(l: &UnixListener, child: &mut std::process::Child) -> OwnedFd {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    l.set_nonblocking(true).unwrap();
    let end = Instant::now() + T;
    let s = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(_) if Instant::now() < end => {
                if let Some(st) = child.try_wait().unwrap() {
                    let mut e = String::new();
                    let _ = child.stderr.take().unwrap().read_to_string(&mut e);
                    panic!("kata-snap exited {st:?} without sending a terminal: {e}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("no terminal on the console socket: {e}"),
        }
    };
    s.set_nonblocking(false).unwrap();
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty()).unwrap();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the fd was just received with SCM_RIGHTS and belongs to this process.
            return unsafe { OwnedFd::from_raw_fd(fds[0]) };
        }
    }
    panic!("no fd received on the console socket");
}

#[test]
fn test_terminal_through_the_console_socket() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    subreaper();
    let b = bundle(dir.path(), "tty", "tty; stty size; echo done", true);
    let sock = dir.path().join("console.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let mut c = ks_cmd(e, &dir.path().join("ks"));
    c.args([
        "run",
        "--detach",
        "--bundle",
        b.to_str().unwrap(),
        "--console-socket",
    ])
    .arg(&sock)
    .arg("t1")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let master = recv_fd(&l, &mut child);
    let o = collect(child, T, "run --detach");
    assert_eq!(o.code(), 0, "{o:?}");
    let mut f = fs::File::from(master);
    let mut text = Vec::new();
    let end = Instant::now() + T;
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&text).contains("done") && Instant::now() < end {
        match f.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert!(text.contains("done\r\n"), "{text:?}");
    let _ = wait_status(|| ks_cmd(e, &dir.path().join("ks")), "t1", "stopped");
    assert_eq!(
        run_it(ks_cmd(e, &dir.path().join("ks")), &["delete", "t1"]).code(),
        0
    );
}

fn subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes an integer flag.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
}

#[test]
fn test_twenty_containers_at_once() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let b = bundle(dir.path(), "many", "echo container $(hostname)", false);
    // Warm first, so that the 20 measure restores.
    let w = run_it(
        ks_cmd(e, &dir.path().join("ks")),
        &["run", "--bundle", b.to_str().unwrap(), "warm"],
    );
    assert_eq!(w.code(), 0, "{w:?}");
    let t0 = Instant::now();
    let children: Vec<_> = (0..20)
        .map(|i| {
            let mut c = ks_cmd(e, &dir.path().join("ks"));
            c.args(["run", "--bundle", b.to_str().unwrap(), &format!("m{i}")])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for (i, mut child) in children.into_iter().enumerate() {
        let status = wait_deadline(&mut child, T).expect("container did not finish");
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "m{i}: {status:?} {out:?} {err:?}");
        assert_eq!(out, "container kata-snap\n", "m{i}: {err}");
    }
    measure("20_kata-snap_run_at_once", ms_since(t0));
    let list = run_it(ks_cmd(e, &dir.path().join("ks")), &["list", "-q"]);
    assert_eq!(list.stdout, "", "containers left behind");
}

/// An OCI image layout tar of `rootfs` (one layer), named `name` for `ctr image import`.
fn oci_image_tar(dir: &Path, rootfs: &Path, name: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let layout = dir.join("layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let layer = dir.join("layer.tar");
    let o = run_command(
        {
            let mut c = Command::new("tar");
            c.arg("-C").arg(rootfs).arg("-cf").arg(&layer).arg(".");
            c
        },
        T,
    );
    assert_eq!(o.code(), 0, "tar: {o:?}");
    let put = |bytes: &[u8]| -> String {
        let d = format!("{:x}", Sha256::digest(bytes));
        fs::write(blobs.join(&d), bytes).unwrap();
        d
    };
    let layer_bytes = fs::read(&layer).unwrap();
    let layer_digest = put(&layer_bytes);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    })
    .to_string();
    let config_digest = put(config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{config_digest}"), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{layer_digest}"), "size": layer_bytes.len()}],
    })
    .to_string();
    let manifest_digest = put(manifest.as_bytes());
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{manifest_digest}"), "size": manifest.len(),
                       "annotations": {"io.containerd.image.name": name,
                                       "org.opencontainers.image.ref.name": "latest"}}],
    });
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
    let tar = dir.join("image.tar");
    let o = run_command(
        {
            let mut c = Command::new("tar");
            c.arg("-C").arg(&layout).arg("-cf").arg(&tar).arg(".");
            c
        },
        T,
    );
    assert_eq!(o.code(), 0, "tar: {o:?}");
    tar
}

/// containerd (started here) runs an image with kata-snap as its runc binary (`ctr run
/// --runc-binary`): the output and the exit status come back through the runc shim.
#[test]
fn test_containerd_runs_an_image_through_kata_snap() {
    let Some(art) = setup() else { return };
    let bins = [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/bin/containerd-shim-runc-v2",
    ];
    if let Some(missing) = bins.iter().find(|b| !Path::new(b).exists()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide containerd in the rig (scripts/rig/rung4.sh packs it)"
        );
        println!("SKIPPED: {missing} missing (apt-get install containerd)");
        return;
    }
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let state = dir.path().join("state");
    let sock = state.join("containerd.sock");
    let config = dir.path().join("containerd.toml");
    fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n",
            dir.path().join("root").display(),
            state.display(),
            sock.display()
        ),
    )
    .unwrap();
    step("start containerd");
    let mut daemon = Command::new(bins[0])
        .arg("--config")
        .arg(&config)
        .env("KATA_SNAP_CONFIG", &e.config)
        .env("KATA_SNAP_DATA_DIR", &e.data)
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.path().join("containerd.log")).unwrap())
        .stderr(fs::File::create(dir.path().join("containerd.err")).unwrap())
        .spawn()
        .unwrap();
    let ctr = |args: &[&str]| -> Output {
        let mut c = Command::new(bins[1]);
        c.arg("--address").arg(&sock).args(args);
        run_it(c, &[])
    };
    let end = Instant::now() + T;
    while ctr(&["version"]).code() != 0 {
        assert!(
            Instant::now() < end,
            "containerd did not come up: {}",
            fs::read_to_string(dir.path().join("containerd.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let rootfs = busybox_tree(&dir.path().join("image-rootfs"));
    let tar = oci_image_tar(dir.path(), &rootfs, "docker.io/library/ks-busybox:latest");
    let o = ctr(&[
        "image",
        "import",
        "--snapshotter",
        "native",
        tar.to_str().unwrap(),
    ]);
    assert_eq!(o.code(), 0, "import: {o:?}");
    let t0 = Instant::now();
    let o = ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "native",
        "--runc-binary",
        BIN,
        "docker.io/library/ks-busybox:latest",
        "ctr1",
        "sh",
        "-c",
        "echo from containerd; echo err >&2; exit 3",
    ]);
    measure("ctr_run_through_kata-snap", ms_since(t0));
    let logs = || {
        format!(
            "\ncontainerd: {}",
            fs::read_to_string(dir.path().join("containerd.err")).unwrap_or_default()
        )
    };
    assert_eq!(o.stdout, "from containerd\n", "{o:?}{}", logs());
    assert_eq!(o.code(), 3, "{o:?}{}", logs());
    assert!(o.stderr.contains("err"), "{o:?}");
    // `--rm` deleted it through kata-snap: nothing is left in the runtime's state.
    let ls = ctr(&["containers", "list", "-q"]);
    assert_eq!(ls.stdout.trim(), "", "{ls:?}");
    let _ = daemon.kill();
    let _ = daemon.wait();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() - 1) / 2]
}

/// `kata-snap run` against `runc run` of the same bundle, alternating, and where kata-snap's
/// time goes (the supervisor's `--debug` timing line). Emulated timings: the ratio is the figure.
#[test]
fn test_bench_run_against_runc() {
    let Some(art) = setup() else { return };
    if !runc_present() {
        return;
    }
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let b = bundle(dir.path(), "bench", "echo hi", false);
    // Warm the template and the image first.
    let w = run_it(
        ks_cmd(e, &dir.path().join("ks")),
        &["run", "--bundle", b.to_str().unwrap(), "w"],
    );
    assert_eq!(w.stdout, "hi\n", "{w:?}");
    let (mut ours, mut theirs, mut mapped) = (Vec::new(), Vec::new(), Vec::new());
    let other = if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        "mmap"
    } else {
        "mmap-prefetch"
    };
    let mut phases: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for i in 0..5 {
        let log = dir.path().join(format!("log{i}"));
        let mut c = ks_cmd(e, &dir.path().join("ks"));
        c.arg("--log").arg(&log).arg("--debug");
        let t0 = Instant::now();
        let o = run_it(
            c,
            &["run", "--bundle", b.to_str().unwrap(), &format!("k{i}")],
        );
        ours.push(ms_since(t0));
        assert_eq!(o.stdout, "hi\n", "{o:?}");
        // The other mapped mode than the default (mmap-prefetch with a spare CPU, mmap without).
        let t0 = Instant::now();
        let o = run_it(
            ks_cmd(e, &dir.path().join("ks")),
            &[
                "run",
                "--restore-mode",
                other,
                "--bundle",
                b.to_str().unwrap(),
                &format!("m{i}"),
            ],
        );
        mapped.push(ms_since(t0));
        assert_eq!(o.stdout, "hi\n", "{o:?}");
        let t0 = Instant::now();
        let o = run_it(
            runc_cmd(&dir.path().join("runc")),
            &[
                "run",
                "--no-pivot",
                "--bundle",
                b.to_str().unwrap(),
                &format!("r{i}"),
            ],
        );
        theirs.push(ms_since(t0));
        assert_eq!(o.stdout, "hi\n", "{o:?}");
        let text = fs::read_to_string(&log).unwrap();
        let line = text
            .lines()
            .find_map(|l| l.split_once("timing: ").map(|(_, t)| t.to_string()))
            .unwrap_or_else(|| panic!("no timing line in {text}"));
        // "supervisor 1.0, restore 12.1, ... ms (total 40.2 ms)"
        for part in line.split(" ms (total").next().unwrap().split(", ") {
            let (name, v) = part.rsplit_once(' ').unwrap();
            phases
                .entry(name.replace(' ', "_"))
                .or_default()
                .push(v.parse().unwrap());
        }
    }
    for (i, (k, r)) in ours.iter().zip(&theirs).enumerate() {
        println!("RIG-INFO bench run {i}: kata-snap {k:.0} ms, runc {r:.0} ms");
    }
    let (k, r) = (median(ours.clone()), median(theirs.clone()));
    for v in &ours {
        measure("bench_kata-snap_run", *v);
    }
    for v in &theirs {
        measure("bench_runc_run", *v);
    }
    for v in &mapped {
        measure(&format!("bench_kata-snap_run_{other}"), *v);
    }
    println!(
        "RIG-INFO kata-snap run, default mode / {other}: {:.2} ({k:.0} / {:.0} ms, emulated)",
        k / median(mapped.clone()),
        median(mapped.clone())
    );
    for (name, v) in &phases {
        for x in v {
            measure(&format!("bench_kata-snap_phase_{name}"), *x);
        }
    }
    println!(
        "RIG-INFO kata-snap run / runc run of one bundle: {:.2} (medians of 5 alternating runs: {k:.0} / {r:.0} ms, emulated)",
        k / r
    );
}

/// `run` in the foreground, then `kill -9` of the container: the shell sees 137 from both
/// runtimes (runc's `run` exits 137; kata-snap's `run` is the VMM and dies of the signal).
#[test]
fn test_run_killed_with_sigkill_gives_137_as_runc() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let b = bundle(dir.path(), "k", "echo up; sleep 600", false);
    let mut runtimes: Vec<(&str, CommandMaker<'_>)> =
        vec![("kata-snap", Box::new(|| ks_cmd(e, &dir.path().join("ks"))))];
    if runc_present() {
        runtimes.push(("runc", Box::new(|| runc_cmd(&dir.path().join("runc")))));
    }
    for (name, cmd) in &runtimes {
        let out = dir.path().join(format!("{name}.out"));
        let mut c = cmd();
        c.args(["run", "--no-pivot", "--bundle", b.to_str().unwrap(), "k1"])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(Stdio::null());
        let mut child = c.spawn().unwrap();
        wait_status(cmd, "k1", "running");
        let end = Instant::now() + T;
        while fs::read_to_string(&out).unwrap_or_default() != "up\n" {
            assert!(Instant::now() < end, "{name}: no output");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(run_it(cmd(), &["kill", "k1", "9"]).code(), 0);
        let status = wait_deadline(&mut child, T).expect("run did not end after kill -9");
        let code = status.code().unwrap_or_else(|| {
            128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
        });
        assert_eq!(code, 137, "{name}: {status:?}");
        let _ = run_it(cmd(), &["delete", "--force", "k1"]);
        assert!(!dir.path().join("ks").join("k1").exists() || *name == "runc");
    }
}

/// With a pool running (`kata-snap pool start`), containers restore in its pre-started VMMs
/// and behave as cold ones; a container whose supervisor is killed takes its pooled VM with it.
#[test]
fn test_containers_restore_in_a_running_pool() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let pool = dir.path().join("pool");
    let ks = || {
        let mut c = ks_cmd(e, &dir.path().join("ks"));
        c.env("KATA_SNAP_POOL_DIR", &pool);
        c
    };
    let b = bundle(dir.path(), "p", "echo pooled; cat /etc/hostname", false);
    // The template first (cold), so that the pool's shells match its shape.
    let w = run_it(ks(), &["run", "--bundle", b.to_str().unwrap(), "w"]);
    assert_eq!(w.stdout, "pooled\nimage\n", "{w:?}");
    let p = run_it(
        ks(),
        &[
            "pool",
            "start",
            "--size",
            "2",
            "--vcpus",
            "1",
            "--mem-mib",
            "256",
        ],
    );
    assert_eq!(p.code(), 0, "{p:?}");
    let end = Instant::now() + T;
    while fs::read_dir(pool.join("ready"))
        .map(|d| d.count())
        .unwrap_or(0)
        < 2
    {
        assert!(Instant::now() < end, "the pool never got ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    for i in 0..2 {
        let log = dir.path().join(format!("pool{i}.log"));
        let mut c = ks();
        c.arg("--log").arg(&log).arg("--debug");
        let t0 = Instant::now();
        let o = run_it(
            c,
            &["run", "--bundle", b.to_str().unwrap(), &format!("p{i}")],
        );
        measure("run_through_pool", ms_since(t0));
        assert_eq!(o.stdout, "pooled\nimage\n", "{o:?}");
        assert_eq!(o.code(), 0, "{o:?}");
        let text = fs::read_to_string(&log).unwrap();
        assert!(text.contains("restore path: pool"), "{text}");
    }
    // A pooled container whose supervisor dies of SIGKILL: its VMM goes too.
    let end = Instant::now() + T;
    while fs::read_dir(pool.join("ready"))
        .map(|d| d.count())
        .unwrap_or(0)
        < 1
    {
        assert!(Instant::now() < end, "the pool did not refill");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = dir.path().join("kill.log");
    let slow = bundle(dir.path(), "slow", "echo up; sleep 600", false);
    let out = dir.path().join("kill.out");
    let mut c = ks();
    c.arg("--log").arg(&log).arg("--debug");
    c.args(["run", "--bundle", slow.to_str().unwrap(), "k"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    while fs::read_to_string(&out).unwrap_or_default() != "up\n" {
        assert!(Instant::now() < end, "no output from the pooled container");
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = fs::read_to_string(&log).unwrap();
    let vmm_pid: i32 = text
        .lines()
        .find_map(|l| l.split_once("pre-started VMM pid ").map(|(_, p)| p))
        .and_then(|p| p.trim_end_matches(')').trim().parse().ok())
        .unwrap_or_else(|| panic!("no pooled VMM in {text}"));
    child.kill().unwrap();
    child.wait().unwrap();
    let end = Instant::now() + T;
    while Path::new(&format!("/proc/{vmm_pid}")).exists()
        && !fs::read_to_string(format!("/proc/{vmm_pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(
            Instant::now() < end,
            "the pooled VMM {vmm_pid} outlived its killed supervisor"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(run_it(ks(), &["delete", "--force", "k"]).code(), 0);
    assert_eq!(run_it(ks(), &["pool", "stop"]).code(), 0);
}
