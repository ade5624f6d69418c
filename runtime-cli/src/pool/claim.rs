//! Claiming a ready shell: its socket renamed from `ready/` to `claimed/` (atomic: two clients
//! never get one shell), connected, and its peer checked: it runs as the caller or root, or
//! (a jailed pool) as a jail uid that the pool's allocator says its shell of that pid holds.
//! The claimed socket is removed once connected (the shell, jailed, cannot see it).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::UnixCredentials;

use super::{preload, ready_sockets};

/// Whether a claimed shell, as `SO_PEERCRED` describes it, may get the caller's request.
pub(super) type PeerCheck<'a> = &'a dyn Fn(&UnixCredentials) -> bool;

/// A claimed shell: its socket's name in `claimed/`, the connection, its credentials.
pub(super) type Claimed = (PathBuf, UnixStream, UnixCredentials);

/// Claims a ready shell of the snapshot's shape: exact size class first, else one that re-slots.
pub(super) fn claim(dir: &Path, vcpus: u8, mem_mib: u64, ok: PeerCheck) -> Option<Claimed> {
    let exact = format!("v{vcpus}-m{mem_mib}-");
    let any = format!("v{vcpus}-m");
    let mut candidates: Vec<PathBuf> = ready_sockets(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&any))
        })
        .collect();
    candidates.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&exact))
    });
    claim_first(dir, candidates, ok)
}

/// Claims a ready shell that pre-loaded the template of key `key`.
pub(super) fn claim_preloaded(dir: &Path, key: &str, ok: PeerCheck) -> Option<Claimed> {
    let prefix = preload::socket_prefix(key);
    let candidates = ready_sockets(dir).into_iter().filter(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
    });
    claim_first(dir, candidates.collect(), ok)
}

/// Claims the first of `candidates` (ready sockets) that no other client took first and whose
/// shell passes `ok`.
fn claim_first(dir: &Path, candidates: Vec<PathBuf>, ok: PeerCheck) -> Option<Claimed> {
    for ready in candidates {
        let Some(name) = ready.file_name().map(|n| n.to_os_string()) else {
            continue;
        };
        let claimed = dir.join("claimed").join(&name);
        if std::fs::rename(&ready, &claimed).is_err() {
            continue; // another client was first
        }
        let conn = UnixStream::connect(&claimed);
        // Connected or not, the name has served its purpose.
        let _ = std::fs::remove_file(&claimed);
        match conn {
            // The shell gets the caller's stdio and runs the caller's VM.
            Ok(s) => {
                match nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials) {
                    Ok(cred) if ok(&cred) => return Some((claimed, s, cred)),
                    Ok(cred) => {
                        tracing::warn!(
                            "refusing pool shell {}: it runs as uid {}, not as you or root nor as \
                         a jail uid of this pool's shell",
                            claimed.display(),
                            cred.uid()
                        );
                    }
                    Err(e) => {
                        tracing::warn!(
                            "refusing pool shell {}: SO_PEERCRED: {e}",
                            claimed.display()
                        );
                    }
                }
            }
            Err(e) => {
                tracing::warn!(
                    "pool shell {} is gone ({e}); trying another",
                    claimed.display()
                );
            }
        }
    }
    None
}
