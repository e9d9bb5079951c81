//! The NFS namespace over the datastore: `/` lists the VMs being served,
//! `/<vm>/` holds `vm.json`, `diskN.raw` and the hypervisor's own side
//! files (`.lck-*`, `.vmx`, `vmware.log`, ...).
//!
//! **Handles are stable.** A handle names its object by identity, not by
//! a number handed out at run time: a hash of the VM name, a hash of the
//! backup id, and the disk index or the side file's inode number. So a
//! client keeps its handles across a daemon restart (the restarted daemon
//! resumes the sessions it was serving), and a handle of a disk from one
//! backup never reaches a session recovered from another (it is stale).
//!
//! A side file's inode number is reused by the filesystem once the file
//! is removed, so its handle also carries the inode's generation (the
//! number ext4, xfs and btrfs give each use of an inode, as knfsd does):
//! a handle of a removed file is stale, never another file's. Where the
//! filesystem has no generation (tmpfs) or the inode number needs more than
//! 32 bits, the handle carries the inode number alone.
//!
//! **Side files** live in the session's staging (`files/` in its
//! directory): they survive restarts and go away with `release --discard`.
//! Disk files and vm.json refuse removal, renaming, truncation and changes
//! of owner or mode (NFS3ERR_PERM).
//!
//! **Permissions** are checked here, per call, against the caller's AUTH_UNIX
//! identity after root squashing: VM directories are 0700, disks 0600 and
//! vm.json 0400, owned by `--owner` (default: the daemon's user).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use nfs3_types::nfs3::{fattr3, ftype3, nfsstat3, nfstime3, specdata3};

use crate::error::{Error, ErrorKind};
use crate::placement::ExportPoint;
use crate::session::{Datastore, Session};
use crate::staging::io::{OsStorage, Storage};
use crate::volume::Volume;

const MAGIC: &[u8; 2] = b"RF";
const VERSION: u8 = 1;
const HANDLE_LEN: usize = 4 + 8 + 8 + 8;

/// A caller after root squashing.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub gids: Vec<u32>,
}

/// What a handle names, resolved against the live sessions.
#[derive(Clone)]
pub enum Node {
    Root,
    Dir(Arc<Session>),
    Config(Arc<Session>),
    Disk(Arc<Session>, Arc<Volume>),
    Side(Arc<Session>, SideFile),
}

#[derive(Clone, Debug)]
pub struct SideFile {
    pub name: String,
    pub path: PathBuf,
    pub ino: u64,
}

impl Node {
    pub fn session(&self) -> Option<&Arc<Session>> {
        match self {
            Node::Root => None,
            Node::Dir(s) | Node::Config(s) | Node::Disk(s, _) | Node::Side(s, _) => Some(s),
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self, Node::Root | Node::Dir(_))
    }
}

fn key(s: &str) -> [u8; 8] {
    blake3::hash(s.as_bytes()).as_bytes()[..8]
        .try_into()
        .expect("8 bytes")
}

/// The crate's error kinds as NFS status codes.
pub fn nfs_error(e: &Error) -> nfsstat3 {
    match e.kind() {
        ErrorKind::NotFound => nfsstat3::NFS3ERR_NOENT,
        ErrorKind::InvalidInput => nfsstat3::NFS3ERR_INVAL,
        ErrorKind::Busy => nfsstat3::NFS3ERR_JUKEBOX,
        ErrorKind::AlreadyExists => nfsstat3::NFS3ERR_EXIST,
        ErrorKind::NotPermitted => nfsstat3::NFS3ERR_PERM,
        ErrorKind::NoSpace => nfsstat3::NFS3ERR_NOSPC,
        ErrorKind::Corrupt | ErrorKind::Io | ErrorKind::Interrupted => nfsstat3::NFS3ERR_IO,
    }
}

pub fn io_error(e: &std::io::Error) -> nfsstat3 {
    match e.raw_os_error() {
        Some(libc::ENOENT) => nfsstat3::NFS3ERR_NOENT,
        Some(libc::EEXIST) => nfsstat3::NFS3ERR_EXIST,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => nfsstat3::NFS3ERR_NOSPC,
        Some(libc::EACCES) => nfsstat3::NFS3ERR_ACCES,
        Some(libc::EPERM) => nfsstat3::NFS3ERR_PERM,
        Some(libc::EFBIG) => nfsstat3::NFS3ERR_FBIG,
        Some(libc::ENAMETOOLONG) => nfsstat3::NFS3ERR_NAMETOOLONG,
        _ => nfsstat3::NFS3ERR_IO,
    }
}

