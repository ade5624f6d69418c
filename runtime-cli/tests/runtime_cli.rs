//! The runtime's command-line contract beside runc's (Debian's `runc`), where no VM is needed:
//! unknown ids, empty lists, bad ids and signals, `spec`, `--version`, and the state machine
//! driven through records whose supervisor is a stand-in process (its liveness is what the
//! runtime checks). Containers that really run are tested against runc in the rung-4 rig
//! (tests/linux_e2e/runtime.rs).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, Output, plant, run_command};

const T: Duration = Duration::from_secs(30);

fn runc() -> Option<PathBuf> {
    for p in ["/usr/sbin/runc", "/usr/bin/runc"] {
        if Path::new(p).exists() {
            return Some(p.into());
        }
    }
    println!("SKIPPED (runc part): runc is not installed (apt-get install runc)");
    None
}

fn ks(root: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.arg("--root").arg(root).args(args);
    run_command(c, T)
}

fn rc(runc: &Path, root: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(runc);
    c.arg("--root").arg(root).args(args);
    run_command(c, T)
}

/// The message of a runc-style error line (`time=".." level=error msg=".."`).
fn msg(o: &Output) -> String {
    let line = o.stderr.lines().last().unwrap_or_default();
    match line.split_once(" msg=") {
        Some((_, m)) => serde_json::from_str::<String>(m).unwrap_or_else(|_| m.to_string()),
        None => line.to_string(),
    }
}

#[test]
fn test_unknown_ids_fail_as_with_runc() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ks");
    let theirs = dir.path().join("runc");
    let runc = runc();
    for args in [
        &["state", "nope"][..],
        &["kill", "nope"],
        &["kill", "nope", "KILL"],
        &["delete", "nope"],
        &["start", "nope"],
        &["pause", "nope"],
        &["resume", "nope"],
        &["ps", "--format", "json", "nope"],
    ] {
        let o = ks(&ours, args);
        assert_eq!(o.code(), 1, "{args:?}: {o:?}");
        assert_eq!(msg(&o), "container does not exist", "{args:?}: {o:?}");
        assert!(o.stdout.is_empty(), "{args:?}: {o:?}");
        assert!(o.stderr.starts_with("time=\""), "{args:?}: {o:?}");
        if let Some(runc) = &runc {
            let r = rc(runc, &theirs, args);
            assert_eq!(r.code(), o.code(), "{args:?}: runc {r:?}, ours {o:?}");
            assert_eq!(msg(&r), msg(&o), "{args:?}");
        }
    }
    // --force on a missing container succeeds quietly, as with runc.
    let o = ks(&ours, &["delete", "--force", "nope"]);
    assert_eq!(o.code(), 0, "{o:?}");
    if let Some(runc) = &runc {
        assert_eq!(rc(runc, &theirs, &["delete", "--force", "nope"]).code(), 0);
    }
}

#[test]
fn test_empty_list_matches_runc() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ks");
    let o = ks(&ours, &["list"]);
    assert_eq!(o.code(), 0, "{o:?}");
    assert_eq!(
        o.stdout,
        "ID          PID         STATUS      BUNDLE      CREATED     OWNER\n"
    );
    let j = ks(&ours, &["list", "--format", "json"]);
    assert_eq!(j.stdout, "null\n");
    if let Some(runc) = runc() {
        let theirs = dir.path().join("runc");
        assert_eq!(rc(&runc, &theirs, &["list"]).stdout, o.stdout);
        assert_eq!(
            rc(&runc, &theirs, &["list", "--format", "json"]).stdout,
            j.stdout
        );
    }
}

#[test]
fn test_errors_go_to_the_log_file_as_json_for_containerd() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.json");
    let mut c = Command::new(BIN);
    c.arg("--root")
        .arg(dir.path().join("root"))
        .arg("--log")
        .arg(&log)
        .args(["--log-format", "json", "state", "nope"]);
    let o = run_command(c, T);
    assert_eq!(o.code(), 1);
    assert_eq!(o.stderr.trim(), "container does not exist");
    let text = fs::read_to_string(&log).unwrap();
    let entry: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(entry["level"], "error");
    assert_eq!(entry["msg"], "container does not exist");
}

