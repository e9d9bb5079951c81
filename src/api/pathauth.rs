//! Which paths a caller of the control API may name.
//!
//! The daemon runs as root, but the control socket also serves members of
//! the `--socket-group` ([`super::peer`]). Every route that takes a path
//! from the caller and makes the daemon act on it goes through here, so a
//! group member can make the daemon do only what they could do themselves:
//!
//! | route | field | a caller that is not root needs |
//! |---|---|---|
//! | `POST /precopy` | `qmp`, `agent` | to be able to connect to the socket: write permission on it and search permission on every directory on the way ([`socket`]) |
//! | `POST /sessions/{vm}/relocate` | `to` | write and search permission on the directory, search on every one above it; if `to/<vm>` exists, write and search permission on it, to own every `disk*.raw` and `vm.json` in it, and (sticky directory) the right to replace it ([`relocation_target`]) |
//!
//! No other route takes a path: sessions, uploads and backups name VMs,
//! backups and export points, which the daemon resolves itself; `boot`
//! runs QEMU in the client, as the caller.
//!
//! Root callers are not checked. The decision reads the caller's
//! credentials as the kernel recorded them when it connected
//! (`SO_PEERCRED`: uid and gid; `SO_PEERGROUPS`: supplementary groups) and
//! applies the kernel's rule: the owner's bits if the caller owns the
//! file, else the group's if it is in the file's group, else the others'.
//! A file with a POSIX access ACL (`system.posix_acl_access`) is judged by
//! the ACL as the kernel judges it (owner; named users, masked; owning and
//! named groups, masked; others): with an ACL the mode's group bits are
//! only its mask, so reading them as the owning group's would admit a
//! member the ACL refuses. Security modules (SELinux, AppArmor) are not
//! consulted.
//!
//! Symbolic links are resolved here, one component at a time, as the
//! kernel would for the caller (each directory looked up in must be
//! searchable, links are followed up to 40 deep). A socket is then held
//! open (`O_PATH`, no permission needed) and the daemon connects through
//! `/proc/self/fd/N`, which reaches exactly the inode that was checked:
//! swapping the path for a symbolic link (or another socket) after the
//! check changes nothing, for the first connection and for every later one
//! (a pre-copy job reconnects for its final backup and to thaw the guest).
//! What remains: a later `chmod` of the socket or of a directory on the way
//! is not seen (as for an open file), and a QEMU restarted behind the same
//! path is not reached (the old socket is), so such a job fails and must be
//! started again. (`/proc` must be mounted.) A restarted daemon checks a
//! recorded pre-copy job's sockets again with the caller's recorded
//! credentials and pins them anew ([`crate::precopy::Jobs::restore`]).
//!
//! A relocation target is recorded by path (a restarted daemon reopens
//! it), so it cannot be pinned the same way for good: the check runs on
//! the resolved directory, the daemon then creates `to/<vm>` itself (root,
//! 0700) and records its identity (device, inode, owner, filesystem type,
//! and whether only root can change its path: every directory from `/`
//! down owned by root and writable by nobody else; only there may the
//! device number differ later, as it does after a reboot or remount,
//! with the same inode, owner and filesystem type; anywhere a caller may
//! write, a btrfs snapshot of a subvolume of theirs or a FUSE mount of
//! theirs could match all but the device). Every later use (the
//! target files at the start and at a restart, `vm.json` at the cutover, a
//! cancel's removals) opens the directory without following a symbolic
//! link anywhere (`openat2`, `RESOLVE_NO_SYMLINKS`), checks that identity,
//! and works through that open directory (`/proc/self/fd/N/name`), so a
//! caller who renames `to/<vm>` and links or moves another directory into
//! its place gets the relocation refused (a cancel leaves the files and
//! says so), never root working in that directory (a record from before
//! identities were kept takes the one it finds, without links, at its
//! first restart). A target file is emptied only if it has no other name
//! (one hard link), for every caller, and all are checked before any is
//! emptied; where a caller may write, a restarted daemon reopens only the
//! very file (inode) the relocation created or emptied, recorded then.
//! What remains: between this check and the daemon's use, a caller who may
//! write `to` can put a directory of their own at `to/<vm>`, or a file into
//! it that they do not own but could move there (the ownership check above
//! is not repeated, nor at a restart, which does not know the caller); and
//! a relocation's open target files keep being written where they are if
//! their directory is moved until its cutover, which then fails before
//! its commit (nothing else is written there: a restart and a cancel
//! refuse it too, as they do a file swapped in under a target's name:
//! the cutover checks each name still leads to the file written); and a
//! recorded target file emptied by someone
//! else and removed may have its inode number reused by a file linked
//! into its place (root only, as the directory is root's and 0700).

