//! The filesystem the FUSE server runs: `fuse-backend-rs`'s `PassthroughFs` over the share,
//! wrapped so a hostile guest cannot leave the share, write a read-only share, or make the
//! server hold unbounded host resources.
//!
//! What the wrapper adds to `PassthroughFs` (which already opens every name with `openat`
//! relative to its parent's `O_PATH` fd, `O_NOFOLLOW`, refuses names with `/`, maps `..` of the
//! root to `.`, and reopens only regular files and directories through `/proc/self/fd`):
//!
//! - names: `.`, `..`, empty names and names with `/` are refused in every request that takes a
//!   name (the Linux FUSE client never sends them without NFS export, which we do not offer);
//! - read-only shares: every request that could change the share fails with `EROFS`, and opens
//!   for writing or truncation too;
//! - caps: at most [`FsLimits::max_inodes`] inodes (each an `O_PATH` fd) and
//!   [`FsLimits::max_handles`] open files and directories; beyond them requests fail with `ENFILE`
//!   / `EMFILE` and the server holds nothing more;
//! - sizes: xattr buffers are capped at 64 KiB (xattrs are off in any case);
//! - credentials: the server never switches its thread's uid/gid to the guest's (`PassthroughFs`
//!   would call `setresuid` per request): entries are created by the VMM's own user, then
//!   given the requesting guest uid and gid (create, mkdir, mknod, symlink; a link shares its
//!   inode) with `fchownat(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)` on the new inode, as runc's
//!   container user would own them. In a set-group-ID directory the entry keeps the
//!   directory's group (the kernel's rule). A VMM that may not chown (no `CAP_CHOWN`: not root,
//!   or jailed without it) leaves the entry as created and says so once at debug level; the
//!   request does not fail. The chown clears set-user-ID and set-group-ID bits of a new file
//!   (the kernel's rule for chown); a guest `chmod` sets them again;
//! - open flags: only plain access-mode and I/O flags reach the host (`O_PATH`, `O_TMPFILE`,
//!   `O_CREAT`, `O_NOCTTY` and the like are dropped);
//! - device nodes: `mknod` of character or block devices is refused (`EPERM`).

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, FsOptions, OpenOptions, SetattrValid, stat64, statvfs64,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ROOT_ID, ZeroCopyReader,
    ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;

/// The most bytes of an xattr value or list the server allocates for one request.
pub const MAX_XATTR_SIZE: u32 = 64 * 1024;

/// Caps on what the guest can make the server hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsLimits {
    /// Inodes the guest knows (looked up and not forgotten), each an `O_PATH` fd on the host.
    pub max_inodes: usize,
    /// Open files and directories, each an fd on the host.
    pub max_handles: usize,
}

impl Default for FsLimits {
    /// 1024 inodes and 256 handles: about 1300 fds per share at most, so that a couple of
    /// shares fit under the jail's `RLIMIT_NOFILE` (4096) beside the VMM's own fds.
    fn default() -> Self {
        Self {
            max_inodes: 1024,
            max_handles: 256,
        }
    }
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Refuses names that are not a single plain path component.
pub fn check_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(err(libc::EINVAL));
    }
    Ok(())
}

/// The open flags passed on to the host: access mode and plain I/O flags only.
pub fn sanitize_open_flags(flags: u32) -> u32 {
    let keep = libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_TRUNC
        | libc::O_NONBLOCK
        | libc::O_DIRECT
        | libc::O_SYNC
        | libc::O_DSYNC
        | libc::O_LARGEFILE
        | libc::O_DIRECTORY
        | libc::O_NOATIME;
    flags & keep as u32
}

fn opens_for_writing(flags: u32) -> bool {
    let f = flags as i32;
    f & libc::O_ACCMODE != libc::O_RDONLY || f & libc::O_TRUNC != 0
}

/// What the wrapper counts.
#[derive(Debug, Default)]
struct Held {
    /// Inode -> lookup count the guest holds.
    inodes: HashMap<u64, u64>,
    handles: HashSet<u64>,
}

/// `PassthroughFs` confined: see the module documentation.
pub struct ConfinedFs {
    inner: PassthroughFs,
    read_only: bool,
    limits: FsLimits,
    held: Mutex<Held>,
    /// A chown of a new entry failed once (logged then, not again).
    chown_failed: AtomicBool,
}