#[test]
fn test_version_has_the_shape_go_runc_and_runcs_tests_parse() {
    for flag in ["--version", "-v"] {
        let o = common::run(&[flag], T);
        assert_eq!(o.code(), 0);
        let lines: Vec<&str> = o.stdout.lines().collect();
        // runc's version.bats: `runc version [0-9]+.[0-9]+.[0-9]+`, `commit:`, `spec: X.Y.Z`.
        let semver = |s: &str| {
            let v: Vec<&str> = s.split(['.', '-', '+', ' ']).take(3).collect();
            v.len() == 3 && v.iter().all(|p| p.parse::<u32>().is_ok())
        };
        assert!(
            lines[0].strip_prefix("runc version ").is_some_and(semver),
            "{o:?}"
        );
        assert!(lines[1].starts_with("commit: "), "{o:?}");
        assert!(lines[2].strip_prefix("spec: ").is_some_and(semver), "{o:?}");
        assert!(lines[3].starts_with("kata-snap: 0."), "{o:?}");
    }
}

#[test]
fn test_a_closed_pipe_on_stdout_ends_quietly_without_a_panic() {
    // `kata-snap --version | head -1` once panicked ("failed printing to stdout") with 101.
    for args in [
        &["--version"][..],
        &["features"],
        &["--help"],
        &["spec", "--help"],
    ] {
        let mut c = Command::new(BIN);
        c.args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        // The reader is gone before the first byte is written.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            out.status.success()
                || std::os::unix::process::ExitStatusExt::signal(&out.status)
                    == Some(libc::SIGPIPE),
            "{args:?}: {:?} {stderr}",
            out.status
        );
    }
}

#[test]
fn test_bad_ids_and_signals_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ks");
    for id in ["a/b", "..", "a b"] {
        let o = ks(&root, &["state", id]);
        assert_eq!(o.code(), 1);
        assert_eq!(msg(&o), format!("invalid container id format: {id}"));
    }
    plant(&root, "c", std::process::id() as i32, "running");
    let o = ks(&root, &["kill", "c", "NOPE"]);
    assert_eq!(o.code(), 1);
    assert_eq!(msg(&o), "unknown signal \"NOPE\"");
}

#[test]
fn test_spec_writes_a_config_and_refuses_to_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let o = common::run(&["spec", "--bundle", dir.path().to_str().unwrap()], T);
    assert_eq!(o.code(), 0, "{o:?}");
    let spec: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert!(spec["ociVersion"].as_str().unwrap().starts_with("1."));
    assert_eq!(spec["root"]["path"], "rootfs");
    assert_eq!(spec["process"]["args"][0], "sh");
    let again = common::run(&["spec", "--bundle", dir.path().to_str().unwrap()], T);
    assert_eq!(again.code(), 1);
    assert!(msg(&again).contains("exists. Remove it first"), "{again:?}");
}

