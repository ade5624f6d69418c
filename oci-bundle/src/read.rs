//! Reading config.json without trusting it: no blocking on a FIFO, no
//! following a symlink, no reading a device, a bound on the size.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use oci_spec::runtime::Spec;
use serde_json::Value;

use crate::error::BundleError;

/// Largest config.json accepted. runc's and Docker's are a few KiB; a
/// Docker config with its seccomp profile is about 30 KiB.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Sections kata-snap ignores whose oci-spec types are closed enums stricter
/// than runc (an unknown capability or seccomp action fails to parse there,
/// while runc skips it with a warning). When the typed parse fails, it is
/// retried without them, so they can never make a config unusable.
const LENIENT_SECTIONS: &[(&str, &str)] = &[
    ("/process", "capabilities"),
    ("/process", "ioPriority"),
    ("/process", "scheduler"),
    ("/linux", "seccomp"),
    ("/linux", "memoryPolicy"),
    ("/linux", "intelRdt"),
    ("/linux/resources", "devices"),
];

fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

fn open(path: &Path) -> Result<File, BundleError> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer. O_NOFOLLOW: a
    // symlink could point at a device whose open has side effects.
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ENOENT) => BundleError::ConfigMissing { path: path.into() },
            Some(libc::ELOOP) => BundleError::ConfigSymlink { path: path.into() },
            _ => BundleError::ConfigRead {
                path: path.into(),
                source,
            },
        })
}

/// Reads config.json: a regular file of at most [`MAX_CONFIG_BYTES`].
pub fn read_config(path: &Path) -> Result<Vec<u8>, BundleError> {
    let file = open(path)?;
    let read_err = |source| BundleError::ConfigRead {
        path: path.into(),
        source,
    };
    let meta = file.metadata().map_err(read_err)?;
    if !meta.file_type().is_file() {
        return Err(BundleError::ConfigNotRegular {
            path: path.into(),
            kind: kind_of(meta.file_type()),
        });
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(BundleError::ConfigTooLarge {
            path: path.into(),
            max: MAX_CONFIG_BYTES,
        });
    }
    // The size may change under us: never read past the bound.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(BundleError::ConfigTooLarge {
            path: path.into(),
            max: MAX_CONFIG_BYTES,
        });
    }
    Ok(bytes)
}

/// How long a process file that is a pipe may take to reach its end.
pub const PROCESS_PIPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads an `exec --process` file: the caller names it, so a symbolic link is followed (a
/// shell's `<(...)` is `/dev/fd/63`), and it may be a regular file or a pipe (FIFO), read to its
/// end within [`PROCESS_PIPE_TIMEOUT`]; at most [`MAX_CONFIG_BYTES`] either way. Anything else
/// (a directory, a device, a socket) is refused without being read.
pub fn read_process_file(path: &Path) -> Result<Vec<u8>, BundleError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ENOENT) => BundleError::ConfigMissing { path: path.into() },
            _ => BundleError::ConfigRead {
                path: path.into(),
                source,
            },
        })?;
    let read_err = |source| BundleError::ConfigRead {
        path: path.into(),
        source,
    };
    let ft = file.metadata().map_err(read_err)?.file_type();
    if ft.is_file() {
        drop(file);
        // The open above followed the link; read what it names as config.json is read.
        let real = std::fs::canonicalize(path).map_err(read_err)?;
        return read_config(&real);
    }
    if !ft.is_fifo() {
        return Err(BundleError::ConfigNotRegular {
            path: path.into(),
            kind: kind_of(ft),
        });
    }
    let deadline = std::time::Instant::now() + PROCESS_PIPE_TIMEOUT;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut file = file;
    loop {
        match file.read(&mut chunk) {
            Ok(0) => return Ok(bytes),
            Ok(n) => {
                bytes.extend_from_slice(&chunk[..n]);
                if bytes.len() as u64 > MAX_CONFIG_BYTES {
                    return Err(BundleError::ConfigTooLarge {
                        path: path.into(),
                        max: MAX_CONFIG_BYTES,
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(read_err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the pipe did not end within {PROCESS_PIPE_TIMEOUT:?}"),
                    )));
                }
                use std::os::fd::AsFd;
                let mut fds = [nix::poll::PollFd::new(
                    file.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let ms = left.as_millis().min(1000) as u16;
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
            }
            Err(e) => return Err(read_err(e)),
        }
    }
}

/// A parsed config.json.
pub struct Parsed {
    /// oci-spec's view.
    pub spec: Spec,
    /// Notes for the ignored list: lenient sections dropped to parse.
    pub notes: Vec<String>,
    /// `process.capabilities` as written: converted from the JSON, so that
    /// a name oci-spec does not know (a newer kernel's) is skipped alone.
    pub capabilities: Option<Value>,
    /// `linux.seccomp` as written: compiled from the JSON, so that an action
    /// or syscall oci-spec does not know is judged as runc judges it.
    pub seccomp: Option<Value>,
}

/// Parses config.json into oci-spec's [`Spec`]. Also returns notes for the
/// ignored list when a lenient section had to be dropped to parse.
pub fn parse_config(path: &Path, bytes: &[u8]) -> Result<Parsed, BundleError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|source| BundleError::ConfigSyntax {
            path: path.into(),
            source,
        })?;
    if !value.is_object() {
        return Err(BundleError::ConfigSchema {
            path: path.into(),
            source: <serde_json::Error as serde::de::Error>::custom(
                "the top level must be a JSON object",
            ),
        });
    }
    let capabilities = value.pointer("/process/capabilities").cloned();
    let seccomp = value.pointer("/linux/seccomp").cloned();
    let strict_err = match serde_json::from_slice::<Spec>(bytes) {
        Ok(spec) => {
            return Ok(Parsed {
                spec,
                notes: Vec::new(),
                capabilities,
                seccomp,
            });
        }
        Err(e) => e,
    };
    let mut lenient = value;
    let mut notes = Vec::new();
    let mut dropped = false;
    for (parent, key) in LENIENT_SECTIONS {
        if let Some(Value::Object(map)) = lenient.pointer_mut(parent)
            && map.remove(*key).is_some()
        {
            dropped = true;
            // Capabilities and seccomp are converted from the JSON itself (above).
            if matches!(
                (*parent, *key),
                ("/process", "capabilities") | ("/linux", "seccomp")
            ) {
                continue;
            }
            notes.push(format!(
                "{}.{key}: ignored, dropped before parsing since oci-spec refused the config ({strict_err})",
                parent.trim_start_matches('/').replace('/', ".")
            ));
        }
    }
    match (dropped, serde_json::from_value::<Spec>(lenient)) {
        (true, Ok(spec)) => {
            tracing::warn!(path = %path.display(), error = %strict_err,
                "config.json parsed only without sections kata-snap ignores");
            Ok(Parsed {
                spec,
                notes,
                capabilities,
                seccomp,
            })
        }
        _ => Err(BundleError::ConfigSchema {
            path: path.into(),
            source: strict_err,
        }),
    }
}