fn time(t: SystemTime) -> nfstime3 {
    nfstime3::try_from(t).unwrap_or_default()
}

/// Access bits a caller asks for.
pub const R: u32 = 4;
pub const W: u32 = 2;
pub const X: u32 = 1;

pub struct Namespace {
    ds: Arc<Datastore>,
    /// The export point whose sessions it shows.
    point: String,
    /// That point's staging directory (FSSTAT).
    staging: PathBuf,
    owner: (u32, u32),
    fsid: u64,
    started: SystemTime,
    /// VMs looked up here that another export point serves, and when the
    /// log last said so (once a minute per VM: NFS has no message for it).
    told_elsewhere: parking_lot::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl Namespace {
    pub fn new(ds: Arc<Datastore>, point: &ExportPoint, owner: (u32, u32)) -> Namespace {
        let staging = point.staging.root().to_path_buf();
        let fsid = u64::from_be_bytes(key(&format!(
            "{}\0{}",
            staging.to_string_lossy(),
            point.name()
        )));
        Namespace {
            ds,
            point: point.name().into(),
            staging,
            owner,
            fsid,
            started: SystemTime::now(),
            told_elsewhere: Default::default(),
        }
    }

    pub fn datastore(&self) -> &Arc<Datastore> {
        &self.ds
    }

    /// Logs, at most once a minute per VM, that a VM a client looked up
    /// here is served at another export point, with its NFS URLs: the
    /// client sees only "no such file" (explore5 L3).
    fn say_if_elsewhere(&self, vm: &str) {
        let Some(s) = self.ds.session(vm) else { return };
        let point = s.point.name();
        if point == self.point {
            return;
        }
        let now = std::time::Instant::now();
        {
            let mut told = self.told_elsewhere.lock();
            if told
                .get(vm)
                .is_some_and(|t| now.duration_since(*t) < std::time::Duration::from_secs(60))
            {
                return;
            }
            told.insert(vm.to_string(), now);
        }
        let urls: Vec<String> = (0..s.disks.len())
            .flat_map(|i| self.ds.disk_urls(&s, i))
            .filter(|u| u.starts_with("nfs"))
            .collect();
        let where_ = match urls.is_empty() {
            true => "which has no NFS server".to_string(),
            false => urls.join(" "),
        };
        tracing::warn!(
            vm,
            "an NFS client looked up VM {vm} at export point {}, but export point {point} serves it: {where_}",
            self.point
        );
    }

    /// The handle of a node.
    pub fn handle(&self, n: &Node) -> Vec<u8> {
        let (kind, vm, backup, id) = match n {
            Node::Root => (1u8, None, None, 0u64),
            Node::Dir(s) => (2, Some(&s.vm), None, 0),
            Node::Config(s) => (3, Some(&s.vm), Some(&s.backup), 0),
            Node::Disk(s, d) => (4, Some(&s.vm), Some(&s.backup), d.index as u64),
            Node::Side(s, f) => match side_generation(f) {
                Some(g) => (6, Some(&s.vm), Some(&s.backup), u64::from(g) << 32 | f.ino),
                None => (5, Some(&s.vm), Some(&s.backup), f.ino),
            },
        };
        let mut h = Vec::with_capacity(HANDLE_LEN);
        h.extend(MAGIC);
        h.push(VERSION);
        h.push(kind);
        h.extend(vm.map(|v| key(v)).unwrap_or_default());
        h.extend(backup.map(|b| key(b)).unwrap_or_default());
        h.extend(id.to_be_bytes());
        h
    }

    /// The node a handle names: BADHANDLE if it is not ours, STALE if its
    /// session (or side file) is gone.
    pub fn resolve(&self, h: &[u8]) -> Result<Node, nfsstat3> {
        if h.len() != HANDLE_LEN || &h[..2] != MAGIC || h[2] != VERSION {
            return Err(nfsstat3::NFS3ERR_BADHANDLE);
        }
        let kind = h[3];
        if kind == 1 {
            return Ok(Node::Root);
        }
        let vm: [u8; 8] = h[4..12].try_into().expect("8 bytes");
        let backup: [u8; 8] = h[12..20].try_into().expect("8 bytes");
        let id = u64::from_be_bytes(h[20..28].try_into().expect("8 bytes"));
        let s = self
            .ds
            .sessions_at(&self.point)
            .into_iter()
            .find(|s| key(&s.vm) == vm)
            .ok_or(nfsstat3::NFS3ERR_STALE)?;
        if kind == 2 {
            return Ok(Node::Dir(s));
        }
        if key(&s.backup) != backup {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        match kind {
            3 => Ok(Node::Config(s)),
            4 => {
                let d = s
                    .disks
                    .get(id as usize)
                    .cloned()
                    .ok_or(nfsstat3::NFS3ERR_STALE)?;
                Ok(Node::Disk(s, d))
            }
            5 => {
                let f = side_by_ino(&s, id).ok_or(nfsstat3::NFS3ERR_STALE)?;
                Ok(Node::Side(s, f))
            }
            6 => {
                let f = side_by_ino(&s, id & u64::from(u32::MAX))
                    .filter(|f| side_generation(f).map(u64::from) == Some(id >> 32))
                    .ok_or(nfsstat3::NFS3ERR_STALE)?;
                Ok(Node::Side(s, f))
            }
            _ => Err(nfsstat3::NFS3ERR_BADHANDLE),
        }
    }

    fn fileid(&self, n: &Node) -> u64 {
        match n {
            Node::Root => 1,
            // From the inode number alone, as before generations were in
            // handles: a client checks that a handle's fileid never changes.
            Node::Side(s, f) => {
                let mut h = Vec::with_capacity(HANDLE_LEN);
                h.extend(MAGIC);
                h.extend([VERSION, 5]);
                h.extend(key(&s.vm));
                h.extend(key(&s.backup));
                h.extend(f.ino.to_be_bytes());
                u64::from_be_bytes(
                    blake3::hash(&h).as_bytes()[..8]
                        .try_into()
                        .expect("8 bytes"),
                ) | (1 << 63)
            }
            _ => {
                let h = blake3::hash(&self.handle(n));
                u64::from_be_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) | (1 << 63)
            }
        }
    }

    pub fn getattr(&self, n: &Node) -> Result<fattr3, nfsstat3> {
        let (uid, gid) = self.owner;
        let (type_, mode, size, mtime) = match n {
            Node::Root => (ftype3::NF3DIR, 0o755, 4096, self.started),
            Node::Dir(s) => (ftype3::NF3DIR, 0o700, 4096, s.started),
            Node::Config(s) => (ftype3::NF3REG, 0o400, s.config_json.len() as u64, s.started),
            Node::Disk(s, d) => (
                ftype3::NF3REG,
                0o600,
                d.size,
                d.modified().unwrap_or(s.started),
            ),
            Node::Side(_, f) => {
                let m = std::fs::symlink_metadata(&f.path).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => nfsstat3::NFS3ERR_STALE,
                    _ => io_error(&e),
                })?;
                return Ok(fattr3 {
                    type_: ftype3::NF3REG,
                    mode: m.permissions().mode() & 0o7777,
                    nlink: 1,
                    uid,
                    gid,
                    size: m.len(),
                    used: m.blocks() * 512,
                    rdev: specdata3::default(),
                    fsid: self.fsid,
                    fileid: self.fileid(n),
                    atime: time(m.accessed().unwrap_or(SystemTime::UNIX_EPOCH)),
                    mtime: time(m.modified().unwrap_or(SystemTime::UNIX_EPOCH)),
                    ctime: nfstime3 {
                        seconds: m.ctime() as u32,
                        nseconds: m.ctime_nsec() as u32,
                    },
                });
            }
        };
        let t = time(mtime);
        Ok(fattr3 {
            type_,
            mode,
            nlink: if type_ == ftype3::NF3DIR { 2 } else { 1 },
            uid,
            gid,
            size,
            used: size,
            rdev: specdata3::default(),
            fsid: self.fsid,
            fileid: self.fileid(n),
            atime: t,
            mtime: t,
            ctime: t,
        })
    }

    /// Whether `c` may have `want` (R, W, X bits) on a node with `a`.
    pub fn may(c: &Caller, a: &fattr3, want: u32) -> bool {
        if c.uid == 0 {
            return true;
        }
        let bits = if c.uid == a.uid {
            a.mode >> 6
        } else if c.gid == a.gid || c.gids.contains(&a.gid) {
            a.mode >> 3
        } else {
            a.mode
        } & 7;
        bits & want == want
    }

    /// Fails with ACCES unless `c` has `want` on `n`.
    pub fn check(&self, c: &Caller, n: &Node, want: u32) -> Result<fattr3, nfsstat3> {
        let a = self.getattr(n)?;
        if Self::may(c, &a, want) {
            Ok(a)
        } else {
            Err(nfsstat3::NFS3ERR_ACCES)
        }
    }

    pub fn lookup(&self, c: &Caller, dir: &Node, name: &[u8]) -> Result<Node, nfsstat3> {
        if name.len() > super::xdr::MAX_NAME {
            return Err(nfsstat3::NFS3ERR_NAMETOOLONG);
        }
        let name = std::str::from_utf8(name).map_err(|_| nfsstat3::NFS3ERR_NOENT)?;
        if !dir.is_dir() {
            return Err(nfsstat3::NFS3ERR_NOTDIR);
        }
        self.check(c, dir, X)?;
        match (dir, name) {
            (Node::Root, "." | "..") => Ok(Node::Root),
            (Node::Root, vm) => match self.ds.session_at(vm, &self.point) {
                Some(s) => Ok(Node::Dir(s)),
                None => {
                    self.say_if_elsewhere(vm);
                    Err(nfsstat3::NFS3ERR_NOENT)
                }
            },
            (Node::Dir(s), ".") => Ok(Node::Dir(s.clone())),
            (Node::Dir(_), "..") => Ok(Node::Root),
            (Node::Dir(s), name) => {
                if let Some(n) = own_file(s, name) {
                    return Ok(n);
                }
                side_by_name(s, name)
                    .map(|f| Node::Side(s.clone(), f))
                    .ok_or(nfsstat3::NFS3ERR_NOENT)
            }
            _ => Err(nfsstat3::NFS3ERR_NOTDIR),
        }
    }

    /// A directory's entries (without "." and ".."), with their nodes.
    pub fn list(&self, c: &Caller, dir: &Node) -> Result<Vec<(String, Node)>, nfsstat3> {
        self.check(c, dir, R)?;
        match dir {
            Node::Root => Ok(self
                .ds
                .sessions_at(&self.point)
                .into_iter()
                .map(|s| (s.vm.clone(), Node::Dir(s)))
                .collect()),
            Node::Dir(s) => {
                let mut out = vec![("vm.json".to_string(), Node::Config(s.clone()))];
                for d in &s.disks {
                    out.push((
                        format!("disk{}.raw", d.index),
                        Node::Disk(s.clone(), d.clone()),
                    ));
                }
                for f in side_files(s) {
                    out.push((f.name.clone(), Node::Side(s.clone(), f)));
                }
                Ok(out)
            }
            _ => Err(nfsstat3::NFS3ERR_NOTDIR),
        }
    }

    pub fn fileid_of(&self, n: &Node) -> u64 {
        self.fileid(n)
    }

    /// FSSTAT: the real size and free space of the filesystem the
    /// point's sessions stage on.
    pub fn fsstat(&self) -> (u64, u64, u64, u64, u64) {
        match nix::sys::statvfs::statvfs(&self.staging) {
            Ok(st) => {
                let frag = st.fragment_size();
                (
                    st.blocks() * frag,
                    st.blocks_free() * frag,
                    st.blocks_available() * frag,
                    st.files(),
                    st.files_available(),
                )
            }
            Err(_) => (0, 0, 0, 0, 0),
        }
    }
}