#[test]
fn test_state_machine_follows_the_supervisor_process() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ks");
    // A stand-in supervisor: `kill` signals it, as it would the real one.
    let mut sup = Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = sup.id() as i32;
    let cdir = plant(&root, "web", pid, "running");

    let st = ks(&root, &["state", "web"]);
    assert_eq!(st.code(), 0, "{st:?}");
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(v["ociVersion"], "1.0.2");
    assert_eq!(v["id"], "web");
    assert_eq!(v["status"], "running");
    assert_eq!(v["pid"], pid);
    assert_eq!(v["bundle"], "/bundles/x");
    assert_eq!(v["rootfs"], "/bundles/x/rootfs");
    assert_eq!(v["created"], "2026-11-27T19:25:34.000000000Z");
    assert_eq!(v["annotations"]["k"], "v");
    // runc indents state with two spaces.
    assert!(
        st.stdout.starts_with("{\n  \"ociVersion\""),
        "{}",
        st.stdout
    );

    let l = ks(&root, &["list", "--format", "json"]);
    let arr: serde_json::Value = serde_json::from_str(&l.stdout).unwrap();
    assert_eq!(arr[0]["id"], "web");
    assert_eq!(arr[0]["status"], "running");
    // runc's field order, which its own tests match textually.
    assert!(
        l.stdout.starts_with(&format!(
            "[{{\"ociVersion\":\"1.0.2\",\"id\":\"web\",\"pid\":{pid},\"status\":\"running\",\"bundle\":"
        )),
        "{}",
        l.stdout
    );
    assert!(l.stdout.contains("},\"owner\":\""), "{}", l.stdout);
    assert_eq!(ks(&root, &["list", "-q"]).stdout, "web\n");
    let ps = ks(&root, &["ps", "--format", "json", "web"]);
    assert_eq!(ps.stdout.trim(), format!("[{pid}]"));

    // Running: start and a plain delete are refused with runc's words.
    let s = ks(&root, &["start", "web"]);
    assert_eq!(s.code(), 1);
    assert_eq!(msg(&s), "cannot start an already running container");
    let d = ks(&root, &["delete", "web"]);
    assert_eq!(d.code(), 1);
    assert_eq!(
        msg(&d),
        "cannot delete container web that is not stopped: running"
    );

    // Signal 0 only asks whether it runs (runc passes it to kill(2)).
    let k = ks(&root, &["kill", "web", "0"]);
    assert_eq!(k.code(), 0, "{k:?}");
    assert!(sup.try_wait().unwrap().is_none(), "signal 0 must not hurt");

    // kill sends the signal to the supervisor; once it is gone the container reads stopped.
    let k = ks(&root, &["kill", "web", "KILL"]);
    assert_eq!(k.code(), 0, "{k:?}");
    let status = sup.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let v: serde_json::Value = serde_json::from_str(&ks(&root, &["state", "web"]).stdout).unwrap();
    assert_eq!(v["status"], "stopped");
    assert_eq!(v["pid"], 0);
    for sig in [None, Some("0")] {
        let k = ks(&root, &[&["kill", "web"][..], sig.as_slice()].concat());
        assert_eq!(k.code(), 1);
        assert_eq!(msg(&k), "container not running");
    }
    // `--all` signals what is left of a stopped container: nothing, and succeeds (runc).
    let k = ks(&root, &["kill", "-a", "web", "0"]);
    assert_eq!(k.code(), 0, "{k:?}");
    let s = ks(&root, &["start", "web"]);
    assert_eq!(msg(&s), "cannot start a container that has stopped");

    // delete removes everything the container left.
    fs::write(cdir.join("v.sock"), b"").unwrap();
    let d = ks(&root, &["delete", "web"]);
    assert_eq!(d.code(), 0, "{d:?}");
    assert!(!cdir.exists());
}

#[test]
fn test_delete_force_kills_a_running_container_and_created_needs_no_force() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ks");
    for (id, status, args) in [
        ("a", "running", &["delete", "--force", "a"][..]),
        ("b", "created", &["delete", "b"][..]),
    ] {
        let mut sup = Command::new("sleep").arg("600").spawn().unwrap();
        let cdir = plant(&root, id, sup.id() as i32, status);
        let d = ks(&root, args);
        assert_eq!(d.code(), 0, "{d:?}");
        let st = sup.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
        assert!(!cdir.exists());
    }
}

#[test]
fn test_create_where_linux_guests_cannot_run_leaves_nothing() {
    let host = common::run(&["check"], T);
    if !host.stdout.contains("cannot boot at speed") {
        println!("SKIPPED: this host can boot Linux guests; the rung-4 tests cover create");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ks");
    let data = dir.path().join("data");
    let bundle = dir.path().join("bundle");
    fs::create_dir_all(bundle.join("rootfs")).unwrap();
    assert_eq!(
        common::run(&["spec", "--bundle", bundle.to_str().unwrap()], T).code(),
        0
    );
    let mut spec: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(bundle.join("config.json")).unwrap()).unwrap();
    spec["process"]["terminal"] = false.into();
    fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    let mut c = Command::new(BIN);
    c.env("KATA_SNAP_DATA_DIR", &data)
        .arg("--root")
        .arg(&root)
        .args(["create", "--bundle", bundle.to_str().unwrap(), "c1"]);
    let o = run_command(c, T);
    assert_eq!(o.code(), 1, "{o:?}");
    assert!(
        msg(&o).starts_with("this host cannot run Linux guests at speed"),
        "{o:?}"
    );
    assert!(!root.join("c1").exists());
    assert!(!data.join("templates").exists());
}

