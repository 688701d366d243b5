//! The fuser adapter: translates kernel requests into [`GranaryFs`] calls.
//!
//! Deliberately thin. Every request that may wait for the cluster is polled
//! once on the fuser thread and, if it must wait, handed to the tokio
//! runtime and answered from there, so the fuser threads never block on the
//! cluster and many reads are in flight at once. Every
//! write-type request is answered `EROFS`. Errors become errno values in one
//! place ([`FsError::errno`]).

use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use granary_core::tree::Timestamp;

use crate::error::FsError;
use crate::fs::{Attr, GranaryFs, Kind};

/// How long the kernel may cache entries and attributes: the version never changes.
pub const TTL: Duration = Duration::from_secs(24 * 3600);
/// Largest readahead the kernel is asked to do on its own.
pub const MAX_READAHEAD: u32 = 16 << 20;
/// Directory entries prepared per readdir request (the kernel's buffer takes fewer).
const DIR_PAGE: usize = 512;

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + Duration::from_nanos(t.nanos as u64)
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
    }
}

/// The kernel's view of an [`Attr`].
pub fn file_attr(a: &Attr) -> FileAttr {
    let t = time(a.mtime);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 128 << 10,
        flags: 0,
    }
}

/// [`GranaryFs`] behind fuser.
pub struct FuseAdapter {
    fs: Arc<GranaryFs>,
    rt: tokio::runtime::Handle,
    /// The kernel supports zero-message opens and we use them: `open`
    /// answers ENOSYS once and the kernel stops sending OPEN and RELEASE.
    /// `GRANARY_FUSE_OPEN=1` turns them off (for comparisons).
    zero_message_open: bool,
}

impl FuseAdapter {
    pub fn new(fs: Arc<GranaryFs>, rt: tokio::runtime::Handle) -> Self {
        Self {
            fs,
            rt,
            zero_message_open: false,
        }
    }

    /// Answers a request: polls its future once on the fuser thread (most
    /// lookups and cached reads finish there, without waking a tokio worker:
    /// a round trip saved per small file; disk cache and local pack reads
    /// reached in that poll block this thread instead of hopping to the
    /// blocking pool, see `granary_client::blocking`), and hands it to the
    /// runtime when it has to wait.
    fn run(&self, f: impl Future<Output = ()> + Send + 'static) {
        let _rt = self.rt.enter();
        let mut f = Box::pin(f);
        let mut cx = Context::from_waker(Waker::noop());
        // A panicking request must not take the fuser thread with it: its
        // reply is dropped with the future, and fuser answers EIO.
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            granary_client::blocking::may_block(|| f.as_mut().poll(&mut cx))
        }));
        let pending = match polled {
            Ok(p) => p.is_pending(),
            Err(_) => {
                tracing::error!("a request panicked; answered EIO");
                return;
            }
        };
        if pending {
            // Polled again (with a real waker) by the runtime.
            self.rt.spawn(f);
        }
    }
}