/// `vm.json` or `diskN.raw` of a session, by name.
fn own_file(s: &Arc<Session>, name: &str) -> Option<Node> {
    if name == "vm.json" {
        return Some(Node::Config(s.clone()));
    }
    let i: usize = name
        .strip_prefix("disk")?
        .strip_suffix(".raw")?
        .parse()
        .ok()?;
    (name == format!("disk{i}.raw"))
        .then(|| s.disks.get(i).cloned())
        .flatten()
        .map(|d| Node::Disk(s.clone(), d))
}

/// Where a session's side files live.
pub fn side_dir(s: &Session) -> PathBuf {
    side_dir_in(&s.dir)
}

/// The side-file directory of the session staged in `session_dir`.
pub fn side_dir_in(session_dir: &std::path::Path) -> PathBuf {
    session_dir.join("files")
}

/// A name a client may give a side file: what a local filesystem accepts,
/// and not the name of the VM's own files.
pub fn side_name<'a>(s: &Arc<Session>, name: &'a [u8]) -> Result<&'a str, nfsstat3> {
    let n = std::str::from_utf8(name).map_err(|_| nfsstat3::NFS3ERR_INVAL)?;
    if n.len() > super::xdr::MAX_NAME {
        return Err(nfsstat3::NFS3ERR_NAMETOOLONG);
    }
    if !one_component(n) {
        return Err(nfsstat3::NFS3ERR_INVAL);
    }
    if own_file(s, n).is_some() {
        return Err(nfsstat3::NFS3ERR_EXIST);
    }
    Ok(n)
}