#[test]
fn test_bad_bundles_are_one_line_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ks");
    let data = dir.path().join("data");
    let b = dir.path().join("b");
    fs::create_dir_all(&b).unwrap();
    let create = |bundle: &Path, id: &str| {
        let mut c = Command::new(BIN);
        c.env("KATA_SNAP_DATA_DIR", &data)
            .arg("--root")
            .arg(&root)
            .args(["create", "--bundle", bundle.to_str().unwrap(), id]);
        run_command(c, T)
    };
    // No config.json.
    let o = create(&b, "c1");
    assert_eq!(o.code(), 1, "{o:?}");
    assert!(msg(&o).contains("config.json"), "{o:?}");
    // A FIFO as config.json: refused without blocking.
    nix::unistd::mkfifo(&b.join("config.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let o = create(&b, "c1");
    assert_eq!(o.code(), 1, "{o:?}");
    assert!(msg(&o).contains("config.json"), "{o:?}");
    fs::remove_file(b.join("config.json")).unwrap();
    // Invalid JSON.
    fs::write(b.join("config.json"), b"{\"ociVersion\": ").unwrap();
    let o = create(&b, "c1");
    assert_eq!(o.code(), 1, "{o:?}");
    assert!(msg(&o).contains("config.json"), "{o:?}");
    // A valid config whose rootfs is missing.
    assert_eq!(
        common::run(&["spec", "--bundle", b.to_str().unwrap()], T).code(),
        1,
        "spec must refuse to overwrite"
    );
    fs::remove_file(b.join("config.json")).unwrap();
    assert_eq!(
        common::run(&["spec", "--bundle", b.to_str().unwrap()], T).code(),
        0
    );
    let o = create(&b, "c1");
    assert_eq!(o.code(), 1, "{o:?}");
    assert!(msg(&o).contains("rootfs"), "{o:?}");
    // A bind mount of a host path is refused naming the mount.
    fs::create_dir_all(b.join("rootfs")).unwrap();
    let mut spec: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(b.join("config.json")).unwrap()).unwrap();
    spec["process"]["terminal"] = false.into();
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind"]}));
    fs::write(b.join("config.json"), spec.to_string()).unwrap();
    let o = create(&b, "c1");
    assert_eq!(o.code(), 1, "{o:?}");
    assert!(
        msg(&o).contains("/data") && msg(&o).contains("/srv/data"),
        "{o:?}"
    );
    // --preserve-fds cannot cross into a VM; a terminal needs a console socket when detached.
    let mut c = Command::new(BIN);
    c.arg("--root").arg(&root).args([
        "create",
        "--preserve-fds",
        "2",
        "--bundle",
        b.to_str().unwrap(),
        "c1",
    ]);
    let o = run_command(c, T);
    assert!(msg(&o).contains("--preserve-fds"), "{o:?}");
    spec["process"]["terminal"] = true.into();
    spec["mounts"].as_array_mut().unwrap().pop();
    fs::write(b.join("config.json"), spec.to_string()).unwrap();
    let o = create(&b, "c1");
    assert!(msg(&o).contains("console socket"), "{o:?}");
    // Nothing was created by any of them.
    assert!(fs::read_dir(&root).map(|d| d.count()).unwrap_or(0) == 0);
    assert!(!data.join("templates").exists());
    assert!(!data.join("images").exists());
}

/// An image's key and path, without its lease.
struct Img {
    key: String,
    path: std::path::PathBuf,
}