impl fuser::Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config
            .set_max_readahead(MAX_READAHEAD)
            .or_else(|max| config.set_max_readahead(max));
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_ASYNC_READ,
        ] {
            let _ = config.add_capabilities(flag);
        }
        // Zero-message opens: `open` answers ENOSYS, the kernel then opens
        // and closes files without asking us (keeping their page cache) and
        // reads come with handle 0 (see GranaryFs::read_inode).
        self.zero_message_open = std::env::var_os("GRANARY_FUSE_OPEN").is_none()
            && config.add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT).is_ok();
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (fs, name) = (self.fs.clone(), name.as_bytes().to_vec());
        self.run(async move {
            match fs.lookup(parent.0, &name).await {
                Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
                // Inode 0: the kernel caches the absence for the TTL too (a
                // version never gains the name), sparing repeated misses
                // such as an interpreter's import path search.
                Err(FsError::NotFound) => {
                    let none = file_attr(&Attr {
                        ino: 0,
                        kind: Kind::File,
                        size: 0,
                        perm: 0,
                        mtime: Timestamp::default(),
                        nlink: 0,
                        uid: 0,
                        gid: 0,
                    });
                    reply.entry(&TTL, &none, Generation(0))
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let fs = self.fs.clone();
        self.run(async move {
            match fs.getattr(ino.0).await {
                Ok(a) => reply.attr(&TTL, &file_attr(&a)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let fs = self.fs.clone();
        self.run(async move {
            match fs.readlink(ino.0).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        if self.zero_message_open {
            return reply.error(Errno::ENOSYS);
        }
        let fs = self.fs.clone();
        self.run(async move {
            match fs.open(ino.0).await {
                // NOFLUSH: close() need not wait for a FLUSH round trip; nothing is ever written.
                Ok(fh) => reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
                ),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = self.fs.clone();
        self.run(async move {
            let result = if fh.0 == 0 {
                fs.read_inode(ino.0, offset, size).await
            } else {
                fs.read(fh.0, offset, size).await
            };
            match result {
                Ok(d) => reply.data(&d),
                Err(e) => {
                    tracing::warn!(fh = fh.0, offset, size, "read failed: {e}");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lo: LockOwner, reply: ReplyEmpty) {
        // Nothing is ever written. ENOSYS makes the kernel stop sending FLUSH
        // on every close (with zero-message opens there is no open reply to
        // carry FOPEN_NOFLUSH).
        reply.error(Errno::ENOSYS);
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
        );
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let fs = self.fs.clone();
        self.run(async move {
            // Kernel offsets: 0 ".", 1 "..", 2 + i entry i; each entry carries the offset after it.
            let start = (offset as usize).saturating_sub(2);
            let entries = match fs.readdir_page(ino.0, start, DIR_PAGE).await {
                Ok(e) => e,
                Err(e) => return reply.error(errno(&e)),
            };
            let parent = fs.parent_of(ino.0);
            let dots = [
                (ino.0, FileType::Directory, b".".to_vec()),
                (parent, FileType::Directory, b"..".to_vec()),
            ];
            let all = dots.into_iter().enumerate().skip(offset as usize).chain(
                entries
                    .into_iter()
                    .enumerate()
                    .map(|(i, (n, a))| (start + 2 + i, (a.ino, file_type(a.kind), n))),
            );
            for (i, (child, kind, name)) in all {
                if reply.add(INodeNo(child), i as u64 + 1, kind, OsStr::from_bytes(&name)) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let fs = self.fs.clone();
        self.run(async move {
            let start = (offset as usize).saturating_sub(2);
            let entries = match fs.readdir_page(ino.0, start, DIR_PAGE).await {
                Ok(e) => e,
                Err(e) => return reply.error(errno(&e)),
            };
            let (me, parent) = match (fs.getattr(ino.0).await, fs.getattr(fs.parent_of(ino.0)).await) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => return reply.error(errno(&e)),
            };
            let all = [(b".".to_vec(), me), (b"..".to_vec(), parent)]
                .into_iter()
                .enumerate()
                .skip(offset as usize)
                .chain(entries.into_iter().enumerate().map(|(i, e)| (start + 2 + i, e)));
            for (i, (name, a)) in all {
                if reply.add(
                    INodeNo(a.ino),
                    i as u64 + 1,
                    OsStr::from_bytes(&name),
                    &TTL,
                    &file_attr(&a),
                    Generation(0),
                ) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, granary_core::tree::MAX_NAME_LEN as u32, 4096);
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS)
        } else {
            reply.ok()
        }
    }

    // ----- everything that would change the version: EROFS -----

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, _r: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _t: &Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _req: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, _f: i32, reply: ReplyCreate) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _i: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _o: u64,
        _l: u64,
        _m: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}

/// The kernel-side session of a mount: unmounts when dropped.
pub use fuser::BackgroundSession;

/// Mounts `fs` read-only on `mountpoint` as `granary:<name>` and serves it
/// from background threads; returns once the kernel has completed the
/// FUSE handshake, i.e. the mount is usable.
pub fn mount(
    fs: Arc<GranaryFs>,
    rt: tokio::runtime::Handle,
    mountpoint: &Path,
    name: &str,
    allow_other: bool,
) -> std::io::Result<BackgroundSession> {
    let mut options = fuser::Config::default();
    options.mount_options = vec![
        fuser::MountOption::FSName(format!("granary:{name}")),
        fuser::MountOption::Subtype("granary".into()),
        fuser::MountOption::RO,
        fuser::MountOption::NoAtime,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::DefaultPermissions,
    ];
    if allow_other {
        options.acl = fuser::SessionACL::All;
    }
    // A request thread may block on a disk read (see `FuseAdapter::run`);
    // 8 threads read 2,000 cached files in random order 10-20% slower than
    // 4 here (4 readers, 2 cores).
    options.n_threads = Some(4);
    let session = fuser::Session::new(FuseAdapter::new(fs, rt), mountpoint, &options)?;
    set_bdi_readahead(mountpoint, BDI_READAHEAD_KB);
    session.spawn()
}

/// The kernel's readahead for the mount, in KiB. The kernel offers FUSE only
/// 128 KiB at INIT; raising the mount's backing-device readahead afterwards
/// makes the kernel send 1 MiB reads and keep several in flight (measured on
/// one 256 MiB file, cold: 185 MB/s at 128 KiB, 530 MB/s at 4 MiB).
pub const BDI_READAHEAD_KB: u32 = 4096;

/// Best effort (needs root): sets `/sys/class/bdi/MAJ:MIN/read_ahead_kb` of
/// the filesystem mounted at `mountpoint`.
/// The device comes from /proc/self/mountinfo: a stat of the mountpoint would
/// wait for the session, which is not serving yet.
fn set_bdi_readahead(mountpoint: &Path, kb: u32) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let Some(want) = mountpoint.to_str() else { return };
    let Some(dev) = info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&want)).then(|| f.get(2).map(|d| d.to_string()))?
    }) else {
        return;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, kb.to_string()) {
        tracing::debug!("cannot raise readahead at {path}: {e}");
    }
}
