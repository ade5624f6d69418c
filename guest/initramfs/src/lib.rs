//! A reproducible writer for the cpio "newc" format the kernel unpacks as an
//! initramfs (`Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Reproducible: entries are written sorted by name, every entry gets uid/gid
//! 0, the same mtime, and an inode number given by its position; nothing is
//! read from the build machine except the file contents handed in. The same
//! entries always give the same bytes.
#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::io::{self, Write};

use thiserror::Error;

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Errors of building an archive.
#[derive(Debug, Error)]
pub enum CpioError {
    /// A path that is empty, absolute, has `..`/`.` components or a NUL.
    #[error("invalid archive path {0:?}: must be relative, without '.', '..' or NUL")]
    BadPath(String),
    /// Two entries with the same path.
    #[error("duplicate archive path {0:?}")]
    Duplicate(String),
    /// An entry whose parent directory is not in the archive.
    #[error("{path:?} has no parent directory {parent:?} in the archive")]
    NoParent {
        /// The entry.
        path: String,
        /// Its missing parent.
        parent: String,
    },
    /// A file larger than the format's 32-bit size field.
    #[error("{0:?} is larger than 4 GiB")]
    TooLarge(String),
    /// Permission bits beyond 0o7777.
    #[error("{path:?} has invalid mode {mode:o}")]
    BadMode {
        /// The entry.
        path: String,
        /// The mode given.
        mode: u32,
    },
    /// Writing failed.
    #[error("write failed: {0}")]
    Io(#[from] io::Error),
}

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file with these contents.
    File(Vec<u8>),
    /// A symbolic link to this target.
    Symlink(String),
    /// A character device.
    CharDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    mode: u32,
    kind: EntryKind,
}

/// An archive being assembled; written in name order.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

fn check_path(path: &str) -> Result<(), CpioError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        Err(CpioError::BadPath(path.to_owned()))
    } else {
        Ok(())
    }
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry; `mode` holds the permission bits (e.g. `0o755`).
    pub fn add(&mut self, path: &str, mode: u32, kind: EntryKind) -> Result<&mut Self, CpioError> {
        check_path(path)?;
        if mode > 0o7777 {
            return Err(CpioError::BadMode {
                path: path.to_owned(),
                mode,
            });
        }
        if let EntryKind::File(data) = &kind
            && u32::try_from(data.len()).is_err()
        {
            return Err(CpioError::TooLarge(path.to_owned()));
        }
        if self.entries.contains_key(path) {
            return Err(CpioError::Duplicate(path.to_owned()));
        }
        self.entries.insert(path.to_owned(), Entry { mode, kind });
        Ok(self)
    }

    /// Writes the archive with every mtime set to `mtime` (seconds since the
    /// epoch; use `SOURCE_DATE_EPOCH` or 0).
    pub fn write(&self, mtime: u32, out: &mut impl Write) -> Result<u64, CpioError> {
        for path in self.entries.keys() {
            if let Some((parent, _)) = path.rsplit_once('/')
                && !matches!(
                    self.entries.get(parent),
                    Some(Entry {
                        kind: EntryKind::Dir,
                        ..
                    })
                )
            {
                return Err(CpioError::NoParent {
                    path: path.clone(),
                    parent: parent.to_owned(),
                });
            }
        }
        let mut w = Counting {
            inner: out,
            written: 0,
        };
        for (i, (path, e)) in self.entries.iter().enumerate() {
            let (type_bits, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match &e.kind {
                EntryKind::Dir => (S_IFDIR, 2, &[], (0, 0)),
                EntryKind::File(d) => (S_IFREG, 1, d, (0, 0)),
                EntryKind::Symlink(t) => (S_IFLNK, 1, t.as_bytes(), (0, 0)),
                EntryKind::CharDev { major, minor } => (S_IFCHR, 1, &[], (*major, *minor)),
            };
            let header = Header {
                ino: i as u32 + 1,
                mode: type_bits | e.mode,
                nlink,
                mtime,
                filesize: data.len() as u32,
                rdev,
            };
            write_entry(&mut w, &header, path, data)?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            mtime: 0,
            filesize: 0,
            rdev: (0, 0),
        };
        write_entry(&mut w, &trailer, TRAILER, &[])?;
        Ok(w.written)
    }
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    filesize: u32,
    rdev: (u32, u32),
}

struct Counting<'a, W: Write> {
    inner: &'a mut W,
    written: u64,
}

impl<W: Write> Counting<'_, W> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.inner.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }
    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }
}