impl std::fmt::Debug for ConfinedFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfinedFs")
            .field("read_only", &self.read_only)
            .field("limits", &self.limits)
            .finish()
    }
}

impl ConfinedFs {
    /// Wraps `inner`.
    pub fn new(inner: PassthroughFs, read_only: bool, limits: FsLimits) -> Self {
        Self {
            inner,
            read_only,
            limits,
            held: Mutex::new(Held::default()),
            chown_failed: AtomicBool::new(false),
        }
    }

    /// Gives the new `entry` (made in `parent` by the VMM's own user) the owner of the request:
    /// `ctx`'s uid, and its gid unless `parent` is set-group-ID. A failure leaves the entry as
    /// it is (logged once).
    fn give_owner(&self, ctx: &Context, parent: u64, entry: &mut Entry) {
        let own = Self::own(ctx);
        let mut valid = SetattrValid::empty();
        if entry.attr.st_uid != ctx.uid {
            valid |= SetattrValid::UID;
        }
        if entry.attr.st_gid != ctx.gid {
            let parent_setgid = self
                .inner
                .getattr(&own, parent, None)
                .is_ok_and(|(st, _)| st.st_mode & libc::S_ISGID != 0);
            if !parent_setgid {
                valid |= SetattrValid::GID;
            }
        }
        if valid.is_empty() {
            return;
        }
        let mut attr = entry.attr;
        attr.st_uid = ctx.uid;
        attr.st_gid = ctx.gid;
        match self.inner.setattr(&own, entry.inode, attr, None, valid) {
            Ok((st, _)) => entry.attr = st,
            Err(e) => {
                if !self.chown_failed.swap(true, Ordering::Relaxed) {
                    tracing::debug!(
                        uid = ctx.uid,
                        gid = ctx.gid,
                        error = %e,
                        "cannot give new entries the guest's owner (no CAP_CHOWN?); \
                         they keep the VMM's (logged once)"
                    );
                }
            }
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inodes the guest holds now (tests, metrics).
    pub fn inodes_held(&self) -> usize {
        self.held().inodes.len()
    }

    /// Handles open now (tests, metrics).
    pub fn handles_held(&self) -> usize {
        self.held().handles.len()
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(err(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// Counts one more reference to `entry`'s inode; a new inode past the cap is given back to
    /// the inner filesystem and refused.
    fn account(&self, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        let mut held = self.held();
        if entry.inode == ROOT_ID {
            return Ok(entry);
        }
        if let Some(n) = held.inodes.get_mut(&entry.inode) {
            *n += 1;
            return Ok(entry);
        }
        if held.inodes.len() >= self.limits.max_inodes {
            drop(held);
            self.inner.forget(ctx, entry.inode, 1);
            return Err(err(libc::ENFILE));
        }
        held.inodes.insert(entry.inode, 1);
        Ok(entry)
    }

    fn unaccount(&self, inode: u64, count: u64) {
        let mut held = self.held();
        if let Some(n) = held.inodes.get_mut(&inode) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                held.inodes.remove(&inode);
            }
        }
    }

    fn reserve_handle(&self) -> io::Result<()> {
        if self.held().handles.len() >= self.limits.max_handles {
            return Err(err(libc::EMFILE));
        }
        Ok(())
    }

    fn record_handle(&self, h: Option<u64>) {
        if let Some(h) = h {
            self.held().handles.insert(h);
        }
    }

    /// The identity requests run with: the VMM's own (uid 0 tells `PassthroughFs` to switch
    /// nothing).
    fn own(ctx: &Context) -> Context {
        Context {
            uid: 0,
            gid: 0,
            pid: ctx.pid,
        }
    }
}

impl FileSystem for ConfinedFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut opts = self.inner.init(capable)?;
        if self.read_only {
            opts.remove(FsOptions::WRITEBACK_CACHE);
        }
        // No DAX window: per-file DAX is never offered.
        opts.remove(FsOptions::PERFILE_DAX);
        let mut held = self.held();
        held.inodes.clear();
        held.handles.clear();
        Ok(opts)
    }

    fn destroy(&self) {
        self.inner.destroy();
        let mut held = self.held();
        held.inodes.clear();
        held.handles.clear();
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        check_name(name)?;
        let e = self.inner.lookup(ctx, parent, name)?;
        self.account(ctx, e)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.inner.forget(ctx, inode, count);
        self.unaccount(inode, count);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for &(inode, count) in &requests {
            self.unaccount(inode, count);
        }
        self.inner.batch_forget(ctx, requests);
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        self.inner
            .setattr(&Self::own(ctx), inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        let mut e = self
            .inner
            .symlink(&Self::own(ctx), linkname, parent, name)?;
        self.give_owner(ctx, parent, &mut e);
        self.account(ctx, e)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        match mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            _ => return Err(err(libc::EPERM)),
        }
        let mut e = self
            .inner
            .mknod(&Self::own(ctx), parent, name, mode, rdev, umask)?;
        self.give_owner(ctx, parent, &mut e);
        self.account(ctx, e)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        let mut e = self
            .inner
            .mkdir(&Self::own(ctx), parent, name, mode, umask)?;
        self.give_owner(ctx, parent, &mut e);
        self.account(ctx, e)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_name(name)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_name(name)?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        check_name(oldname)?;
        check_name(newname)?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        check_name(newname)?;
        let e = self
            .inner
            .link(&Self::own(ctx), inode, newparent, newname)?;
        self.account(ctx, e)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let flags = sanitize_open_flags(flags);
        if opens_for_writing(flags) {
            self.writable()?;
        }
        self.reserve_handle()?;
        let r = self.inner.open(ctx, inode, flags, fuse_flags)?;
        self.record_handle(r.0);
        Ok(r)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.writable()?;
        check_name(name)?;
        self.reserve_handle()?;
        args.flags = sanitize_open_flags(args.flags);
        let (mut e, h, o, p) = self.inner.create(&Self::own(ctx), parent, name, args)?;
        self.record_handle(h);
        self.give_owner(ctx, parent, &mut e);
        match self.account(ctx, e) {
            Ok(e) => Ok((e, h, o, p)),
            Err(x) => {
                if let Some(h) = h {
                    let _ = self.inner.release(ctx, e.inode, 0, h, false, false, None);
                    self.held().handles.remove(&h);
                }
                Err(x)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.held().handles.remove(&handle);
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner
            .getxattr(ctx, inode, name, size.min(MAX_XATTR_SIZE))
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size.min(MAX_XATTR_SIZE))
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.reserve_handle()?;
        let r = self.inner.opendir(ctx, inode, sanitize_open_flags(flags))?;
        self.record_handle(r.0);
        Ok(r)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        // Each entry is a lookup the guest will forget: count it, or stop the listing at the cap
        // (the inner filesystem gives back an entry the callback takes 0 bytes of).
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, &mut |d, e| {
                let ino = e.inode;
                {
                    let held = self.held();
                    if ino != ROOT_ID
                        && !held.inodes.contains_key(&ino)
                        && held.inodes.len() >= self.limits.max_inodes
                    {
                        return Ok(0);
                    }
                }
                let n = add_entry(d, e)?;
                if n > 0 && ino != ROOT_ID {
                    *self.held().inodes.entry(ino).or_insert(0) += 1;
                }
                Ok(n)
            })
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.held().handles.remove(&handle);
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.writable()?;
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_check_name_dots_slashes_empty_refused() {
        for bad in [&b"\0"[..], b".\0", b"..\0", b"a/b\0", b"/\0", b"../etc\0"] {
            let c = CStr::from_bytes_with_nul(bad).unwrap();
            assert_eq!(
                check_name(c).unwrap_err().raw_os_error(),
                Some(libc::EINVAL)
            );
        }
        check_name(c"file.txt").unwrap();
        check_name(c"...").unwrap();
    }

    #[test]
    fn test_sanitize_open_flags_drops_path_and_tmpfile() {
        let f =
            (libc::O_RDWR | libc::O_PATH | libc::O_TMPFILE | libc::O_CREAT | libc::O_APPEND) as u32;
        let s = sanitize_open_flags(f) as i32;
        assert_eq!(s & libc::O_PATH, 0);
        assert_eq!(s & libc::O_CREAT, 0);
        // O_TMPFILE includes O_DIRECTORY; the __O_TMPFILE bit itself must be gone.
        assert_ne!(s & libc::O_TMPFILE, libc::O_TMPFILE);
        assert_eq!(s & libc::O_ACCMODE, libc::O_RDWR);
        assert_ne!(s & libc::O_APPEND, 0);
    }
}