use std::collections::VecDeque;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Permission bits, as in a mode's `rwx`.
pub const READ: u32 = 4;
pub const WRITE: u32 = 2;
pub const SEARCH: u32 = 1;

/// Symbolic links followed in one path, as Linux's `MAXSYMLINKS`.
const MAX_LINKS: u32 = 40;

/// The credentials of a control-socket peer (recorded with a pre-copy
/// job, which a restarted daemon checks again with them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Caller {
    pub fn root() -> Caller {
        Caller {
            uid: 0,
            gid: 0,
            groups: vec![],
        }
    }

    /// The peer of a connected Unix socket, as it was when it connected
    /// (not as its process is now: it may have changed its groups since,
    /// and `/proc/PID` may be another process by now).
    pub fn of(stream: &impl AsFd) -> std::io::Result<Caller> {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        let c = getsockopt(stream, PeerCredentials).map_err(std::io::Error::from)?;
        Ok(Caller {
            uid: c.uid(),
            gid: c.gid(),
            groups: peer_groups(stream)?,
        })
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// True if the kernel's mode-bit check grants this caller `want`
    /// (`READ | WRITE | SEARCH` bits) on a file with `attr`. Only one
    /// class applies: an owner whose bits deny is denied even if the
    /// group's or others' bits would grant.
    pub fn permits(&self, attr: &Attr, want: u32) -> bool {
        if self.is_root() {
            return true;
        }
        if let Some(acl) = &attr.acl {
            return self.acl_permits(acl, attr, want);
        }
        let shift = if self.uid == attr.uid {
            6
        } else if self.in_group(attr.gid) {
            3
        } else {
            0
        };
        (attr.mode >> shift) & want == want
    }

    /// The kernel's ACL check (`posix_acl_permission`): the owner's entry;
    /// else a named user's, masked; else, if any group entry applies
    /// (owning group or named), granted only if one of them grants,
    /// masked; else the others' entry.
    fn acl_permits(&self, acl: &[AclEntry], attr: &Attr, want: u32) -> bool {
        let grants = |perm: u16| u32::from(perm) & want == want;
        let entry = |tag: u16| acl.iter().find(|e| e.tag == tag).map(|e| e.perm);
        let mask = entry(ACL_MASK).unwrap_or(0o7);
        if self.uid == attr.uid {
            return entry(ACL_USER_OBJ).is_some_and(grants);
        }
        if let Some(e) = acl.iter().find(|e| e.tag == ACL_USER && e.id == self.uid) {
            return grants(e.perm & mask);
        }
        let groups: Vec<u16> = (acl.iter())
            .filter(|e| match e.tag {
                ACL_GROUP_OBJ => self.in_group(attr.gid),
                ACL_GROUP => self.in_group(e.id),
                _ => false,
            })
            .map(|e| e.perm)
            .collect();
        if !groups.is_empty() {
            return groups.iter().any(|&p| grants(p & mask));
        }
        entry(ACL_OTHER).is_some_and(grants)
    }
}

/// `SO_PEERGROUPS`: the peer's supplementary groups when it connected.
fn peer_groups(stream: &impl AsFd) -> std::io::Result<Vec<u32>> {
    let fd = stream.as_fd().as_raw_fd();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes and lives across the call.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        // Too small: `len` says how much is needed.
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

/// The parts of `stat` the decision reads, and the file's access ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// `system.posix_acl_access`, if the file has one.
    pub acl: Option<Vec<AclEntry>>,
}

