//! A temporary bundle directory for tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use oci_bundle::{BundleError, ConfigError};
use serde_json::Value;

/// A bundle in a temporary directory, with an empty `rootfs/`.
pub struct TestBundle {
    pub dir: tempfile::TempDir,
}

impl TestBundle {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.json")
    }

    pub fn write(&self, config: &Value) {
        self.write_raw(serde_json::to_vec_pretty(config).unwrap());
    }

    pub fn write_raw(&self, bytes: impl AsRef<[u8]>) {
        std::fs::write(self.config_path(), bytes).unwrap();
    }

    pub fn load(&self) -> Result<oci_bundle::Bundle, BundleError> {
        oci_bundle::load(self.path())
    }

    /// Loads and expects a refusal of a converted config; returns it and
    /// checks the one-line message names config.json.
    pub fn refused(&self) -> ConfigError {
        let e = self.load().unwrap_err();
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "multi-line error: {msg}");
        assert!(msg.contains("config.json"), "{msg}");
        match e {
            BundleError::Config { error, .. } => error,
            other => panic!("not a config error: {other}"),
        }
    }
}

/// A fixture under tests/fixtures as JSON.
pub fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// runc's default spec with `args` replaced.
pub fn minimal(args: &[&str]) -> Value {
    let mut c = fixture("runc-default.json");
    c["process"]["args"] = args.iter().map(|a| Value::from(*a)).collect();
    c
}
