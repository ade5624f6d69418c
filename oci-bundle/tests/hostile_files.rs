//! config.json as an attacker or an accident leaves it: every case fails
//! fast with one line naming the file and the cause.

mod common;

use std::os::unix::fs::symlink;
use std::time::{Duration, Instant};

use common::{TestBundle, minimal};
use oci_bundle::{BundleError, ConfigError, MAX_CONFIG_BYTES};

fn one_line(e: &BundleError) -> String {
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "multi-line error: {msg}");
    msg
}

#[test]
fn test_config_missing_reported() {
    let b = TestBundle::new();
    let e = b.load().unwrap_err();
    let msg = one_line(&e);
    assert!(matches!(e, BundleError::ConfigMissing { .. }), "{msg}");
    assert!(msg.ends_with("config.json does not exist"), "{msg}");
}

#[test]
fn test_bundle_dir_missing_reported() {
    let e = oci_bundle::load(std::path::Path::new("/nonexistent/bundle")).unwrap_err();
    let msg = one_line(&e);
    assert!(matches!(e, BundleError::BundleDir { .. }), "{msg}");
    assert!(msg.contains("/nonexistent/bundle"), "{msg}");
}

#[test]
fn test_bundle_dir_is_a_file_reported() {
    let b = TestBundle::new();
    b.write(&minimal(&["sh"]));
    let e = oci_bundle::load(&b.config_path()).unwrap_err();
    assert!(matches!(e, BundleError::BundleNotDir { .. }), "{e}");
}

#[test]
fn test_config_fifo_refused_without_blocking() {
    let b = TestBundle::new();
    nix_mkfifo(&b.config_path());
    let t0 = Instant::now();
    let e = b.load().unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5));
    let msg = one_line(&e);
    assert!(
        matches!(e, BundleError::ConfigNotRegular { kind: "FIFO", .. }),
        "{msg}"
    );
    assert!(
        msg.contains("config.json is a FIFO, not a regular file"),
        "{msg}"
    );
}

