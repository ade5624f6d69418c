//! The container's `/etc/passwd`, read as runc reads it: only to find the
//! home directory of the process's uid when its environment has no `HOME`.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Most bytes of `/etc/passwd` read; the rest of a larger file is ignored.
pub const PASSWD_LIMIT: u64 = 1024 * 1024;

/// `HOME` for a uid without a passwd entry (runc's default).
pub const DEFAULT_HOME: &str = "/";

/// The home directory of `uid` in the passwd file at `path`, or `/` when the
/// file is missing, not a regular file, unreadable, or has no entry for it.
/// At most [`PASSWD_LIMIT`] bytes are read; the file is opened non-blocking
/// so a FIFO planted by the image cannot stall the caller.
pub fn home_dir(path: &Path, uid: u32) -> String {
    read_bounded(path)
        .and_then(|text| home_in(&text, uid).map(str::to_owned))
        .unwrap_or_else(|| DEFAULT_HOME.to_owned())
}

fn read_bounded(path: &Path) -> Option<String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(PASSWD_LIMIT).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The home field of the first entry of `text` whose uid is `uid`; an entry
/// with an empty home gives `/`.
pub fn home_in(text: &str, uid: u32) -> Option<&str> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 6 || fields[2].trim().parse::<u32>().ok()? != uid {
            return None;
        }
        Some(if fields[5].is_empty() {
            DEFAULT_HOME
        } else {
            fields[5]
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          # comment\n\
                          broken line\n\
                          app:x:1000:1000::/home/app:/bin/sh\n\
                          nohome:x:1001:1001:::/bin/sh\n\
                          dup:x:1000:1000::/elsewhere:/bin/sh\n";

    #[test]
    fn test_home_in_first_matching_uid_wins() {
        assert_eq!(home_in(PASSWD, 0), Some("/root"));
        assert_eq!(home_in(PASSWD, 1000), Some("/home/app"));
    }

    #[test]
    fn test_home_in_missing_uid_none_empty_home_slash() {
        assert_eq!(home_in(PASSWD, 4242), None);
        assert_eq!(home_in(PASSWD, 1001), Some("/"));
    }

    #[test]
    fn test_home_dir_missing_file_or_fifo_gives_slash() {
        assert_eq!(home_dir(Path::new("/nonexistent/passwd"), 0), "/");
        let dir = std::env::temp_dir().join(format!("agent-passwd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("passwd");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(home_dir(&fifo, 0), "/");
        std::fs::remove_file(&fifo).unwrap();
        std::fs::write(&fifo, PASSWD).unwrap();
        assert_eq!(home_dir(&fifo, 1000), "/home/app");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
