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

/// A containerd of the test's own (no CRI plugin), the busybox image imported with the native
/// snapshotter; stopped on drop.
struct Containerd {
    child: std::process::Child,
    sock: PathBuf,
    dir: PathBuf,
}

impl Containerd {
    /// None: containerd is not here (SKIPPED, never in CI).
    fn start(dir: &Path, e: &Env) -> Option<Self> {
        if let Some(missing) = CONTAINERD_BINS.iter().find(|b| !Path::new(b).exists()) {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must provide containerd in the rig (scripts/rig/rung4.sh packs it)"
            );
            println!("SKIPPED: {missing} missing (apt-get install containerd)");
            return None;
        }
        let state = dir.join("state");
        let sock = state.join("containerd.sock");
        let config = dir.join("containerd.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n",
                dir.join("root").display(),
                state.display(),
                sock.display()
            ),
        )
        .unwrap();
        step("start containerd");
        let child = Command::new(CONTAINERD_BINS[0])
            .arg("--config")
            .arg(&config)
            .env("KATA_SNAP_CONFIG", &e.config)
            .env("KATA_SNAP_DATA_DIR", &e.data)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("containerd.log")).unwrap())
            .stderr(fs::File::create(dir.join("containerd.err")).unwrap())
            .spawn()
            .unwrap();
        let daemon = Self {
            child,
            sock,
            dir: dir.to_owned(),
        };
        let end = Instant::now() + T;
        while daemon.ctr(&["version"]).code() != 0 {
            assert!(
                Instant::now() < end,
                "containerd did not come up: {}",
                daemon.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let rootfs = busybox_tree(&dir.join("image-rootfs"));
        let tar = oci_image_tar(dir, &rootfs, IMAGE);
        let o = daemon.ctr(&[
            "image",
            "import",
            "--snapshotter",
            "native",
            tar.to_str().unwrap(),
        ]);
        assert_eq!(o.code(), 0, "import: {o:?}");
        Some(daemon)
    }

    fn ctr_cmd(&self) -> Command {
        let mut c = Command::new(CONTAINERD_BINS[1]);
        c.arg("--address").arg(&self.sock);
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        let mut c = self.ctr_cmd();
        c.args(args);
        run_it(c, &[])
    }

    /// containerd's log, for a failure's message.
    fn logs(&self) -> String {
        format!(
            "\ncontainerd: {}",
            fs::read_to_string(self.dir.join("containerd.err")).unwrap_or_default()
        )
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CONTAINERD_BINS: [&str; 3] = [
    "/usr/bin/containerd",
    "/usr/bin/ctr",
    "/usr/bin/containerd-shim-runc-v2",
];

/// containerd (started here) runs an image with kata-snap as its runc binary (`ctr run
/// --runc-binary`): the output and the exit status come back through the runc shim.
#[test]
fn test_containerd_runs_an_image_through_kata_snap() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let Some(daemon) = Containerd::start(dir.path(), e) else {
        return;
    };
    let ctr = |args: &[&str]| daemon.ctr(args);
    let logs = || daemon.logs();
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
    let mut c = daemon.ctr_cmd();
    c.args([
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
}

/// Where the CNI plugins are in the rig (scripts/rig/rung4.sh puts Debian's
/// containernetworking-plugins there, containerd's default plugin directory).
const CNI_BIN: &str = "/opt/cni/bin";
/// The CNI bridge's subnet and its gateway (the host's end, on the bridge `ks-cni0`).
const CNI_GATEWAY: &str = "10.77.0.1";

/// One CNI network attachment, made as libcni makes it for containerd's CRI (Kubernetes): a
/// network namespace first, then the plugin called with `CNI_COMMAND=ADD` and the network's
/// config on stdin; deleted (`DEL`, then the namespace) on drop.
struct CniAttachment {
    netns: PathBuf,
    id: String,
    conf: String,
    /// The container's address and eth0's MAC, from the plugin's result.
    ip: String,
    mac: String,
}

impl CniAttachment {
    fn add(id: &str, data_dir: &Path) -> Self {
        let netns = PathBuf::from(format!("/run/netns/ks-cni-{id}-{}", std::process::id()));
        crate::runtime_net::new_netns(&netns).unwrap();
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "ks-cni",
            "type": "bridge",
            "bridge": "ks-cni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.77.0.0/24", "gateway": CNI_GATEWAY}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": data_dir,
            }
        })
        .to_string();
        let mut a = Self {
            netns,
            id: id.to_string(),
            conf,
            ip: String::new(),
            mac: String::new(),
        };
        let o = a.call("ADD");
        assert_eq!(o.code(), 0, "CNI ADD {id}: {o:?}");
        let r: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        a.ip = r["ips"][0]["address"]
            .as_str()
            .and_then(|c| c.split('/').next())
            .unwrap_or_default()
            .to_string();
        a.mac = r["interfaces"]
            .as_array()
            .and_then(|l| l.iter().find(|i| i["sandbox"].as_str() == a.netns.to_str()))
            .and_then(|i| i["mac"].as_str())
            .unwrap_or_default()
            .to_string();
        assert!(!a.ip.is_empty() && !a.mac.is_empty(), "CNI result: {r}");
        a
    }

    fn call(&self, command: &str) -> Output {
        use std::io::Write;
        let mut c = Command::new(format!("{CNI_BIN}/bridge"));
        c.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.id)
            .env("CNI_NETNS", &self.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_BIN)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(self.conf.as_bytes())
            .unwrap();
        crate::common::collect(child, T, &format!("CNI {command}"))
    }
}

impl Drop for CniAttachment {
    fn drop(&mut self) {
        let _ = self.call("DEL");
        crate::runtime_net::remove_netns(&self.netns);
    }
}