fn side_files(s: &Session) -> Vec<SideFile> {
    let dir = side_dir(s);
    let mut out: Vec<SideFile> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let m = e.metadata().ok()?;
            m.is_file().then(|| SideFile {
                path: dir.join(&name),
                name,
                ino: m.ino(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A name that stays inside the directory it is joined to: not empty, not
/// `.` or `..`, no `/` (an absolute name would replace the whole path) and
/// no NUL. Every side-file path is built from such a name, since a
/// client's name is joined to the session's directory as it is.
fn one_component(n: &str) -> bool {
    !(n.is_empty() || n == "." || n == ".." || n.contains('/') || n.contains('\0'))
}

fn side_by_name(s: &Session, name: &str) -> Option<SideFile> {
    if !one_component(name) {
        return None;
    }
    let path = side_dir(s).join(name);
    let m = std::fs::symlink_metadata(&path).ok()?;
    m.is_file().then(|| SideFile {
        name: name.to_string(),
        path,
        ino: m.ino(),
    })
}

/// The generation of a side file's inode, if its filesystem keeps one
/// and its inode number leaves room for it in a handle.
fn side_generation(f: &SideFile) -> Option<u32> {
    if f.ino > u64::from(u32::MAX) {
        return None;
    }
    // O_NONBLOCK: never wait on a FIFO a client could not have made anyway.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&f.path)
        .ok()?;
    // The request is declared for a long; the filesystems write an int
    // into its first bytes (so on any byte order those are the generation).
    let mut g = [0u8; std::mem::size_of::<libc::c_long>()];
    // SAFETY: FS_IOC_GETVERSION writes at most a c_long into `g`, which is
    // that large and lives across the call; the descriptor is open.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::FS_IOC_GETVERSION,
            g.as_mut_ptr(),
        )
    };
    (r == 0).then(|| u32::from_ne_bytes([g[0], g[1], g[2], g[3]]))
}

fn side_by_ino(s: &Session, ino: u64) -> Option<SideFile> {
    side_files(s).into_iter().find(|f| f.ino == ino)
}

/// Opens a side file for I/O without following links.
pub fn open_side(f: &SideFile, write: bool) -> Result<File, nfsstat3> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&f.path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => nfsstat3::NFS3ERR_STALE,
            _ => io_error(&e),
        })
}