/// One entry of a POSIX access ACL, as the kernel stores it in
/// `system.posix_acl_access` (little-endian: tag u16, perm u16, id u32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AclEntry {
    pub tag: u16,
    /// `READ | WRITE | SEARCH` bits.
    pub perm: u16,
    /// A uid (`ACL_USER`) or gid (`ACL_GROUP`); unused for the others.
    pub id: u32,
}

pub const ACL_USER_OBJ: u16 = 0x01;
pub const ACL_USER: u16 = 0x02;
pub const ACL_GROUP_OBJ: u16 = 0x04;
pub const ACL_GROUP: u16 = 0x08;
pub const ACL_MASK: u16 = 0x10;
pub const ACL_OTHER: u16 = 0x20;
const ACL_XATTR_VERSION: u32 = 2;

/// The entries of a `system.posix_acl_access` value; `None` if it is not
/// one (then nothing is granted by it).
pub fn parse_acl(b: &[u8]) -> Option<Vec<AclEntry>> {
    let (head, rest) = b.split_at_checked(4)?;
    if u32::from_le_bytes(head.try_into().ok()?) != ACL_XATTR_VERSION || rest.len() % 8 != 0 {
        return None;
    }
    let entries = rest
        .chunks_exact(8)
        .map(|e| AclEntry {
            tag: u16::from_le_bytes([e[0], e[1]]),
            perm: u16::from_le_bytes([e[2], e[3]]),
            id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
        })
        .collect();
    Some(entries)
}

/// The access ACL of the file `path` names (`follow`: the last component
/// may be a link to follow, as `/proc/self/fd/N` is); `None` if it has none.
fn acl_of(path: &Path, follow: bool) -> Result<Option<Vec<AclEntry>>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::invalid(format!("{} contains a NUL byte", path.display())))?;
    let name = c"system.posix_acl_access";
    let mut buf = vec![0u8; 4 + 8 * 64];
    loop {
        // SAFETY: valid C strings; the kernel writes at most `buf.len()`
        // bytes into `buf`, which lives across the call.
        let n = unsafe {
            let get = if follow {
                libc::getxattr
            } else {
                libc::lgetxattr
            };
            get(
                c.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            // One we cannot read grants nothing: an empty ACL.
            return Ok(Some(parse_acl(&buf).unwrap_or_default()));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => return Ok(None),
            Some(libc::ERANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            _ => return Err(Error::io(format!("read the ACL of {}", path.display()), e)),
        }
    }
}

impl Attr {
    fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }

    fn is_symlink(&self) -> bool {
        self.kind() == libc::S_IFLNK
    }

    fn is_socket(&self) -> bool {
        self.kind() == libc::S_IFSOCK
    }

    fn describe(&self) -> String {
        format!(
            "mode {:04o}, owner {}, group {}",
            self.mode & 0o7777,
            self.uid,
            self.gid
        )
    }
}

fn stat_fd(fd: &OwnedFd, path: &Path) -> Result<Attr> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills `st`, which we read only on success.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::io(format!("stat {}", path.display()), e));
    }
    // SAFETY: fstat succeeded.
    let st = unsafe { st.assume_init() };
    // An O_PATH descriptor has no xattr calls of its own: through /proc.
    let proc = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    Ok(Attr {
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        acl: match st.st_mode & libc::S_IFMT {
            libc::S_IFLNK => None,
            _ => acl_of(&proc, true)?,
        },
    })
}

/// `name` in `dir`, not following a symbolic link; `None` if absent.
fn stat_at(dir: &OwnedFd, name: &str, path: &Path) -> Result<Option<Attr>> {
    let c = CString::new(name)
        .map_err(|_| Error::invalid(format!("{} contains a NUL byte", path.display())))?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: a valid C string; fstatat fills `st`, read only on success.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::NotFound {
            return Ok(None);
        }
        return Err(Error::io(format!("stat {}", path.display()), e));
    }
    // SAFETY: fstatat succeeded.
    let st = unsafe { st.assume_init() };
    let proc = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    Ok(Some(Attr {
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        acl: match st.st_mode & libc::S_IFMT {
            libc::S_IFLNK => None,
            _ => acl_of(&proc, false)?,
        },
    }))
}

