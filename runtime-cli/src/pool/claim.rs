//! Claiming a ready shell: its socket renamed from `ready/` to `claimed/` (atomic: two clients
//! never get one shell), connected, and its peer checked to run as the caller or root.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::{peer_uid, preload, ready_sockets, trusted_peer};

/// Claims a ready shell of the snapshot's shape: exact size class first, else one that re-slots.
pub(super) fn claim(dir: &Path, vcpus: u8, mem_mib: u64) -> Option<(PathBuf, UnixStream)> {
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
    claim_first(dir, candidates)
}

/// Claims a ready shell that pre-loaded the template of key `key`.
pub(super) fn claim_preloaded(dir: &Path, key: &str) -> Option<(PathBuf, UnixStream)> {
    let prefix = preload::socket_prefix(key);
    let candidates = ready_sockets(dir).into_iter().filter(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
    });
    claim_first(dir, candidates.collect())
}

/// Claims the first of `candidates` (ready sockets) that no other client took first and whose
/// shell runs as the caller or root.
fn claim_first(dir: &Path, candidates: Vec<PathBuf>) -> Option<(PathBuf, UnixStream)> {
    for ready in candidates {
        let Some(name) = ready.file_name().map(|n| n.to_os_string()) else {
            continue;
        };
        let claimed = dir.join("claimed").join(&name);
        if std::fs::rename(&ready, &claimed).is_err() {
            continue; // another client was first
        }
        match UnixStream::connect(&claimed) {
            // The shell gets the caller's stdio: it must run as the caller (or root).
            Ok(s) => match peer_uid(&s) {
                Ok(uid) if trusted_peer(uid) => return Some((claimed, s)),
                Ok(uid) => {
                    tracing::warn!(
                        "refusing pool shell {}: it runs as uid {uid}, not as you or root",
                        claimed.display()
                    );
                    let _ = std::fs::remove_file(&claimed);
                }
                Err(e) => {
                    tracing::warn!("refusing pool shell {}: {e:#}", claimed.display());
                    let _ = std::fs::remove_file(&claimed);
                }
            },
            Err(e) => {
                tracing::warn!(
                    "pool shell {} is gone ({e}); trying another",
                    claimed.display()
                );
                let _ = std::fs::remove_file(&claimed);
            }
        }
    }
    None
}