/// containerd with CNI, as Kubernetes' CRI drives them: each container's network namespace is
/// made and given to the CNI bridge plugin (Debian's containernetworking-plugins) before the
/// container is created in it (`ctr run --with-ns network:PATH`). Through kata-snap as through
/// runc: the host reaches a server container at its address, a second container reaches it
/// (its ARP entry for it is the MAC the plugin gave the server's eth0) and reaches the host at
/// the bridge's gateway.
#[test]
fn test_containerd_with_the_cni_bridge_plugin_as_with_runc() {
    let Some(art) = setup() else { return };
    if !Path::new(CNI_BIN).join("bridge").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide the CNI plugins in the rig (scripts/install-deps.sh, rung4.sh)"
        );
        println!("SKIPPED: {CNI_BIN}/bridge missing (apt-get install containernetworking-plugins)");
        return;
    }
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let Some(daemon) = Containerd::start(dir.path(), e) else {
        return;
    };
    let ipam = dir.path().join("ipam");
    let mut seen = Vec::new();
    for runtime in ["kata-snap", "runc"] {
        step(format!("containerd + CNI with {runtime}"));
        let server = CniAttachment::add(&format!("web-{runtime}"), &ipam);
        let client = CniAttachment::add(&format!("cli-{runtime}"), &ipam);
        let with_ns = |a: &CniAttachment| format!("network:{}", a.netns.display());
        // --no-pivot: the rig's root is an initramfs, where runc's pivot_root fails
        // (kata-snap accepts and ignores it).
        let mut run = vec!["run", "--snapshotter", "native", "--no-pivot"];
        if runtime == "kata-snap" {
            run.extend(["--runc-binary", BIN]);
        }
        let server_ns = with_ns(&server);
        let mut args = run.clone();
        args.extend([
            "-d",
            "--with-ns",
            &server_ns,
            IMAGE,
            "web",
            "sh",
            "-c",
            "mkdir -p /www && echo served-by-web > /www/index.html && \
             cat /sys/class/net/eth0/address > /www/mac && exec httpd -f -p 80 -h /www",
        ]);
        let o = daemon.ctr(&args);
        assert_eq!(o.code(), 0, "{runtime}: {o:?}{}", daemon.logs());
        let t0 = Instant::now();
        let from_host = crate::runtime_net::http_get(
            (server.ip.parse::<std::net::Ipv4Addr>().unwrap(), 80).into(),
            "/index.html",
        );
        measure(&format!("cni_first_reply_{runtime}"), ms_since(t0));
        let (host_port, to_host) = crate::runtime_net::one_message_server(CNI_GATEWAY);
        let script = format!(
            "wget -q -O - http://{ip}/index.html; \
             test \"$(wget -q -O - http://{ip}/mac)\" = {mac} && echo mac-is-cni-s; \
             awk '$1 == \"{ip}\" {{print $4}}' /proc/net/arp | grep -qx {mac} && echo arp-ok; \
             echo from-the-client | nc {CNI_GATEWAY} {host_port} && echo host-ok",
            ip = server.ip,
            mac = server.mac,
        );
        let client_ns = with_ns(&client);
        let mut args = run.clone();
        args.extend([
            "--rm",
            "--with-ns",
            &client_ns,
            IMAGE,
            "cli",
            "sh",
            "-c",
            &script,
        ]);
        let o = daemon.ctr(&args);
        let got = to_host.join().unwrap();
        let kill = daemon.ctr(&["task", "kill", "-s", "KILL", "web"]);
        let end = Instant::now() + T;
        while daemon.ctr(&["task", "delete", "web"]).code() != 0 {
            assert!(
                Instant::now() < end,
                "task web did not stop{}",
                daemon.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let rm = daemon.ctr(&["containers", "rm", "web"]);
        seen.push((runtime, (from_host, o.stdout.clone(), o.code(), got)));
        assert_eq!(
            seen.last().unwrap().1,
            (
                "served-by-web\n".to_string(),
                "served-by-web\nmac-is-cni-s\narp-ok\nhost-ok\n".to_string(),
                0,
                "from-the-client\n".to_string()
            ),
            "{runtime}: {o:?}{}",
            daemon.logs()
        );
        assert_eq!((kill.code(), rm.code()), (0, 0), "{kill:?} {rm:?}");
    }
}

/// `ctr run --mount` through kata-snap as through runc: the same host directory and read-only
/// file as Docker's `-v` test ([`Volume`]).
#[test]
fn test_containerd_mounts_as_with_runc() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let Some(daemon) = Containerd::start(dir.path(), e) else {
        return;
    };
    for runtime in ["kata-snap", "runc"] {
        step(format!("ctr run --mount with {runtime}"));
        let v = Volume::new(dir.path(), runtime);
        let dir_mount = format!(
            "type=bind,src={},dst=/data,options=rbind:rw",
            v.dir.display()
        );
        let file_mount = format!(
            "type=bind,src={},dst=/etc/app.conf,options=rbind:ro",
            v.file.display()
        );
        let mut args = vec!["run", "--rm", "--snapshotter", "native", "--no-pivot"];
        if runtime == "kata-snap" {
            args.extend(["--runc-binary", BIN]);
        }
        let id = format!("vol-{runtime}");
        args.extend([
            "--mount",
            &dir_mount,
            "--mount",
            &file_mount,
            IMAGE,
            &id,
            "sh",
            "-c",
            Volume::SCRIPT,
        ]);
        let o = daemon.ctr(&args);
        assert_eq!(
            (o.stdout.as_str(), o.code()),
            (VOLUME_SEEN, 0),
            "{runtime}: {o:?}{}",
            daemon.logs()
        );
        assert_eq!(v.host_view(), VOLUME_HOST_VIEW, "{runtime}");
    }
}
