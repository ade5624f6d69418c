//! A FUSE client written out by hand (the guest kernel's requests, byte for byte) over the
//! host-side driver harness: for virtio-fs tests here and in other crates (`test-utils`).

use std::ffi::CString;
use std::path::Path;

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, EntryOut, InHeader, InitIn, MkdirIn, OpenIn, OpenOut, OutHeader, ReadIn, WriteIn,
    WriteOut,
};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{Fs, FsConfig, FsHandler, FsLimits, FsShare};
use crate::virtio::test_utils::{Buf, Harness, test_memory};

/// FUSE opcode LOOKUP.
pub const LOOKUP: u32 = 1;
/// FUSE opcode FORGET.
pub const FORGET: u32 = 2;
/// FUSE opcode GETATTR.
pub const GETATTR: u32 = 3;
/// FUSE opcode SETATTR.
pub const SETATTR: u32 = 4;
/// FUSE opcode READLINK.
pub const READLINK: u32 = 5;
/// FUSE opcode SYMLINK.
pub const SYMLINK: u32 = 6;
/// FUSE opcode MKNOD.
pub const MKNOD: u32 = 8;
/// FUSE opcode MKDIR.
pub const MKDIR: u32 = 9;
/// FUSE opcode UNLINK.
pub const UNLINK: u32 = 10;
/// FUSE opcode RENAME.
pub const RENAME: u32 = 12;
/// FUSE opcode LINK.
pub const LINK: u32 = 13;
/// FUSE opcode OPEN.
pub const OPEN: u32 = 14;
/// FUSE opcode READ.
pub const READ: u32 = 15;
/// FUSE opcode WRITE.
pub const WRITE: u32 = 16;
/// FUSE opcode RELEASE.
pub const RELEASE: u32 = 18;
/// FUSE opcode INIT.
pub const INIT: u32 = 26;
/// FUSE opcode OPENDIR.
pub const OPENDIR: u32 = 27;
/// FUSE opcode READDIR.
pub const READDIR: u32 = 28;
/// FUSE opcode CREATE.
pub const CREATE: u32 = 35;
/// FUSE opcode FALLOCATE.
pub const FALLOCATE: u32 = 43;
/// FUSE opcode READDIRPLUS.
pub const READDIRPLUS: u32 = 44;

/// The root's node id.
pub const ROOT: u64 = 1;
/// The request queue (0 is the high-priority queue).
pub const REQUEST_QUEUE: usize = 1;

/// A harness around a virtio-fs device tagged `share0` sharing `dir` (`None`: a slot), initialized by the driver.
pub fn fs_harness(dir: Option<&Path>, read_only: bool, limits: FsLimits) -> Harness<FsHandler> {
    let mem = test_memory();
    let config = FsConfig {
        tag: "share0".into(),
        share: dir.map(|d| FsShare {
            dir: d.to_path_buf(),
            read_only,
        }),
        limits,
    };
    let mut h = Harness::new(Fs::new_fs(&config, mem.clone(), None).unwrap(), mem);
    h.driver.init(16);
    h
}

/// Sends one FUSE request (header + `body` readable, `out_len` writable); returns the reply's error (`i32::MIN`: used length 0, no reply) and payload.
pub fn call(
    h: &mut Harness<FsHandler>,
    opcode: u32,
    nodeid: u64,
    body: &[u8],
    out_len: u32,
) -> (i32, Vec<u8>) {
    call_as(h, (0, 0), opcode, nodeid, body, out_len)
}

/// [`call`] from the guest user `(uid, gid)` (the request header's credentials).
pub fn call_as(
    h: &mut Harness<FsHandler>,
    (uid, gid): (u32, u32),
    opcode: u32,
    nodeid: u64,
    body: &[u8],
    out_len: u32,
) -> (i32, Vec<u8>) {
    let hdr = InHeader {
        len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
        opcode,
        unique: 7,
        nodeid,
        uid,
        gid,
        pid: 1,
        padding: 0,
    };
    let mut req = hdr.as_slice().to_vec();
    req.extend_from_slice(body);
    let a = h.driver.alloc(req.len() as u64);
    h.driver.mem.write_slice(&req, GuestAddress(a)).unwrap();
    let o = h.driver.alloc(u64::from(out_len));
    let used = h
        .request(
            REQUEST_QUEUE,
            &[Buf::out(a, req.len() as u32), Buf::inp(o, out_len)],
        )
        .expect("the device answers");
    if used.len == 0 {
        return (i32::MIN, Vec::new());
    }
    let mut out = vec![0u8; used.len as usize];
    h.driver.mem.read_slice(&mut out, GuestAddress(o)).unwrap();
    let oh = OutHeader::from_slice(&out[..16]).copied().unwrap();
    assert_eq!(oh.len, used.len, "out header length = used length");
    assert_eq!(oh.unique, 7);
    (oh.error, out[16..].to_vec())
}