/// Reads a side file range; (bytes, eof).
pub fn read_side(f: &SideFile, off: u64, count: u32) -> Result<(Vec<u8>, bool), nfsstat3> {
    let file = open_side(f, false)?;
    let size = file.metadata().map_err(|e| io_error(&e))?.len();
    let end = off.saturating_add(count as u64).min(size);
    let mut buf = vec![0u8; end.saturating_sub(off) as usize];
    file.read_exact_at(&mut buf, off)
        .map_err(|e| io_error(&e))?;
    Ok((buf, end >= size))
}

/// Writes a side file range, syncing its data if `sync`.
pub fn write_side(f: &SideFile, off: u64, data: &[u8], sync: bool) -> Result<(), nfsstat3> {
    let file = open_side(f, true)?;
    file.write_all_at(data, off).map_err(|e| io_error(&e))?;
    if sync {
        file.sync_data().map_err(|e| io_error(&e))?;
    }
    Ok(())
}

/// Creates a side file (mode from the client, default 0644).
pub fn create_side(
    s: &Arc<Session>,
    name: &str,
    exclusive: bool,
    mode: Option<u32>,
) -> Result<SideFile, nfsstat3> {
    let dir = side_dir(s);
    OsStorage.create_dir_all(&dir).map_err(|e| io_error(&e))?;
    let path = dir.join(name);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(!exclusive)
        .create_new(exclusive)
        .mode(mode.unwrap_or(0o644) & 0o7777)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| io_error(&e))?;
    sync_dir(&dir)?;
    let ino = f.metadata().map_err(|e| io_error(&e))?.ino();
    Ok(SideFile {
        name: name.to_string(),
        path,
        ino,
    })
}

pub fn sync_dir(dir: &std::path::Path) -> Result<(), nfsstat3> {
    OsStorage.sync_dir(dir).map_err(|e| io_error(&e))
}
