//! Files the agent writes into the container's root before its process runs
//! (`RunRequest::files`, protocol 7).
//!
//! Docker, nerdctl and CRI give a container its `/etc/resolv.conf`,
//! `/etc/hosts` and `/etc/hostname` as bind mounts of host files. A VM cannot
//! bind-mount a host file (no shared filesystem yet), so the runtime reads each
//! one when the container is created and the agent writes its content at the
//! same path in the container: a copy, not a live bind.

use serde::{Deserialize, Serialize};

use crate::validate::ValidationError;

/// Most files in one request.
pub const MAX_FILES: usize = 16;
/// Largest content of one file, in bytes.
pub const MAX_FILE_BYTES: usize = 64 * 1024;
/// Largest content of all the files of one request together, in bytes.
pub const MAX_FILES_TOTAL_BYTES: usize = 256 * 1024;
/// Longest path, in bytes (`PATH_MAX` - 1).
pub const MAX_FILE_PATH: usize = 4095;
/// Highest mode: permission bits with setuid, setgid and sticky.
pub const MAX_FILE_MODE: u32 = 0o7777;

/// One file to write in the container's root, owned by root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileContent {
    /// Absolute, normalised path in the container (no `.` or `..`
    /// component, no `//`, no NUL, no trailing `/`).
    pub path: String,
    /// The whole content (at most [`MAX_FILE_BYTES`]).
    pub content: Vec<u8>,
    /// Permission bits (at most [`MAX_FILE_MODE`]).
    pub mode: u32,
    /// Bind the file read-only onto itself once written (a `ro` bind).
    pub read_only: bool,
}

fn bad_path(path: &str) -> ValidationError {
    ValidationError::BadPath {
        field: "file path (absolute, normalised: no '.', '..' or '//')",
        path: path.chars().take(256).collect(),
    }
}

/// An absolute, normalised container path: starts with `/`, is not `/`
/// itself, no empty, `.` or `..` component, no trailing `/`, no NUL, at most
/// [`MAX_FILE_PATH`] bytes.
pub fn validate_file_path(path: &str) -> Result<(), ValidationError> {
    if path.len() > MAX_FILE_PATH {
        return Err(ValidationError::TooLong {
            field: "file path",
            len: path.len(),
            max: MAX_FILE_PATH,
        });
    }
    if path.contains('\0') {
        return Err(ValidationError::Nul { field: "file path" });
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(bad_path(path));
    };
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad_path(path));
    }
    Ok(())
}

impl crate::Validate for FileContent {
    fn validate(&self) -> Result<(), ValidationError> {
        validate_file_path(&self.path)?;
        if self.content.len() > MAX_FILE_BYTES {
            return Err(ValidationError::TooLong {
                field: "file content",
                len: self.content.len(),
                max: MAX_FILE_BYTES,
            });
        }
        if self.mode > MAX_FILE_MODE {
            return Err(ValidationError::OutOfRange {
                field: "file mode",
                value: format!("{:#o}", self.mode),
                allowed: "0..=0o7777".into(),
            });
        }
        Ok(())
    }
}

