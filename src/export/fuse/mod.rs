//! The FUSE frontend: `MOUNT/<vm>/{vm.json,diskN.raw}` over the datastore.
//!
//! Several event threads serve the mount, each a fuser session on its own
//! clone of the /dev/fuse file (`daemon::fuse_mount`); they share one
//! `RecoverFs` (a clone per session, its state behind `Arc`s).
//! A read whose blocks are all local, or a write that needs neither a fetch
//! nor a map sync, is served on the event thread. Anything that may wait is
//! handed off, so an event thread never blocks on a device sync or the
//! repository. A miss within one block (nearly every guest read: they are
//! at most a block and aligned) waits holding no thread: its reply goes
//! with the fetch, and the fetch engine CPU thread that ends the fetch
//! answers it (`Volume::read_later`), so queued misses are bounded by the
//! engine, not by threads. Other misses and first writes to a block go to
//! an I/O worker pool, fsync and flush to a sync pool (one guest's fsync
//! never stalls reads of other VMs' staged blocks).
//!
//! **Kernel passthrough** (opt-in, `serve --fuse-passthrough`): read-only
//! opens of complete disks are read by the kernel from the staging (or
//! relocation target) file without the daemon; while they last, writable
//! opens of that disk are refused. See `passthrough`.

use std::ffi::OsStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::error::Error;

pub mod adopt;
mod handles;
mod inherited;
pub mod inodes;
pub mod keeper;
pub mod keeper_watch;
mod passthrough;
mod seek;
use crate::disk::{ReadDone, Spawner};
use crate::pool::WorkerPool;
use crate::session::{Datastore, Session};
use crate::volume::Volume;
use handles::Handles;
use inherited::Inherited;
use inodes::Inodes;
use keeper::InitParams;
use passthrough::Passthrough;

const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;
/// Largest read/write the kernel may send us.
pub const MAX_IO: u32 = 1 << 20;

/// What an inode number denotes.
enum Node {
    Root,
    Dir(Arc<Session>),
    Config(Arc<Session>),
    Disk(Arc<Session>, Arc<Volume>),
}

#[derive(Clone)]
pub struct RecoverFs {
    ds: Arc<Datastore>,
    inodes: Arc<Inodes>,
    io: Arc<WorkerPool>,
    /// `io` as a `Spawner`, for reads answered later.
    io_spawn: Spawner,
    /// Its threads: also the kernel's limit of background requests.
    io_threads: usize,
    sync: Arc<WorkerPool>,
    /// Owner of every file and directory (the hypervisor's user).
    uid: u32,
    gid: u32,
    mounted: SystemTime,
    /// Kernel passthrough of read-only opens, and every disk open's mode.
    passthrough: Arc<Passthrough>,
    /// Set once mounted: drops the kernel's cached pages of a disk that
    /// another frontend wrote (see `watch_disk`).
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// What the kernel said at INIT, for the keeper (see `keeper`).
    init_params: Arc<OnceLock<InitParams>>,
    /// Opens made under a crashed daemon whose connection was adopted.
    inherited: Arc<Inherited>,
    /// Open disk handles, kept in staging for a daemon adopting the
    /// connection (see `handles`).
    handles: Arc<Handles>,
    /// Set once the crashed daemon's handles are counted.
    adopted: Arc<OnceLock<()>>,
}