#[test]
fn test_image_cache_list_prune_rm() {
    if !Path::new("/usr/bin/mkfs.erofs").exists() {
        println!("SKIPPED: mkfs.erofs missing (apt-get install erofs-utils)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cache = rootfs_image::ImageCache::open(&data.join("images")).unwrap();
    let mut keys = Vec::new();
    for i in 0..3 {
        let tree = dir.path().join(format!("tree{i}"));
        fs::create_dir_all(&tree).unwrap();
        fs::write(tree.join("f"), vec![i as u8; 4096]).unwrap();
        keys.push(cache.get_or_build(&tree).unwrap());
    }
    // Two of them last used two hours ago.
    let old = std::time::SystemTime::now() - Duration::from_secs(7200);
    for img in &keys[..2] {
        fs::File::options()
            .write(true)
            .open(&img.path)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    let image = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.env("KATA_SNAP_DATA_DIR", &data).arg("image").args(args);
        run_command(c, T)
    };
    let list = image(&["list"]);
    assert_eq!(list.code(), 0, "{list:?}");
    assert_eq!(list.stdout.lines().count(), 4, "{list:?}");
    // Least recently used first.
    assert!(
        list.stdout
            .lines()
            .nth(3)
            .unwrap()
            .starts_with(&keys[2].key),
        "{list:?}"
    );
    // A container still holds the second old one (its lease); the others are unused.
    let held = keys[1].lease.clone();
    let keys: Vec<Img> = keys
        .into_iter()
        .map(|k| Img {
            key: k.key,
            path: k.path,
        })
        .collect();
    let prune = image(&["prune", "--keep-mib", "0", "--unused-for", "60"]);
    assert_eq!(prune.code(), 0, "{prune:?}");
    assert!(
        prune.stdout.starts_with("removed 1 images") && prune.stdout.contains("spared 1 in use"),
        "{prune:?}"
    );
    assert!(!keys[0].path.exists() && keys[1].path.exists());
    drop(held);
    let prune = image(&["prune", "--keep-mib", "0", "--unused-for", "60"]);
    assert!(prune.stdout.starts_with("removed 1 images"), "{prune:?}");
    assert!(!keys[0].path.exists() && !keys[1].path.exists());
    assert!(keys[2].path.exists(), "a recently used image is spared");
    assert_eq!(image(&["rm", &keys[2].key]).code(), 0);
    assert!(!keys[2].path.exists());
    let again = image(&["rm", &keys[2].key]);
    assert_eq!(again.code(), 1, "{again:?}");
    assert_eq!(image(&["list"]).stdout.lines().count(), 1);
}

#[test]
fn test_help_has_runcs_shape_under_the_invoked_name() {
    // runc's help.bats reads line 1 of `runc -h` and of `runc CMD -h`; installed as `runc`
    // (a link), kata-snap answers under that name.
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("runc");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    for (args, want) in [
        (&["-h"][..], "runc - Open Container Initiative runtime"),
        (&["--help"], "runc - Open Container Initiative runtime"),
        (&["exec", "-h"], "runc exec - "),
        (&["list", "--help"], "runc list - "),
        (&["delete", "-h"], "runc delete - "),
    ] {
        let mut c = Command::new(&link);
        c.args(args);
        let o = run_command(c, T);
        assert_eq!(o.code(), 0, "{args:?}: {o:?}");
        let lines: Vec<&str> = o.stdout.lines().collect();
        assert_eq!(lines[0], "NAME:", "{args:?}: {o:?}");
        assert!(lines[1].trim_start().starts_with(want), "{args:?}: {o:?}");
    }
    // Under its own name it says so.
    let o = common::run(&["-h"], T);
    assert!(
        o.stdout
            .lines()
            .nth(1)
            .unwrap()
            .trim_start()
            .starts_with("kata-snap - ")
    );
}

#[test]
fn test_help_for_an_unknown_command_is_refused_as_runc_does() {
    let o = common::run(&["foo", "-h"], T);
    assert_eq!(o.code(), 3, "{o:?}");
    assert!(o.stderr.contains("No help topic for 'foo'"), "{o:?}");
    // Without -h it is clap's usage error.
    assert_eq!(common::run(&["foo"], T).code(), 2);
}