/// FUSE_INIT, asserted to succeed.
pub fn init(h: &mut Harness<FsHandler>) {
    let i = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 0x2_0000,
        flags: 0,
    };
    let (e, out) = call(h, INIT, 0, i.as_slice(), 256);
    assert_eq!(e, 0, "FUSE_INIT");
    assert!(out.len() >= 8);
}

/// A NUL-terminated name.
pub fn cstr(s: &str) -> Vec<u8> {
    CString::new(s).unwrap().into_bytes_with_nul()
}

/// Reads a `T` at the start of `b`.
pub fn obj<T: ByteValued + Copy>(b: &[u8]) -> T {
    *T::from_slice(&b[..std::mem::size_of::<T>()]).unwrap()
}

/// LOOKUP `name` under `parent`.
pub fn lookup(h: &mut Harness<FsHandler>, parent: u64, name: &str) -> Result<EntryOut, i32> {
    let (e, out) = call(h, LOOKUP, parent, &cstr(name), 256);
    if e != 0 {
        return Err(e);
    }
    Ok(obj(&out))
}

/// OPEN or OPENDIR (`op`) with `flags`; returns the handle.
pub fn open(h: &mut Harness<FsHandler>, op: u32, node: u64, flags: i32) -> Result<u64, i32> {
    let o = OpenIn {
        flags: flags as u32,
        fuse_flags: 0,
    };
    let (e, out) = call(h, op, node, o.as_slice(), 64);
    if e != 0 {
        return Err(e);
    }
    Ok(obj::<OpenOut>(&out).fh)
}

/// READ up to `size` bytes at offset 0.
pub fn read(h: &mut Harness<FsHandler>, node: u64, fh: u64, size: u32) -> Result<Vec<u8>, i32> {
    let r = ReadIn {
        fh,
        offset: 0,
        size,
        ..Default::default()
    };
    let (e, out) = call(h, READ, node, r.as_slice(), size + 16);
    if e != 0 {
        return Err(e);
    }
    Ok(out)
}

/// CREATE `name` (O_RDWR, 0644); returns the entry and handle.
pub fn create(h: &mut Harness<FsHandler>, parent: u64, name: &str) -> Result<(EntryOut, u64), i32> {
    let c = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0o022,
        fuse_flags: 0,
    };
    let mut body = c.as_slice().to_vec();
    body.extend_from_slice(&cstr(name));
    let (e, out) = call(h, CREATE, parent, &body, 512);
    if e != 0 {
        return Err(e);
    }
    let entry: EntryOut = obj(&out);
    let o: OpenOut = obj(&out[std::mem::size_of::<EntryOut>()..]);
    Ok((entry, o.fh))
}

/// WRITE `data` at offset 0; returns the bytes written.
pub fn write(h: &mut Harness<FsHandler>, node: u64, fh: u64, data: &[u8]) -> Result<u32, i32> {
    let w = WriteIn {
        fh,
        offset: 0,
        size: data.len() as u32,
        ..Default::default()
    };
    let mut body = w.as_slice().to_vec();
    body.extend_from_slice(data);
    let (e, out) = call(h, WRITE, node, &body, 64);
    if e != 0 {
        return Err(e);
    }
    Ok(obj::<WriteOut>(&out).size)
}

/// MKDIR `name` (0755).
pub fn mkdir(h: &mut Harness<FsHandler>, parent: u64, name: &str) -> Result<EntryOut, i32> {
    let m = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let mut body = m.as_slice().to_vec();
    body.extend_from_slice(&cstr(name));
    let (e, out) = call(h, MKDIR, parent, &body, 256);
    if e != 0 {
        return Err(e);
    }
    Ok(obj(&out))
}

/// Names in a READDIR reply (dirent: ino u64, off u64, namelen u32, type u32, name, pad to 8).
/// The names in a READDIR (or READDIRPLUS, `plus`) reply.
pub fn dirent_names(buf: &[u8], plus: bool) -> Vec<String> {
    let mut names = Vec::new();
    let mut p = 0;
    let skip = if plus {
        std::mem::size_of::<EntryOut>()
    } else {
        0
    };
    while p + skip + 24 <= buf.len() {
        let d = &buf[p + skip..];
        let namelen = u32::from_le_bytes(d[16..20].try_into().unwrap()) as usize;
        names.push(String::from_utf8_lossy(&d[24..24 + namelen]).into_owned());
        p += skip + ((24 + namelen + 7) & !7);
    }
    names
}

/// A FUSE error for `errno`.
pub fn neg(errno: i32) -> i32 {
    -errno
}