/// `openat(dir, name, O_PATH | O_NOFOLLOW)`: no permission on the file
/// itself is needed, and a symbolic link is opened, not followed.
fn open_path(dir: Option<&OwnedFd>, name: &OsStr, path: &Path) -> Result<OwnedFd> {
    let c = CString::new(name.as_bytes())
        .map_err(|_| Error::invalid(format!("{} contains a NUL byte", path.display())))?;
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: a valid C string; the descriptor returned is ours.
    let fd = unsafe {
        libc::openat(
            dirfd,
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::io(path.display().to_string(), e));
    }
    // SAFETY: a descriptor we just opened and own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The target of the symbolic link open as `fd`.
fn read_link(fd: &OwnedFd, path: &Path) -> Result<PathBuf> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: an empty path reads the link `fd` is open on (O_PATH); the
    // buffer is `buf.len()` bytes.
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::io(format!("read link {}", path.display()), e));
    }
    buf.truncate(n as usize);
    Ok(PathBuf::from(OsString::from_vec(buf)))
}

fn names(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// Where a path led.
#[derive(Debug)]
struct Walked {
    fd: OwnedFd,
    attr: Attr,
    /// Without symbolic links.
    path: PathBuf,
}

#[derive(Debug)]
enum Stop {
    /// The caller may not search this directory.
    NoSearch(PathBuf),
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Failed(e)
    }
}

/// Resolves absolute `path` as the kernel would for `caller`: every
/// directory looked up in must be searchable by it. The result is held
/// open, so what was checked is what is used.
fn walk(caller: &Caller, path: &Path) -> std::result::Result<Walked, Stop> {
    if !path.is_absolute() {
        return Err(Error::invalid(format!("{} is not an absolute path", path.display())).into());
    }
    let root = PathBuf::from("/");
    let mut dirs = vec![(open_path(None, OsStr::new("/"), &root)?, root)];
    let mut todo = names(path);
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        let (dir, dir_path) = dirs.last().expect("the root stays");
        let attr = stat_fd(dir, dir_path)?;
        if !attr.is_dir() {
            let e = std::io::Error::from_raw_os_error(libc::ENOTDIR);
            return Err(Error::io(dir_path.display().to_string(), e).into());
        }
        if !caller.permits(&attr, SEARCH) {
            return Err(Stop::NoSearch(dir_path.clone()));
        }
        if name == ".." {
            if dirs.len() > 1 {
                dirs.pop();
            }
            continue;
        }
        let here = dir_path.join(&name);
        let fd = open_path(Some(dir), &name, &here)?;
        if stat_fd(&fd, &here)?.is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                let e = std::io::Error::from_raw_os_error(libc::ELOOP);
                return Err(Error::io(path.display().to_string(), e).into());
            }
            let target = read_link(&fd, &here)?;
            if target.is_absolute() {
                dirs.truncate(1);
            }
            let mut next = names(&target);
            next.append(&mut todo);
            todo = next;
            continue;
        }
        dirs.push((fd, here));
    }
    let (fd, path) = dirs.pop().expect("the root stays");
    let attr = stat_fd(&fd, &path)?;
    Ok(Walked { fd, attr, path })
}

/// A socket a caller may connect to, held open: connect to [`Self::path`]
/// while this lives.
#[derive(Debug)]
pub struct PinnedSocket {
    fd: OwnedFd,
}