/// Checks a request's list of files: each one, their number, their total
/// size, and that no path appears twice.
pub fn validate_files(files: &[FileContent]) -> Result<(), ValidationError> {
    if files.len() > MAX_FILES {
        return Err(ValidationError::TooMany {
            field: "files",
            len: files.len(),
            max: MAX_FILES,
        });
    }
    let mut total = 0usize;
    for (i, f) in files.iter().enumerate() {
        crate::Validate::validate(f)?;
        total += f.content.len();
        if files[..i].iter().any(|g| g.path == f.path) {
            return Err(ValidationError::OutOfRange {
                field: "file path",
                value: f.path.chars().take(64).collect(),
                allowed: "each path once".into(),
            });
        }
    }
    if total > MAX_FILES_TOTAL_BYTES {
        return Err(ValidationError::TooLong {
            field: "files (all contents)",
            len: total,
            max: MAX_FILES_TOTAL_BYTES,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Validate;

    fn file(path: &str, len: usize) -> FileContent {
        FileContent {
            path: path.into(),
            content: vec![b'x'; len],
            mode: 0o644,
            read_only: false,
        }
    }

    #[test]
    fn test_files_good_accepted() {
        validate_files(&[]).unwrap();
        validate_files(&[
            file("/etc/resolv.conf", 40),
            file("/etc/hosts", 0),
            FileContent {
                mode: MAX_FILE_MODE,
                read_only: true,
                ..file("/etc/hostname", MAX_FILE_BYTES)
            },
        ])
        .unwrap();
        // The limits themselves are fine: 16 files, 256 KiB in all.
        let each = MAX_FILES_TOTAL_BYTES / MAX_FILES;
        let many: Vec<_> = (0..MAX_FILES)
            .map(|n| file(&format!("/f{n}"), each))
            .collect();
        validate_files(&many).unwrap();
    }

    #[test]
    fn test_files_count_bounded() {
        let many: Vec<_> = (0..=MAX_FILES)
            .map(|n| file(&format!("/f{n}"), 1))
            .collect();
        assert_eq!(
            validate_files(&many),
            Err(ValidationError::TooMany {
                field: "files",
                len: MAX_FILES + 1,
                max: MAX_FILES
            })
        );
    }

    #[test]
    fn test_files_one_content_bounded() {
        assert_eq!(
            file("/etc/hosts", MAX_FILE_BYTES + 1).validate(),
            Err(ValidationError::TooLong {
                field: "file content",
                len: MAX_FILE_BYTES + 1,
                max: MAX_FILE_BYTES
            })
        );
    }

    #[test]
    fn test_files_total_bounded() {
        // Five files of 64 KiB: each allowed, 320 KiB in all is not.
        let many: Vec<_> = (0..5)
            .map(|n| file(&format!("/f{n}"), MAX_FILE_BYTES))
            .collect();
        assert_eq!(
            validate_files(&many),
            Err(ValidationError::TooLong {
                field: "files (all contents)",
                len: 5 * MAX_FILE_BYTES,
                max: MAX_FILES_TOTAL_BYTES
            })
        );
    }

    #[test]
    fn test_files_paths_absolute_and_normalised() {
        for good in ["/etc/resolv.conf", "/a", "/a/b.c/..d/d..", "/.hidden"] {
            file(good, 1)
                .validate()
                .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "",
            "/",
            "etc/hosts",
            "/etc//hosts",
            "//etc/hosts",
            "/etc/hosts/",
            "/etc/../hosts",
            "/..",
            "/etc/./hosts",
            "/.",
        ] {
            let e = file(bad, 1).validate().expect_err(bad);
            assert!(
                matches!(e, ValidationError::BadPath { .. }),
                "{bad:?}: {e:?}"
            );
        }
        assert_eq!(
            file("/etc/ho\0sts", 1).validate(),
            Err(ValidationError::Nul { field: "file path" })
        );
        let long = format!("/{}", "a".repeat(MAX_FILE_PATH));
        assert!(matches!(
            file(&long, 1).validate(),
            Err(ValidationError::TooLong { .. })
        ));
    }

    #[test]
    fn test_files_mode_bounded() {
        for ok in [0, 0o644, 0o4755, MAX_FILE_MODE] {
            FileContent {
                mode: ok,
                ..file("/f", 1)
            }
            .validate()
            .unwrap();
        }
        for no in [0o10000, 0o100644, u32::MAX] {
            let e = FileContent {
                mode: no,
                ..file("/f", 1)
            }
            .validate()
            .expect_err("mode");
            assert!(e.to_string().contains("file mode"), "{e}");
        }
    }

    #[test]
    fn test_files_path_once() {
        let e = validate_files(&[file("/etc/hosts", 1), file("/etc/hosts", 2)]).unwrap_err();
        assert!(e.to_string().contains("each path once"), "{e}");
    }

    #[test]
    fn test_files_round_trip_in_a_create_and_are_checked_there() {
        let files = vec![
            FileContent {
                path: "/etc/resolv.conf".into(),
                content: b"nameserver 10.0.0.1\n\xff\x00binary".to_vec(),
                mode: 0o644,
                read_only: false,
            },
            FileContent {
                path: "/etc/hosts".into(),
                content: Vec::new(),
                mode: 0o600,
                read_only: true,
            },
        ];
        let mut req = crate::validate::tests::run();
        req.files = files.clone();
        let msg = crate::HostMessage::Create(Box::new(req.clone()));
        let mut wire = Vec::new();
        crate::write_message(&mut wire, &msg).unwrap();
        let got: crate::HostMessage = crate::read_message(&mut wire.as_slice()).unwrap();
        assert_eq!(got, msg);

        // The request's validation covers its files: refused at the sender.
        req.files.push(file("relative", 1));
        let msg = crate::HostMessage::Create(Box::new(req));
        assert!(crate::write_message(&mut Vec::new(), &msg).is_err());
    }
}