thread_local! {
    /// True while this thread serves a FUSE write: the kernel keeps its own
    /// cache right for those, and asking it to drop pages it holds locked
    /// for this very write would deadlock.
    static SERVING_FUSE_WRITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as the FUSE write it serves (see `SERVING_FUSE_WRITE`).
fn as_fuse_write<T>(f: impl FnOnce() -> T) -> T {
    SERVING_FUSE_WRITE.with(|w| w.set(true));
    let r = f();
    SERVING_FUSE_WRITE.with(|w| w.set(false));
    r
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl RecoverFs {
    /// `io_threads` wait for fetches (one per queued guest request the
    /// kernel may send: match the fetch engine's GETs in flight).
    /// `owner` (uid, gid) owns the files; by default the daemon's user.
    /// `passthrough`: let the kernel read complete disks' files itself on
    /// read-only opens (see `passthrough`).
    pub fn new(
        ds: Arc<Datastore>,
        io_threads: usize,
        owner: Option<(u32, u32)>,
        passthrough: bool,
    ) -> Self {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let me = unsafe { (libc::getuid(), libc::getgid()) };
        let (uid, gid) = owner.unwrap_or(me);
        let io = Arc::new(WorkerPool::new("fuse-io", io_threads));
        let pool = io.clone();
        RecoverFs {
            ds,
            inodes: Arc::new(Inodes::default()),
            io,
            io_spawn: Arc::new(move |job| pool.submit(job)),
            io_threads,
            sync: Arc::new(WorkerPool::new("fuse-sync", 8)),
            uid,
            gid,
            mounted: SystemTime::now(),
            passthrough: Arc::new(Passthrough::new(passthrough)),
            notifier: Arc::new(OnceLock::new()),
            init_params: Arc::new(OnceLock::new()),
            inherited: Arc::default(),
            handles: Arc::new(Handles::in_memory()),
            adopted: Arc::default(),
        }
    }

    /// Keeps the inode numbers in `inodes` (a table kept in staging, so a
    /// daemon adopting this connection after a crash answers them alike).
    /// The open handles kept beside it come with it (see `handles`).
    pub fn with_inodes(mut self, inodes: Inodes) -> Self {
        if let Some(h) = inodes.take_handles() {
            self.handles = Arc::new(h);
        }
        self.inodes = Arc::new(inodes);
        self
    }

    /// Where the kernel's INIT parameters land once the mount is up.
    pub fn init_params(&self) -> Arc<OnceLock<InitParams>> {
        self.init_params.clone()
    }

    /// Counts an open inherited from a crashed daemon at its first I/O
    /// (see `inherited`); our own handles pass at the cost of a compare.
    fn note_handle(&self, req: &Request, ino: u64, fh: FileHandle) {
        if passthrough::is_ours(fh) {
            return;
        }
        if let Some(Node::Disk(s, d)) = self.node(ino) {
            self.inherited.seen(ino, fh.0, &s, d.index, req.pid());
        }
    }

    /// Where the daemon puts the mount's notifier once it has one.
    pub fn notifier_slot(&self) -> Arc<OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// The kernel caches a disk's pages across opens (`FOPEN_KEEP_CACHE`),
    /// which stays right for FUSE's own writes; a write over NBD or NFS must
    /// drop the pages it changed, or a later FUSE read returns old bytes.
    fn watch_disk(&self, ino: u64, d: &Volume) {
        if d.writes_watched() {
            return;
        }
        let notifier = self.notifier.clone();
        // Once a minute per disk: every write of a busy guest could fail.
        let log = crate::util::LogLimit::new(std::time::Duration::from_secs(60));
        d.watch_writes(Box::new(move |off, len| {
            if SERVING_FUSE_WRITE.with(|w| w.get()) {
                return;
            }
            if let Some(n) = notifier.get() {
                let (off, len) = (off.min(i64::MAX as u64), len.min(i64::MAX as u64));
                if let Err(e) = n.inval_inode(INodeNo(ino), off as i64, len as i64) {
                    // ENOENT: the kernel holds nothing of the inode.
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        if let Some(held) = log.check(std::time::Instant::now()) {
                            tracing::warn!(ino, "dropping the kernel's cached pages: {e}; {held} more since the last line");
                        }
                    }
                }
            }
        }));
    }

    /// The inode table, for the release hook that forgets a session.
    pub fn inodes(&self) -> Arc<Inodes> {
        self.inodes.clone()
    }

    fn node(&self, ino: u64) -> Option<Node> {
        if ino == ROOT {
            return Some(Node::Root);
        }
        let (s, rel) = self.inodes.session_of(&self.ds, ino)?;
        match rel {
            0 => Some(Node::Dir(s)),
            1 => Some(Node::Config(s)),
            n => {
                let d = s.disks.get((n - 2) as usize)?.clone();
                Some(Node::Disk(s, d))
            }
        }
    }

    fn attr(&self, ino: u64, node: &Node) -> FileAttr {
        let (kind, perm, size, nlink, time) = match node {
            Node::Root => (FileType::Directory, 0o755, 0, 2, self.mounted),
            Node::Dir(s) => (FileType::Directory, 0o700, 0, 2, s.started),
            Node::Config(s) => (
                FileType::RegularFile,
                0o400,
                s.config_json.len() as u64,
                1,
                s.started,
            ),
            Node::Disk(s, d) => (FileType::RegularFile, 0o600, d.size, 1, s.started),
        };
        // A disk's allocated bytes, so a sparse one looks sparse (see `seek`).
        let used = match node {
            Node::Disk(_, d) => {
                let data = d.chunks().data_chunks();
                seek::allocated_bytes(size, d.block_size(), data, d.changed_blocks())
            }
            _ => size,
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: used.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn disk(&self, ino: u64) -> Result<Arc<Volume>, Errno> {
        match self.node(ino) {
            Some(Node::Disk(_, d)) => Ok(d),
            Some(_) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }
}

impl Filesystem for RecoverFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let abi = config.kernel_abi();
        // Every session after the first is started with the first one's
        // INIT replayed (`adopt`): its answer goes nowhere, so only the
        // first one's settings and warnings count.
        let first = (self.init_params)
            .set(InitParams {
                major: abi.0,
                minor: abi.1,
                capabilities: config.capabilities().bits(),
            })
            .is_ok();
        // Large requests keep per-request overhead low for VM disk I/O.
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // As many background requests (readahead, async direct I/O) as the
        // io pool has threads, so queued guest I/O reaches the fetch engine.
        let bg = self.io_threads.clamp(1, u16::MAX as usize) as u16;
        let _ = config.set_max_background(bg);
        let _ = config.set_congestion_threshold((bg / 4 * 3).max(1));
        // Without ASYNC_DIO the kernel turns a guest's queue of O_DIRECT AIO
        // requests into one request at a time, so QD16 behaves like QD1.
        let async_dio = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        if let (Err(missing), true) = (async_dio, first) {
            tracing::warn!(
                "kernel lacks FUSE capabilities {missing:?}: queued direct I/O is serialised"
            );
        }
        if first {
            self.passthrough.negotiate(config);
        }
        self.adopt_handles();
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_str().unwrap_or("");
        let found = match self.node(parent.0) {
            Some(Node::Root) => match self.ds.session(name) {
                Some(s) => match self.inodes.base_of(&s) {
                    Some(b) => Some(b),
                    None => return reply.error(Errno::EIO),
                },
                None => None,
            },
            // The directory's base was recorded when it was looked up.
            Some(Node::Dir(s)) => match name {
                "vm.json" => self.inodes.base_of(&s).map(|b| b + 1),
                _ => name
                    .strip_prefix("disk")
                    .and_then(|n| n.strip_suffix(".raw"))
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|&i| i < s.disks.len() && name == format!("disk{i}.raw"))
                    .and_then(|i| self.inodes.base_of(&s).map(|b| b + 2 + i as u64)),
            },
            _ => None,
        };
        match found.and_then(|ino| self.node(ino).map(|n| (ino, n))) {
            Some((ino, node)) => reply.entry(&TTL, &self.attr(ino, &node), fuser::Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino.0) {
            Some(n) => reply.attr(&TTL, &self.attr(ino.0, &n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
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
        let Some(node) = self.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let cur = self.attr(ino.0, &node);
        // A virtual disk's size and ownership are fixed: truncation would
        // destroy the guest's disk. Timestamp updates are accepted and ignored.
        let size_change = size.is_some_and(|s| s != cur.size);
        let mode_change = mode.is_some_and(|m| m & 0o7777 != cur.perm as u32);
        let owner_change = uid.is_some_and(|u| u != cur.uid) || gid.is_some_and(|g| g != cur.gid);
        if size_change || mode_change || owner_change {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &cur)
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM)
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM)
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EPERM)
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _r: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM)
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM)
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino.0) {
            Some(Node::Config(_)) => {
                if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                    return reply.error(Errno::EACCES);
                }
                reply.opened(FileHandle(0), FopenFlags::empty())
            }
            Some(Node::Disk(s, d)) => {
                // Recording the open syncs a file in staging (`handles`),
                // and a passthrough open may wait: never on an event thread
                // (review32 L9).
                let (fs, pid, unique) = (self.clone(), req.pid(), req.unique().0);
                (self.io).submit(move || fs.open_disk(pid, unique, ino.0, s, d, flags, reply));
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Forgotten in memory here, so a writable open right after it is
        // not refused for it; the table is written and the release
        // answered on an io thread: never an fsync on an event thread
        // (review32 L9).
        if !self.release_handle(ino.0, fh) || !self.handles.kept() {
            return reply.ok();
        }
        let handles = self.handles.clone();
        (self.io).submit(move || {
            handles.save_release();
            reply.ok()
        });
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.note_handle(req, ino.0, fh);
        let d = match self.node(ino.0) {
            Some(Node::Config(s)) => {
                let data = &s.config_json;
                let start = (offset as usize).min(data.len());
                let end = (start + size as usize).min(data.len());
                return reply.data(&data[start..end]);
            }
            Some(Node::Disk(_, d)) => d,
            Some(_) => return reply.error(Errno::EISDIR),
            None => return reply.error(Errno::ENOENT),
        };
        // `read_bytes`: a hit is one pread into the reply buffer.
        let serve =
            move |d: Arc<Volume>, reply: ReplyData| match d.read_bytes(offset, size as usize) {
                Ok(buf) => reply.data(&buf),
                Err(e) => reply.error(errno(&e)),
            };
        if d.is_local(offset, size as u64) {
            return serve(d, reply);
        }
        // A miss within one block waits for its fetch holding no thread:
        // the fetch engine answers it; other misses wait on an io worker.
        let done: ReadDone = Box::new(move |r| match r {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(errno(&e)),
        });
        if let Err(done) = d.read_later(offset, size as usize, done, &self.io_spawn) {
            self.io
                .submit(move || done(d.read_bytes(offset, size as usize)))
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.note_handle(req, ino.0, fh);
        let d = match self.disk(ino.0) {
            Ok(d) => d,
            Err(e) => return reply.error(if e == Errno::EISDIR { Errno::EACCES } else { e }),
        };
        let serve =
            move |d: Arc<Volume>, data: &[u8], reply: ReplyWrite| match as_fuse_write(|| {
                d.write(offset, data)
            }) {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(errno(&e)),
            };
        if d.write_is_quick(offset, data.len() as u64) {
            serve(d, data, reply)
        } else {
            let data = data.to_vec();
            self.io.submit(move || serve(d, &data, reply))
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.note_handle(req, ino.0, fh);
        self.fsync(req, ino, fh, true, reply)
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.node(ino.0) {
            Some(Node::Disk(_, d)) => self.sync.submit(move || match d.flush() {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::warn!(vm = %d.vm, disk = d.index, "fsync answered with an error: {e}");
                    reply.error(errno(&e))
                }
            }),
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        len: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // Punching a hole (a guest's discard, e.g. QEMU's discard=unmap)
        // and zeroing a range both make the range read as zeros: holes in
        // staging, blocks marked changed, so staging is freed and the next
        // live backup records zero chunks. Other modes (allocation, which
        // a fixed-size disk cannot promise): callers fall back.
        let zero = mode == libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            || mode & !libc::FALLOC_FL_KEEP_SIZE == libc::FALLOC_FL_ZERO_RANGE;
        if !zero {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let d = match self.disk(ino.0) {
            Ok(d) => d,
            Err(e) => return reply.error(if e == Errno::EISDIR { Errno::EACCES } else { e }),
        };
        self.io.submit(
            move || match as_fuse_write(|| d.write_zeroes(offset, len)) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            },
        )
    }

    /// SEEK_DATA / SEEK_HOLE from the disk's block status (see `seek`).
    /// Passthrough opens reach here too (the kernel passes reads and
    /// writes to the backing file, never lseek); their disk is complete,
    /// its holes are the zero blocks never written, which the staging file
    /// leaves as holes too, so both answers agree.
    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        // Never ENOSYS: the kernel would stop asking for the whole mount.
        let Some(want) = seek::Want::of(whence) else {
            return reply.error(Errno::EINVAL);
        };
        let answer = |r: Result<u64, Errno>, reply: ReplyLseek| match r {
            Ok(at) => reply.offset(at as i64),
            Err(e) => reply.error(e),
        };
        let d = match self.node(ino.0) {
            Some(Node::Disk(_, d)) => d,
            Some(Node::Config(s)) => {
                return answer(
                    seek::all_data(s.config_json.len() as u64, offset, want),
                    reply,
                )
            }
            Some(_) => return reply.error(Errno::EINVAL),
            None => return reply.error(Errno::ENOENT),
        };
        match seek::seek(&*d, offset, want, seek::EVENT_THREAD) {
            Ok(seek::Seek::At(at)) => answer(Ok(at), reply),
            Err(e) => answer(Err(e), reply),
            // A long scan: on a worker, not the event thread.
            Ok(seek::Seek::Unsure) => self
                .io
                .submit(move || answer(seek::settle(&*d, offset, want, seek::WORKER), reply)),
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENODATA)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut entries: Vec<(u64, FileType, String)> =
            vec![(ino.0, FileType::Directory, ".".into())];
        match self.node(ino.0) {
            Some(Node::Root) => {
                entries.push((ROOT, FileType::Directory, "..".into()));
                // A VM whose number cannot be recorded is left out.
                for s in self.ds.sessions() {
                    if let Some(b) = self.inodes.base_of(&s) {
                        entries.push((b, FileType::Directory, s.vm.clone()));
                    }
                }
            }
            Some(Node::Dir(s)) => {
                // Recorded: the directory's inode is this base.
                let base = ino.0;
                entries.push((ROOT, FileType::Directory, "..".into()));
                entries.push((base + 1, FileType::RegularFile, "vm.json".into()));
                for d in &s.disks {
                    entries.push((
                        base + 2 + d.index as u64,
                        FileType::RegularFile,
                        format!("disk{}.raw", d.index),
                    ));
                }
            }
            Some(_) => return reply.error(Errno::ENOTDIR),
            None => return reply.error(Errno::ENOENT),
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (mut blocks, mut free) = (0u64, 0u64);
        if let Ok(st) = nix::sys::statvfs::statvfs(self.ds.staging_root()) {
            let frag = st.fragment_size();
            blocks = st.blocks() * frag / 4096;
            free = st.blocks_available() * frag / 4096;
        }
        reply.statfs(blocks, free, free, 0, 0, 4096, 255, 4096)
    }
}
