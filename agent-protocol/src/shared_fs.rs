//! The shared filesystem the agent mounts before the container's mounts
//! (`RunRequest::shared_fs`, protocol 8).
//!
//! The runtime stages every host directory or file an OCI bind mount names
//! (Docker's `-v`, `ctr run --mount`) under one host directory served by one
//! virtio-fs device. The agent mounts that device by its tag at
//! `mount_point`, a guest path of its own (under `/run/kata-snap/`, outside
//! every container's root), before it makes the container's mounts; each
//! host bind then reaches the container as an ordinary `bind` [`crate::Mount`]
//! whose source is `<mount_point>/<entry>`.

use serde::{Deserialize, Serialize};

use crate::messages::RootfsSource;
use crate::validate::ValidationError;

/// Longest tag, in bytes (the virtio-fs config space holds 36).
pub const MAX_TAG: usize = 36;
/// Longest mount point, in bytes (`PATH_MAX` - 1).
pub const MAX_MOUNT_POINT: usize = 4095;

/// A virtio-fs device to mount in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedFs {
    /// The device's tag: 1..=[`MAX_TAG`] bytes of printable ASCII other than
    /// space and `/` (`kata-shared`).
    pub tag: String,
    /// Where the agent mounts it: an absolute, normalised guest path (no `.`,
    /// `..` or empty component, no trailing `/`), not `/`, outside the
    /// container's root.
    pub mount_point: String,
}

fn bad_mount_point(path: &str) -> ValidationError {
    ValidationError::BadPath {
        field: "shared_fs mount_point (absolute, normalised, not '/')",
        path: path.chars().take(256).collect(),
    }
}

/// Whether `path` is `base` or below it (both absolute and normalised).
pub fn is_within(path: &str, base: &str) -> bool {
    let base = base.trim_end_matches('/');
    path.strip_prefix(base)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl SharedFs {
    /// Checks the tag and the mount point, and that the mount point is
    /// neither inside `rootfs` (a directory rootfs is a guest path) nor
    /// above it.
    pub fn validate_with(&self, rootfs: &RootfsSource) -> Result<(), ValidationError> {
        let t = &self.tag;
        if t.is_empty()
            || t.len() > MAX_TAG
            || !t.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
        {
            return Err(ValidationError::OutOfRange {
                field: "shared_fs tag",
                value: format!("{:?}", t.chars().take(64).collect::<String>()),
                allowed: format!("1..={MAX_TAG} bytes of printable ASCII without space or '/'"),
            });
        }
        let p = &self.mount_point;
        if p.len() > MAX_MOUNT_POINT {
            return Err(ValidationError::TooLong {
                field: "shared_fs mount_point",
                len: p.len(),
                max: MAX_MOUNT_POINT,
            });
        }
        if p.contains('\0') {
            return Err(ValidationError::Nul {
                field: "shared_fs mount_point",
            });
        }
        let Some(rest) = p.strip_prefix('/') else {
            return Err(bad_mount_point(p));
        };
        if rest
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad_mount_point(p));
        }
        if let RootfsSource::Directory { path } = rootfs
            && (is_within(p, path) || is_within(path, p))
        {
            return Err(ValidationError::BadPath {
                field: "shared_fs mount_point (outside the container's root)",
                path: p.chars().take(256).collect(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Validate;

    fn fs(tag: &str, mount_point: &str) -> SharedFs {
        SharedFs {
            tag: tag.into(),
            mount_point: mount_point.into(),
        }
    }

    fn block() -> RootfsSource {
        RootfsSource::Block {
            device: "/dev/vdb".into(),
            fs: None,
        }
    }

    #[test]
    fn test_shared_fs_good_accepted() {
        fs("kata-shared", "/run/kata-snap/shared")
            .validate_with(&block())
            .unwrap();
        fs(&"x".repeat(MAX_TAG), "/s")
            .validate_with(&block())
            .unwrap();
        fs("a~!@#$%^&*()_+={}[]|\\:;\"'<>,.?", "/run/a.b/..c")
            .validate_with(&block())
            .unwrap();
    }

    #[test]
    fn test_shared_fs_tag_checked() {
        for bad in [
            String::new(),
            "x".repeat(MAX_TAG + 1),
            "a/b".into(),
            "a b".into(),
            "a\0b".into(),
            "a\tb".into(),
            "é".into(),
            "\x7f".into(),
        ] {
            let e = fs(&bad, "/run/kata-snap/shared")
                .validate_with(&block())
                .expect_err(&bad);
            assert!(e.to_string().contains("shared_fs tag"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn test_shared_fs_mount_point_absolute_normalised_not_root() {
        for bad in [
            "",
            "/",
            "//",
            "run/kata-snap/shared",
            "/run//shared",
            "/run/shared/",
            "/run/../etc",
            "/run/./shared",
            "/..",
            "/.",
        ] {
            let e = fs("t", bad).validate_with(&block()).expect_err(bad);
            assert!(
                matches!(e, ValidationError::BadPath { .. }),
                "{bad:?}: {e:?}"
            );
        }
        assert_eq!(
            fs("t", "/run/a\0b").validate_with(&block()),
            Err(ValidationError::Nul {
                field: "shared_fs mount_point"
            })
        );
        let long = format!("/{}", "a".repeat(MAX_MOUNT_POINT));
        assert!(matches!(
            fs("t", &long).validate_with(&block()),
            Err(ValidationError::TooLong { .. })
        ));
    }

    #[test]
    fn test_shared_fs_mount_point_outside_a_directory_rootfs() {
        let dir = RootfsSource::Directory {
            path: "/tmp/bundle/rootfs".into(),
        };
        for bad in [
            "/tmp/bundle/rootfs",
            "/tmp/bundle/rootfs/mnt",
            "/tmp/bundle",
            "/tmp",
        ] {
            let e = fs("t", bad).validate_with(&dir).expect_err(bad);
            assert!(e.to_string().contains("outside the container"), "{e}");
        }
        for good in ["/tmp/bundle/rootfs2", "/tmp/bundle/shared", "/run/s"] {
            fs("t", good).validate_with(&dir).unwrap();
        }
    }

    #[test]
    fn test_shared_fs_round_trips_in_a_create_and_is_checked_there() {
        let mut req = crate::validate::tests::run();
        req.shared_fs = Some(fs("kata-shared", "/run/kata-snap/shared"));
        let msg = crate::HostMessage::Create(Box::new(req.clone()));
        let mut wire = Vec::new();
        crate::write_message(&mut wire, &msg).unwrap();
        let got: crate::HostMessage = crate::read_message(&mut wire.as_slice()).unwrap();
        assert_eq!(got, msg);

        req.shared_fs = Some(fs("kata-shared", "relative"));
        assert!(req.validate().is_err());
        let msg = crate::HostMessage::Run(Box::new(req));
        assert!(crate::write_message(&mut Vec::new(), &msg).is_err());
    }
}
