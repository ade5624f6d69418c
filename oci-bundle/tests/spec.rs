//! `default_spec()` is a config runc itself runs and kata-snap loads;
//! `features()` has the OCI features shape and tells the truth.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{TestBundle, fixture};
use serde_json::Value;

/// Why the runc test cannot run here, if it cannot.
fn runc_skip_reason() -> Option<String> {
    if !nix_is_root() {
        return Some("not root".into());
    }
    match Command::new("runc").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("runc --version exited with {}", o.status)),
        Err(e) => Some(format!("runc not found: {e}")),
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn busybox_rootfs(rootfs: &Path) {
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    for applet in ["sh", "echo", "cat", "true"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
}

#[test]
fn test_default_spec_matches_runc_spec_except_hostname_and_version() {
    let ours = oci_bundle::default_spec();
    let mut runc = fixture("runc-default.json");
    runc["hostname"] = ours["hostname"].clone();
    runc["ociVersion"] = ours["ociVersion"].clone();
    // The fixture is `runc spec` on a cgroup v1 host; on a v2 host (every guest is one) runc
    // adds a cgroup namespace, as kata-snap's spec does.
    runc["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "cgroup"}));
    assert_eq!(ours, runc);
}

#[test]
fn test_default_spec_loads_with_only_supported_mounts() {
    let b = TestBundle::new();
    b.write(&oci_bundle::default_spec());
    let c = b.load().unwrap().config;
    assert_eq!(c.process.args, ["sh"]);
    assert!(c.process.terminal);
    assert_eq!(c.mounts.len(), 7);
    for m in &c.mounts {
        assert!(
            agent_protocol::SUPPORTED_MOUNT_TYPES.contains(&m.fs_type.as_str()),
            "{m:?}"
        );
    }
}

/// runc 1.1 runs `default_spec()` (with a command and no terminal) on a
/// busybox rootfs, and kata-snap loads the same config.
#[test]
fn test_default_spec_runs_under_runc() {
    if let Some(reason) = runc_skip_reason() {
        println!("SKIPPED: {reason}");
        return;
    }
    if !Path::new("/bin/busybox").exists() {
        println!("SKIPPED: /bin/busybox not installed");
        return;
    }
    let b = TestBundle::new();
    busybox_rootfs(&b.path().join("rootfs"));
    let mut spec = oci_bundle::default_spec();
    spec["process"]["args"] = serde_json::json!(["/bin/sh", "-c", "echo hi; exit 3"]);
    spec["process"]["terminal"] = false.into();
    b.write(&spec);
    let c = b.load().unwrap().config;
    assert_eq!(c.process.args[0], "/bin/sh");

    let state = tempfile::tempdir().unwrap();
    let id = format!("oci-bundle-test-{}", std::process::id());
    let out = Command::new("runc")
        .arg("--root")
        .arg(state.path())
        .args(["run", "--bundle"])
        .arg(b.path())
        .arg(&id)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi\n",
        "stderr: {stderr}"
    );
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    // runc run removes the container when it exits; make sure.
    let _ = Command::new("runc")
        .arg("--root")
        .arg(state.path())
        .args(["delete", "--force", &id])
        .output();
}

#[test]
fn test_features_shape_and_values() {
    let f = oci_bundle::features();
    assert_eq!(f["ociVersionMin"], "1.0.0");
    assert_eq!(f["ociVersionMax"], oci_spec::runtime::VERSION);
    assert_eq!(
        f["hooks"],
        serde_json::json!([
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststart",
            "poststop"
        ])
    );
    let opts: Vec<&str> = f["mountOptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for o in [
        "ro",
        "nosuid",
        "nodev",
        "noexec",
        "rbind",
        "rprivate",
        "strictatime",
    ] {
        assert!(opts.contains(&o), "{o}");
    }
    let linux = &f["linux"];
    assert!(
        linux["namespaces"]
            .as_array()
            .unwrap()
            .contains(&Value::from("network"))
    );
    assert!(
        linux["capabilities"]
            .as_array()
            .unwrap()
            .contains(&Value::from("CAP_CHECKPOINT_RESTORE"))
    );
    assert_eq!(linux["seccomp"]["enabled"], true);
    assert!(
        linux["seccomp"]["supportedFlags"]
            .as_array()
            .unwrap()
            .contains(&Value::from("SECCOMP_FILTER_FLAG_LOG"))
    );
    for section in ["apparmor", "selinux", "intelRdt"] {
        assert_eq!(linux[section]["enabled"], false, "{section}");
    }
    assert_eq!(linux["cgroup"]["v2"], false);
    assert_eq!(f["annotations"]["dev.kata-snap.isolation"], "vm");
    // oci-spec's own Features type reads it: the shape is the standard one.
    let parsed: oci_spec::runtime::Features = serde_json::from_value(f).unwrap();
    assert_eq!(parsed.oci_version_max(), oci_spec::runtime::VERSION);
}

/// Every capability the features document claims to recognize is accepted
/// in a config.
#[test]
fn test_features_capabilities_accepted_in_config() {
    let caps = oci_bundle::features()["linux"]["capabilities"].clone();
    let b = TestBundle::new();
    let mut spec = oci_bundle::default_spec();
    spec["process"]["capabilities"]["bounding"] = caps;
    b.write(&spec);
    let ignored = b.load().unwrap().config.ignored;
    assert!(
        !ignored.iter().any(|i| i.contains("dropped")),
        "{ignored:#?}"
    );
}
