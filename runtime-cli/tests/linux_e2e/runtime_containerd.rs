//! A real client: containerd, started by the test, runs an image through kata-snap.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{BIN, Output, run_command};
use crate::guest::*;
use crate::runtime::*;

/// The image the tests import.
const IMAGE: &str = "docker.io/library/ks-busybox:latest";

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
    let tar = oci_image_tar(dir.path(), &rootfs, IMAGE);
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
        IMAGE,
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

    // stdin through the shim: what is written to `ctr run`'s stdin reaches the process, and its
    // end ends the process. (Written once the task runs: ctr 1.6 asks the shim to close the
    // process's stdin only if its stdin ends after the task was created; an earlier end is
    // lost in ctr whatever the runtime, and the task waits for input forever.)
    let mut c = Command::new(bins[1]);
    c.arg("--address").arg(&sock).args([
        "run",
        "--rm",
        "--snapshotter",
        "native",
        "--runc-binary",
        BIN,
        IMAGE,
        "ctr-stdin",
        "cat",
    ]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let end = Instant::now() + T;
    while !ctr(&["task", "ls"])
        .stdout
        .lines()
        .any(|l| l.starts_with("ctr-stdin ") && l.contains("RUNNING"))
    {
        assert!(Instant::now() < end, "ctr-stdin never ran{}", logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hi\n").unwrap();
    }
    let o = crate::common::collect(child, T, "ctr run cat");
    assert_eq!(o.stdout, "hi\n", "{o:?}{}", logs());
    assert_eq!(o.code(), 0, "{o:?}{}", logs());

    // `ctr task exec` into a running task: output and status come back; the task then stops.
    let o = ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "native",
        "--runc-binary",
        BIN,
        IMAGE,
        "ctr2",
        "sleep",
        "600",
    ]);
    assert_eq!(o.code(), 0, "{o:?}{}", logs());
    let t0 = Instant::now();
    let o = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "x1",
        "ctr2",
        "sh",
        "-c",
        "echo from exec; exit 4",
    ]);
    measure("ctr_task_exec_through_kata-snap", ms_since(t0));
    assert_eq!(o.stdout, "from exec\n", "{o:?}{}", logs());
    assert_eq!(o.code(), 4, "{o:?}{}", logs());
    assert_eq!(ctr(&["task", "kill", "-s", "KILL", "ctr2"]).code(), 0);
    let end = Instant::now() + T;
    while ctr(&["task", "delete", "ctr2"]).code() != 0 {
        assert!(Instant::now() < end, "task ctr2 did not stop{}", logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(ctr(&["containers", "rm", "ctr2"]).code(), 0);
    let _ = daemon.kill();
    let _ = daemon.wait();
}