fn write_entry<W: Write>(
    w: &mut Counting<'_, W>,
    h: &Header,
    name: &str,
    data: &[u8],
) -> io::Result<()> {
    let namesize = name.len() as u32 + 1;
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    let fields = [
        h.ino, h.mode, 0, 0, h.nlink, h.mtime, h.filesize, 0, 0, h.rdev.0, h.rdev.1, namesize, 0,
    ];
    w.put(MAGIC)?;
    for f in fields {
        w.put(format!("{f:08X}").as_bytes())?;
    }
    w.put(name.as_bytes())?;
    w.put(&[0])?;
    w.pad4()?;
    w.put(data)?;
    w.pad4()
}

/// The initramfs layout of the kata-snap guest: the agent as `/init`, the
/// mount points it uses, and `/dev/console` so the kernel can give PID 1 a
/// console before devtmpfs is mounted.
pub fn guest_initramfs(agent: Vec<u8>) -> Result<Archive, CpioError> {
    let mut a = Archive::new();
    for dir in ["dev", "proc", "sys", "run", "mnt", "tmp", "root"] {
        a.add(
            dir,
            if dir == "tmp" { 0o1777 } else { 0o755 },
            EntryKind::Dir,
        )?;
    }
    a.add(
        "dev/console",
        0o600,
        EntryKind::CharDev { major: 5, minor: 1 },
    )?;
    a.add("dev/null", 0o666, EntryKind::CharDev { major: 1, minor: 3 })?;
    a.add("init", 0o755, EntryKind::File(agent))?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(a: &Archive, mtime: u32) -> Vec<u8> {
        let mut v = Vec::new();
        a.write(mtime, &mut v).unwrap();
        v
    }

    #[test]
    fn test_write_same_entries_any_insertion_order_same_bytes() {
        let mut a = Archive::new();
        a.add("b", 0o755, EntryKind::Dir).unwrap();
        a.add("b/f", 0o644, EntryKind::File(b"hello".to_vec()))
            .unwrap();
        a.add("a", 0o755, EntryKind::Dir).unwrap();
        let mut b = Archive::new();
        b.add("a", 0o755, EntryKind::Dir).unwrap();
        b.add("b", 0o755, EntryKind::Dir).unwrap();
        b.add("b/f", 0o644, EntryKind::File(b"hello".to_vec()))
            .unwrap();
        assert_eq!(bytes(&a, 0), bytes(&b, 0));
        assert_ne!(bytes(&a, 0), bytes(&a, 1), "mtime must be written");
    }

    #[test]
    fn test_write_header_layout_exact() {
        let mut a = Archive::new();
        a.add("x", 0o644, EntryKind::File(b"abc".to_vec())).unwrap();
        let v = bytes(&a, 0x10);
        let header = std::str::from_utf8(&v[..110]).unwrap();
        assert_eq!(
            header,
            "070701\
             00000001000081A4000000000000000000000001\
             000000100000000300000000000000000000000000000000\
             0000000200000000"
        );
        // name "x\0" ends at 112, already aligned; data "abc" + 1 pad byte.
        assert_eq!(&v[110..112], b"x\0");
        assert_eq!(&v[112..116], b"abc\0");
        assert!(std::str::from_utf8(&v[116..122]).unwrap() == "070701");
        assert_eq!(v.len() % 4, 0);
        assert!(v.windows(11).any(|w| w == b"TRAILER!!!\0"));
    }

    #[test]
    fn test_add_bad_paths_rejected() {
        let mut a = Archive::new();
        for p in ["", "/abs", "a/../b", "./a", "a//b", "a\0b"] {
            assert!(
                matches!(a.add(p, 0o644, EntryKind::Dir), Err(CpioError::BadPath(_))),
                "{p:?}"
            );
        }
        a.add("d", 0o755, EntryKind::Dir).unwrap();
        assert!(matches!(
            a.add("d", 0o755, EntryKind::Dir),
            Err(CpioError::Duplicate(_))
        ));
        assert!(matches!(
            a.add("e", 0o17777, EntryKind::Dir),
            Err(CpioError::BadMode { .. })
        ));
    }

    #[test]
    fn test_write_missing_parent_rejected() {
        let mut a = Archive::new();
        a.add("nodir/f", 0o644, EntryKind::File(vec![])).unwrap();
        assert!(matches!(
            a.write(0, &mut Vec::new()),
            Err(CpioError::NoParent { .. })
        ));
    }

    #[test]
    fn test_guest_initramfs_has_init_and_console() {
        let a = guest_initramfs(b"\x7fELF".to_vec()).unwrap();
        let v = bytes(&a, 0);
        for name in ["init\0", "dev/console\0", "proc\0", "sys\0", "TRAILER!!!\0"] {
            assert!(
                v.windows(name.len()).any(|w| w == name.as_bytes()),
                "{name}"
            );
        }
    }
}
