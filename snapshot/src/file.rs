//! Opening the files of a snapshot as hostile input: a path may name a FIFO, a device or a
//! directory. Files are opened without blocking (a FIFO with no writer would block `open`),
//! checked to be regular files, and read with a bound.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What kind of file a path is, for messages.
fn kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens `path` read-only without blocking and checks it is a regular file; the returned file is
/// in blocking mode again. A non-regular file gives an `InvalidInput` error naming its kind.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    let ft = f.metadata()?.file_type();
    if !ft.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {}, not a regular file", kind(ft)),
        ));
    }
    clear_nonblock(&f)?;
    Ok(f)
}

/// Clears O_NONBLOCK on `f`.
pub fn clear_nonblock(f: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: F_GETFL on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with flags read above, minus O_NONBLOCK.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads all of `f`, refusing more than `max` bytes (the file may grow while it is read).
pub fn read_bounded(f: &mut File, max: u64) -> std::io::Result<Vec<u8>> {
    let len = f.metadata()?.len();
    if len > max {
        return Err(too_large(len, max));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64, max));
    }
    Ok(bytes)
}

fn too_large(len: u64, max: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{len} bytes is more than the {max} bytes accepted"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_open_regular_refuses_fifo_device_and_directory_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix_mkfifo(&fifo);
        for (p, what) in [
            (fifo.as_path(), "a FIFO"),
            (Path::new("/dev/zero"), "a character device"),
            (dir.path(), "a directory"),
        ] {
            let e = open_regular(p).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{p:?}");
            assert!(e.to_string().contains(what), "{e}");
        }
        let f = dir.path().join("f");
        std::fs::write(&f, b"abc").unwrap();
        let mut file = open_regular(&f).unwrap();
        assert_eq!(read_bounded(&mut file, 3).unwrap(), b"abc");
        let mut file = open_regular(&f).unwrap();
        assert!(read_bounded(&mut file, 2).is_err());
    }

    fn nix_mkfifo(p: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
}