fn nix_mkfifo(path: &std::path::Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn test_config_directory_refused() {
    let b = TestBundle::new();
    std::fs::create_dir(b.config_path()).unwrap();
    let e = b.load().unwrap_err();
    let msg = one_line(&e);
    assert!(
        msg.contains("config.json is a directory, not a regular file"),
        "{msg}"
    );
}

#[test]
fn test_config_symlink_to_dev_zero_refused() {
    let b = TestBundle::new();
    symlink("/dev/zero", b.config_path()).unwrap();
    let e = b.load().unwrap_err();
    let msg = one_line(&e);
    assert!(matches!(e, BundleError::ConfigSymlink { .. }), "{msg}");
    assert!(msg.contains("config.json is a symbolic link"), "{msg}");
}

#[test]
fn test_config_symlink_to_regular_file_refused() {
    let b = TestBundle::new();
    let real = b.path().join("real.json");
    std::fs::write(&real, serde_json::to_vec(&minimal(&["sh"])).unwrap()).unwrap();
    symlink(&real, b.config_path()).unwrap();
    assert!(matches!(
        b.load().unwrap_err(),
        BundleError::ConfigSymlink { .. }
    ));
}

#[test]
fn test_config_too_large_refused() {
    let b = TestBundle::new();
    let f = std::fs::File::create(b.config_path()).unwrap();
    // Sparse: costs nothing on disk.
    f.set_len(MAX_CONFIG_BYTES + 1).unwrap();
    let e = b.load().unwrap_err();
    let msg = one_line(&e);
    assert!(matches!(e, BundleError::ConfigTooLarge { .. }), "{msg}");
    assert!(msg.contains("config.json is too large"), "{msg}");
}

#[test]
fn test_config_at_bound_is_read() {
    // Whitespace-padded to exactly the bound: read, then parsed.
    let b = TestBundle::new();
    let mut bytes = serde_json::to_vec(&minimal(&["sh"])).unwrap();
    bytes.resize(MAX_CONFIG_BYTES as usize, b' ');
    b.write_raw(bytes);
    b.load().unwrap();
}

#[test]
fn test_config_empty_reported_as_invalid_json() {
    let b = TestBundle::new();
    b.write_raw("");
    let e = b.load().unwrap_err();
    let msg = one_line(&e);
    assert!(matches!(e, BundleError::ConfigSyntax { .. }), "{msg}");
    assert!(msg.contains("line 1 column 0"), "{msg}");
}

#[test]
fn test_config_truncated_reported_with_line_and_column() {
    let b = TestBundle::new();
    let full = serde_json::to_string_pretty(&minimal(&["sh"])).unwrap();
    b.write_raw(&full[..full.len() / 2]);
    let e = b.load().unwrap_err();
    let msg = one_line(&e);
    assert!(matches!(e, BundleError::ConfigSyntax { .. }), "{msg}");
    assert!(
        msg.contains("config.json is not valid JSON: EOF while parsing"),
        "{msg}"
    );
    assert!(msg.contains(" line ") && msg.contains(" column "), "{msg}");
}

#[test]
fn test_config_garbage_reported_with_line_and_column() {
    let b = TestBundle::new();
    b.write_raw("{\n  \"ociVersion\": \"1.0.2\",\n  oops\n}");
    let msg = one_line(&b.load().unwrap_err());
    assert!(msg.contains("line 3 column 3"), "{msg}");
}

#[test]
fn test_config_binary_reported_as_invalid_json() {
    let b = TestBundle::new();
    b.write_raw([0xff, 0xfe, 0, 1, 2, 3]);
    assert!(matches!(
        b.load().unwrap_err(),
        BundleError::ConfigSyntax { .. }
    ));
}

#[test]
fn test_config_not_an_object_refused() {
    let b = TestBundle::new();
    b.write_raw("[1, 2, 3]");
    let e = b.load().unwrap_err();
    let msg = one_line(&e);
    assert!(matches!(e, BundleError::ConfigSchema { .. }), "{msg}");
}

#[test]
fn test_config_wrong_type_reported_with_line_and_column() {
    let b = TestBundle::new();
    let mut c = minimal(&["sh"]);
    c["process"]["user"]["uid"] = "root".into();
    b.write(&c);
    let e = b.load().unwrap_err();
    let msg = one_line(&e);
    assert!(matches!(e, BundleError::ConfigSchema { .. }), "{msg}");
    assert!(msg.contains("invalid type: string \"root\""), "{msg}");
    assert!(msg.contains(" line ") && msg.contains(" column "), "{msg}");
}

#[test]
fn test_config_args_not_array_reported() {
    let b = TestBundle::new();
    let mut c = minimal(&["sh"]);
    c["process"]["args"] = "sh -c true".into();
    b.write(&c);
    assert!(matches!(
        b.load().unwrap_err(),
        BundleError::ConfigSchema { .. }
    ));
}

#[test]
fn test_config_unknown_rlimit_refused() {
    let b = TestBundle::new();
    let mut c = minimal(&["sh"]);
    c["process"]["rlimits"][0]["type"] = "RLIMIT_BOGUS".into();
    b.write(&c);
    let msg = one_line(&b.load().unwrap_err());
    assert!(msg.contains("RLIMIT_BOGUS"), "{msg}");
}

/// An unknown capability (a newer kernel's) is skipped alone, with a note,
/// as runc warns: the config loads and the other names apply.
#[test]
fn test_config_unknown_capability_skipped_others_kept() {
    let b = TestBundle::new();
    let mut c = minimal(&["sh"]);
    c["process"]["capabilities"] = serde_json::json!({
        "bounding": ["CAP_FUTURE_THING", "CAP_KILL"],
        "effective": ["CAP_KILL"],
    });
    b.write(&c);
    let config = b.load().unwrap().config;
    assert!(
        config
            .ignored
            .iter()
            .any(|i| i
                == "process.capabilities.bounding CAP_FUTURE_THING: unknown capability, skipped"),
        "{:#?}",
        config.ignored
    );
    let caps = config.process.capabilities.unwrap();
    assert_eq!((caps.bounding, caps.effective), (1 << 5, 1 << 5));
    assert_eq!((caps.permitted, caps.inheritable, caps.ambient), (0, 0, 0));
}

/// `process.capabilities` of the wrong shape is refused, naming the set.
#[test]
fn test_config_capabilities_wrong_shape_refused() {
    let b = TestBundle::new();
    let mut c = minimal(&["sh"]);
    c["process"]["capabilities"] = serde_json::json!({"bounding": "CAP_KILL"});
    b.write(&c);
    let msg = one_line(&b.load().unwrap_err());
    assert!(msg.contains("capabilities"), "{msg}");
}

#[test]
fn test_rootfs_missing_reported() {
    let b = TestBundle::new();
    let mut c = minimal(&["sh"]);
    c["root"]["path"] = "nope".into();
    b.write(&c);
    let e = b.refused();
    assert!(matches!(e, ConfigError::RootfsMissing(_)));
    let msg = e.to_string();
    assert!(
        msg.starts_with("rootfs ") && msg.ends_with("nope does not exist"),
        "{msg}"
    );
}

#[test]
fn test_rootfs_not_directory_reported() {
    let b = TestBundle::new();
    std::fs::write(b.path().join("file"), "x").unwrap();
    let mut c = minimal(&["sh"]);
    c["root"]["path"] = "file".into();
    b.write(&c);
    let msg = b.refused().to_string();
    assert!(msg.ends_with("file is not a directory"), "{msg}");
}

#[test]
fn test_rootfs_symlink_to_directory_resolved() {
    let b = TestBundle::new();
    symlink("rootfs", b.path().join("link")).unwrap();
    let mut c = minimal(&["sh"]);
    c["root"]["path"] = "link".into();
    b.write(&c);
    let config = b.load().unwrap().config;
    assert_eq!(config.root, b.path().join("rootfs").canonicalize().unwrap());
}