impl PinnedSocket {
    /// `/proc/self/fd/N`: connecting here reaches the checked socket,
    /// whatever its path names now.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// A path for messages: a pinned socket's `/proc/self/fd/N` is shown as
/// the path it was found at.
pub fn shown(path: &Path) -> PathBuf {
    if path.starts_with("/proc/self/fd") {
        if let Ok(p) = std::fs::read_link(path) {
            return p;
        }
    }
    path.to_path_buf()
}

/// Checks that `caller` could connect to the socket at `path` itself
/// (`what` names the request's field). `None` for root, who may name any
/// path, which is then used as given.
pub fn socket(caller: &Caller, what: &str, path: &Path) -> Result<Option<PinnedSocket>> {
    if caller.is_root() {
        return Ok(None);
    }
    let uid = caller.uid;
    let w = match walk(caller, path) {
        Ok(w) => w,
        Err(Stop::NoSearch(dir)) => {
            return Err(Error::not_permitted(format!(
                "{what}: uid {uid} may not connect to {} (no search permission on {})",
                path.display(),
                dir.display()
            )))
        }
        Err(Stop::Failed(e)) => return Err(e.context(what)),
    };
    let leads = if w.path == path {
        String::new()
    } else {
        format!(" (it leads to {})", w.path.display())
    };
    if !w.attr.is_socket() {
        return Err(Error::invalid(format!(
            "{what}: {} is not a socket{leads}",
            path.display()
        )));
    }
    if !caller.permits(&w.attr, WRITE) {
        return Err(Error::not_permitted(format!(
            "{what}: uid {uid} may not connect to {}{leads}: {}",
            path.display(),
            w.attr.describe()
        )));
    }
    Ok(Some(PinnedSocket { fd: w.fd }))
}

/// Checks that `caller` could create `vm` in directory `to` itself, and
/// replace it if it exists; the directory without symbolic links. Root's
/// `to` is returned as given.
pub fn relocation_target(caller: &Caller, to: &Path, vm: &str) -> Result<PathBuf> {
    if caller.is_root() {
        return Ok(to.to_path_buf());
    }
    let uid = caller.uid;
    let refused = |why: String| {
        Error::not_permitted(format!(
            "relocation target: uid {uid} may not create {vm} in {} ({why})",
            to.display()
        ))
    };
    let w = match walk(caller, to) {
        Ok(w) => w,
        Err(Stop::NoSearch(dir)) => {
            return Err(refused(format!(
                "no search permission on {}",
                dir.display()
            )))
        }
        Err(Stop::Failed(e)) => return Err(e.context("relocation target")),
    };
    if !w.attr.is_dir() {
        return Err(Error::invalid(format!(
            "relocation target {} is not a directory",
            to.display()
        )));
    }
    if !caller.permits(&w.attr, WRITE | SEARCH) {
        return Err(refused(w.attr.describe()));
    }
    // An existing `to/<vm>`: the daemon would empty the files in it, so
    // the caller must be able to write in it, and in a sticky directory
    // (/tmp) to own it (or the directory), as to replace it.
    let vm_path = w.path.join(vm);
    if let Some(entry) = stat_at(&w.fd, vm, &vm_path)? {
        let sticky = w.attr.mode & libc::S_ISVTX != 0;
        if sticky && w.attr.uid != uid && entry.uid != uid {
            return Err(refused(format!(
                "{} exists, owned by uid {}, in a sticky directory",
                vm_path.display(),
                entry.uid
            )));
        }
        if entry.is_dir() && !caller.permits(&entry, WRITE | SEARCH) {
            return Err(refused(format!(
                "{} exists and uid {uid} may not write in it: {}",
                vm_path.display(),
                entry.describe()
            )));
        }
        if entry.is_dir() {
            if let Some(why) = foreign_target_file(caller, &w.fd, vm, &vm_path)? {
                return Err(refused(why));
            }
        }
    }
    Ok(w.path)
}

/// A file in `to/<vm>` that `--force` would have root empty (`disk*.raw`)
/// or replace (`vm.json`) but that `caller` does not own, as a reason to
/// refuse. Being able to write in the directory is not enough: the daemon
/// would write the file itself, which its owner may not have allowed.
fn foreign_target_file(
    caller: &Caller,
    to: &OwnedFd,
    vm: &str,
    vm_path: &Path,
) -> Result<Option<String>> {
    let dir = open_path(Some(to), OsStr::new(vm), vm_path)?;
    let listing = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let entries = std::fs::read_dir(&listing)
        .map_err(|e| Error::io(format!("read {}", vm_path.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("read {}", vm_path.display()), e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let ours = name == "vm.json" || (name.starts_with("disk") && name.ends_with(".raw"));
        if !ours {
            continue;
        }
        let path = vm_path.join(&name);
        if let Some(a) = stat_at(&dir, &name, &path)? {
            if a.uid != caller.uid {
                return Ok(Some(format!(
                    "{} exists, owned by uid {}, and would be overwritten",
                    path.display(),
                    a.uid
                )));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests;
