//! The procedures of NFSv3 (RFC 1813), MOUNT v3 and the portmapper v2,
//! decoded with the bounded reader and answered with `nfs3_types`
//! encoders. Everything here runs on a blocking thread (disk calls may
//! wait on the repository).

// Each procedure's Err is its NFS3 failure body (wcc data and all), the
// reply itself, built once per request: boxing it would only add a move.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;

use nfs3_types::mount::{fhandle3, mountres3, mountres3_ok, mountstat3};
use nfs3_types::nfs3::{
    self as n3, cookieverf3, dirlist3, dirlistplus3, entry3, entryplus3, fattr3, filename3,
    nfs_fh3, nfsstat3, nfstime3, stable_how, wcc_attr, wcc_data, writeverf3, Nfs3Option,
    Nfs3Result,
};
use nfs3_types::rpc::auth_stat;
use nfs3_types::xdr_codec::{BoundedList, List, Opaque, Pack};
use parking_lot::Mutex;

use super::fs::{
    create_side, io_error, nfs_error, open_side, read_side, side_dir, side_name, sync_dir,
    write_side, Caller, Namespace, Node, R, W, X,
};
use super::rpc::{self, Call};
use super::xdr::{Garbage, Reader, MAX_PATH};
use crate::session::{Attachment, Session};

mod names;
use names::{create, readdir, readdirplus, remove, rename};

pub const NFS_PROG: u32 = 100_003;
pub const MOUNT_PROG: u32 = 100_005;
pub const PORTMAP_PROG: u32 = 100_000;

/// Largest READ and WRITE (FSINFO rtmax, wtmax).
pub const MAX_IO: u32 = 1 << 20;

/// One client connection's state: the VMs it is using, held open so a
/// release refuses while the client is attached.
///
/// Using a VM's files holds its session (`Session::hold`), but only a WRITE
/// to one of its disks is an NFS attach (`Session::attached`, review30 M2),
/// which clears the VM's NFS clients a restart stranded
/// (`daemon::exports_moved`): a hypervisor running the guest writes its
/// disks within moments, while what reads alone cannot tell a hypervisor
/// from an admin's look (`nfs-cat`, `nfs-ls`, a copy out of the disk all
/// MOUNT, LOOKUP and READ as QEMU does at its start). A guest that never
/// writes leaves its VM named as stranded, which errs the safe way.
#[derive(Default)]
pub struct Conn {
    /// Per session serial: the hold, and whether this connection wrote.
    attached: Mutex<HashMap<u64, (Attachment, bool)>>,
    /// The client's address, which a refused release names.
    peer: String,
}

impl Conn {
    pub fn new(peer: std::net::SocketAddr) -> Conn {
        Conn {
            attached: Mutex::default(),
            peer: peer.to_string(),
        }
    }

    /// Holds `s` open for this connection; STALE if it was released.
    fn attach(&self, s: &Arc<Session>) -> Result<(), nfsstat3> {
        self.hold(s, false)
    }

    /// [`Self::attach`] for a WRITE to one of `s`'s disks: an NFS attach.
    fn write_attach(&self, s: &Arc<Session>) -> Result<(), nfsstat3> {
        self.hold(s, true)
    }

    fn hold(&self, s: &Arc<Session>, writes: bool) -> Result<(), nfsstat3> {
        let mut a = self.attached.lock();
        let wrote = match a.get_mut(&s.serial) {
            Some((_, wrote)) => wrote,
            None => {
                let by = crate::session::Holder::nfs(&self.peer);
                let held = s.hold(by).ok_or(nfsstat3::NFS3ERR_STALE)?;
                &mut a.entry(s.serial).or_insert((held, false)).1
            }
        };
        if writes && !*wrote {
            *wrote = true;
            drop(a);
            s.attached(crate::session::Frontend::Nfs);
        }
        Ok(())
    }
}

/// What a call is answered with.
pub struct Ctx<'a> {
    pub ns: &'a Namespace,
    pub conn: &'a Conn,
    pub caller: Caller,
    /// The write verifier of side files (a disk's is its epoch).
    pub side_verifier: &'a super::SideVerifier,
    /// Answer every write FILE_SYNC (for clients that ignore verifiers).
    pub write_through: bool,
    /// The port MOUNT and NFS are served on, for GETPORT.
    pub nfs_port: u16,
    /// False for a client not on the export's list: every call is refused.
    pub allowed: bool,
    /// Lets a READ that waits for a repository fetch send its reply later.
    pub later: Option<&'a Later>,
}

/// How a call's reply is sent after its handler returned: a READ of a
/// disk that must wait for a fetch within one block gives its reply to the
/// disk to send when the fetch ends (`Disk::read_later`), so no blocking
/// thread waits with it.
pub struct Later {
    pub xid: u32,
    /// Sends a reply record (from any thread).
    pub send: Arc<dyn Fn(Vec<u8>) + Send + Sync>,
    /// Runs work that may wait.
    pub spawn: crate::disk::Spawner,
    /// Set when a handler took the reply: what `dispatch` returns is then
    /// not sent.
    pub taken: std::sync::atomic::AtomicBool,
}

impl Later {
    pub fn taken(&self) -> bool {
        self.taken.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Answers one call with a complete reply record.
pub fn dispatch(ctx: &Ctx, call: &Call, args: &[u8]) -> Vec<u8> {
    let xid = call.xid;
    match call.prog {
        PORTMAP_PROG if call.vers == 2 => portmap(ctx, xid, call.proc_, args),
        PORTMAP_PROG => rpc::prog_mismatch(xid, 2, 2),
        MOUNT_PROG if call.vers == 3 => mount(ctx, xid, call.proc_, args),
        MOUNT_PROG => rpc::prog_mismatch(xid, 3, 3),
        NFS_PROG if call.vers == 3 => nfs(ctx, xid, call.proc_, args),
        NFS_PROG => rpc::prog_mismatch(xid, 3, 3),
        _ => rpc::prog_unavail(xid),
    }
}

fn portmap(ctx: &Ctx, xid: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
    const TCP: u32 = 6;
    let mut r = Reader::new(args);
    match proc_ {
        0 => rpc::success_void(xid),
        // GETPORT: MOUNT and NFS over TCP live on our port; nothing else.
        3 => {
            let q = (|| Ok::<_, Garbage>((r.u32()?, r.u32()?, r.u32()?)))();
            match q {
                Ok((prog, vers, prot)) => {
                    let ours = prot == TCP && vers == 3 && (prog == NFS_PROG || prog == MOUNT_PROG);
                    let port = if ours { ctx.nfs_port as u32 } else { 0 };
                    rpc::success(xid, &port)
                }
                Err(_) => rpc::garbage_args(xid),
            }
        }
        // DUMP: our two programs.
        4 => {
            let maps: Vec<nfs3_types::portmap::mapping> = [NFS_PROG, MOUNT_PROG]
                .into_iter()
                .map(|prog| nfs3_types::portmap::mapping {
                    prog,
                    vers: 3,
                    prot: TCP,
                    port: ctx.nfs_port as u32,
                })
                .collect();
            rpc::success(xid, &List(maps))
        }
        _ => rpc::proc_unavail(xid),
    }
}

fn mount(ctx: &Ctx, xid: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
    let mut r = Reader::new(args);
    match proc_ {
        0 => rpc::success_void(xid),
        1 => {
            let Ok(path) = r.opaque(MAX_PATH) else {
                return rpc::garbage_args(xid);
            };
            if !ctx.allowed {
                return rpc::success(xid, &mountres3::Err(mountstat3::MNT3ERR_ACCES));
            }
            let res = match mount_path(ctx, path) {
                Ok(node) => mountres3::Ok(mountres3_ok {
                    fhandle: fhandle3(Opaque::owned(ctx.ns.handle(&node))),
                    auth_flavors: vec![0, 1],
                }),
                Err(st) => mountres3::Err(st),
            };
            rpc::success(xid, &res)
        }
        // DUMP: no mount list is kept.
        2 => rpc::success(xid, &false),
        3 | 4 => rpc::success_void(xid),
        // EXPORT: one export, `/`, no groups.
        5 => {
            let mut out = Vec::new();
            true.pack(&mut out).expect("encodes");
            Opaque::borrowed(b"/").pack(&mut out).expect("encodes");
            false.pack(&mut out).expect("encodes"); // no groups
            false.pack(&mut out).expect("encodes"); // no more exports
            rpc::success(xid, &Raw(out))
        }
        _ => rpc::proc_unavail(xid),
    }
}

/// Already-encoded result bytes.
struct Raw(Vec<u8>);

impl Pack for Raw {
    fn packed_size(&self) -> usize {
        self.0.len()
    }
    fn pack(&self, out: &mut impl std::io::Write) -> nfs3_types::xdr_codec::Result<usize> {
        out.write_all(&self.0)
            .map_err(nfs3_types::xdr_codec::Error::Io)?;
        Ok(self.0.len())
    }
}

/// `/`, `/<vm>`, `/<vm>/...`: any directory of the namespace can be mounted.
fn mount_path(ctx: &Ctx, path: &[u8]) -> Result<Node, mountstat3> {
    let path = std::str::from_utf8(path).map_err(|_| mountstat3::MNT3ERR_INVAL)?;
    let mut node = Node::Root;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        node = ctx
            .ns
            .lookup(&ctx.caller, &node, part.as_bytes())
            .map_err(|e| match e {
                nfsstat3::NFS3ERR_ACCES => mountstat3::MNT3ERR_ACCES,
                nfsstat3::NFS3ERR_NOTDIR => mountstat3::MNT3ERR_NOTDIR,
                _ => mountstat3::MNT3ERR_NOENT,
            })?;
    }
    if !node.is_dir() {
        return Err(mountstat3::MNT3ERR_NOTDIR);
    }
    Ok(node)
}

type Res<T> = Result<T, nfsstat3>;

fn nfs(ctx: &Ctx, xid: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
    if !ctx.allowed {
        return rpc::auth_error(xid, auth_stat::AUTH_TOOWEAK);
    }
    let mut r = Reader::new(args);
    let reply = match proc_ {
        0 => return rpc::success_void(xid),
        1 => getattr(ctx, &mut r).map(|res| rpc::success(xid, &res)),
        2 => setattr(ctx, &mut r).map(|res| rpc::success(xid, &res)),
        3 => lookup(ctx, &mut r).map(|res| rpc::success(xid, &res)),
        4 => access(ctx, &mut r).map(|res| rpc::success(xid, &res)),
        5 => read_fh(&mut r).map(|_| {
            let res: n3::READLINK3res =
                Nfs3Result::Err((nfsstat3::NFS3ERR_INVAL, Default::default()));
            rpc::success(xid, &res)
        }),
        6 => read(ctx, &mut r).map(|res| rpc::success(xid, &res)),
        7 => write(ctx, &mut r).map(|res| rpc::success(xid, &res)),
        8 => create(ctx, &mut r).map(|res| rpc::success(xid, &res)),
        // MKDIR, SYMLINK, MKNOD, LINK: files only in a VM directory.
        9..=11 => Ok(rpc::success(
            xid,
            &Nfs3Result::<n3::MKDIR3resok, n3::MKDIR3resfail>::Err((
                nfsstat3::NFS3ERR_NOTSUPP,
                Default::default(),
            )),
        )),
        12 | 13 => remove(ctx, &mut r, proc_ == 13).map(|res| rpc::success(xid, &res)),
        14 => rename(ctx, &mut r).map(|res| rpc::success(xid, &res)),
        15 => Ok(rpc::success(
            xid,
            &Nfs3Result::<n3::LINK3resok, n3::LINK3resfail>::Err((
                nfsstat3::NFS3ERR_NOTSUPP,
                n3::LINK3resfail {
                    file_attributes: Nfs3Option::None,
                    linkdir_wcc: wcc_data::default(),
                },
            )),
        )),
        16 => readdir(ctx, &mut r).map(|res| rpc::success(xid, &res)),
        17 => readdirplus(ctx, &mut r).map(|res| rpc::success(xid, &res)),
        18 => fsstat(ctx, &mut r).map(|res| rpc::success(xid, &res)),
        19 => fsinfo(ctx, &mut r).map(|res| rpc::success(xid, &res)),
        20 => pathconf(ctx, &mut r).map(|res| rpc::success(xid, &res)),
        21 => commit(ctx, &mut r).map(|res| rpc::success(xid, &res)),
        _ => return rpc::proc_unavail(xid),
    };
    reply.unwrap_or_else(|_| rpc::garbage_args(xid))
}

fn read_fh(r: &mut Reader) -> Result<nfs_fh3, Garbage> {
    r.fh()
}

fn post(ctx: &Ctx, n: &Node) -> n3::post_op_attr {
    match ctx.ns.getattr(n) {
        Ok(a) => Nfs3Option::Some(a),
        Err(_) => Nfs3Option::None,
    }
}

fn pre(a: &fattr3) -> n3::pre_op_attr {
    Nfs3Option::Some(wcc_attr {
        size: a.size,
        mtime: a.mtime,
        ctime: a.ctime,
    })
}

fn wcc(ctx: &Ctx, before: Option<&fattr3>, n: &Node) -> wcc_data {
    wcc_data {
        before: before.map(pre).unwrap_or(Nfs3Option::None),
        after: post(ctx, n),
    }
}

fn resolve(ctx: &Ctx, fh: &nfs_fh3) -> Res<Node> {
    ctx.ns.resolve(fh.data.as_ref())
}

/// The empty failure result of a procedure, for an unresolvable handle.
trait Empty {
    fn empty() -> Self;
}

impl<T: Default> Empty for T {
    fn empty() -> Self {
        T::default()
    }
}

/// Resolves `fh` and runs `f`; an unresolvable handle is the procedure's
/// error result with empty attributes.
fn with_node<T, E: Empty>(
    ctx: &Ctx,
    fh: &nfs_fh3,
    f: impl FnOnce(&Node) -> Result<T, (nfsstat3, E)>,
) -> Nfs3Result<T, E> {
    match resolve(ctx, fh) {
        Ok(n) => match f(&n) {
            Ok(v) => Nfs3Result::Ok(v),
            Err(e) => Nfs3Result::Err(e),
        },
        Err(st) => Nfs3Result::Err((st, E::empty())),
    }
}

fn getattr(ctx: &Ctx, r: &mut Reader) -> Result<n3::GETATTR3res, Garbage> {
    let fh = r.fh()?;
    Ok(with_node(ctx, &fh, |n| {
        ctx.ns
            .getattr(n)
            .map(|a| n3::GETATTR3resok { obj_attributes: a })
            .map_err(|st| (st, Default::default()))
    }))
}

fn setattr(ctx: &Ctx, r: &mut Reader) -> Result<n3::SETATTR3res, Garbage> {
    let fh = r.fh()?;
    let sa = r.sattr3()?;
    let guard = r.guard()?;
    Ok(with_node(ctx, &fh, |n| {
        let fail = |st, before: Option<&fattr3>| {
            (
                st,
                n3::SETATTR3resfail {
                    obj_wcc: wcc(ctx, before, n),
                },
            )
        };
        let before = ctx.ns.getattr(n).map_err(|st| fail(st, None))?;
        if let Some(g) = guard {
            if g != before.ctime {
                return Err(fail(nfsstat3::NFS3ERR_NOT_SYNC, Some(&before)));
            }
        }
        apply_setattr(ctx, n, &before, &sa).map_err(|st| fail(st, Some(&before)))?;
        Ok(n3::SETATTR3resok {
            obj_wcc: wcc(ctx, Some(&before), n),
        })
    }))
}

fn apply_setattr(ctx: &Ctx, n: &Node, a: &fattr3, sa: &n3::sattr3) -> Res<()> {
    let owner = ctx.caller.uid == 0 || ctx.caller.uid == a.uid;
    let size = match sa.size {
        Nfs3Option::Some(s) => Some(s),
        Nfs3Option::None => None,
    };
    let mode = match sa.mode {
        Nfs3Option::Some(m) => Some(m & 0o7777),
        Nfs3Option::None => None,
    };
    let chown = matches!(sa.uid, Nfs3Option::Some(u) if u != a.uid)
        || matches!(sa.gid, Nfs3Option::Some(g) if g != a.gid);
    let times = !matches!(sa.atime, n3::set_atime::DONT_CHANGE)
        || !matches!(sa.mtime, n3::set_mtime::DONT_CHANGE);
    if times && !owner && !Namespace::may(&ctx.caller, a, W) {
        return Err(nfsstat3::NFS3ERR_ACCES);
    }
    match n {
        // The VM's own files keep their size, owner and mode; times are
        // accepted and ignored (a hypervisor touches them).
        Node::Disk(..) | Node::Config(_) | Node::Root | Node::Dir(_) => {
            let resize = size.is_some_and(|s| s != a.size);
            let remode = mode.is_some_and(|m| m != a.mode);
            if resize || remode || chown {
                return Err(nfsstat3::NFS3ERR_PERM);
            }
            Ok(())
        }
        Node::Side(s, f) => {
            if chown {
                return Err(nfsstat3::NFS3ERR_PERM);
            }
            if let Some(sz) = size {
                if !Namespace::may(&ctx.caller, a, W) {
                    return Err(nfsstat3::NFS3ERR_ACCES);
                }
                ctx.conn.attach(s)?;
                // SETATTR is synchronous (RFC 1813): durable before the reply.
                open_side(f, true)
                    .and_then(|file| {
                        file.set_len(sz)
                            .and_then(|()| file.sync_all())
                            .map_err(|e| io_error(&e))
                    })
                    .inspect_err(|_| ctx.side_verifier.failed())?;
            }
            if let Some(m) = mode {
                if !owner {
                    return Err(nfsstat3::NFS3ERR_PERM);
                }
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(m))
                    .map_err(|e| io_error(&e))?;
            }
            set_times(f, &sa.atime, &sa.mtime)
        }
    }
}

fn set_times(f: &super::fs::SideFile, at: &n3::set_atime, mt: &n3::set_mtime) -> Res<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let spec = |t: Option<Option<nfstime3>>| match t {
        None => TimeSpec::UTIME_OMIT,
        Some(None) => TimeSpec::UTIME_NOW,
        Some(Some(t)) => TimeSpec::new(t.seconds as i64, t.nseconds as i64),
    };
    let a = match at {
        n3::set_atime::DONT_CHANGE => None,
        n3::set_atime::SET_TO_SERVER_TIME => Some(None),
        n3::set_atime::SET_TO_CLIENT_TIME(t) => Some(Some(*t)),
    };
    let m = match mt {
        n3::set_mtime::DONT_CHANGE => None,
        n3::set_mtime::SET_TO_SERVER_TIME => Some(None),
        n3::set_mtime::SET_TO_CLIENT_TIME(t) => Some(Some(*t)),
    };
    if a.is_none() && m.is_none() {
        return Ok(());
    }
    utimensat(
        None,
        &f.path,
        &spec(a),
        &spec(m),
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| io_error(&std::io::Error::from(e)))
}

fn lookup(ctx: &Ctx, r: &mut Reader) -> Result<n3::LOOKUP3res, Garbage> {
    let dir = r.fh()?;
    let name = r.name()?;
    Ok(with_node(ctx, &dir, |d| {
        match ctx.ns.lookup(&ctx.caller, d, name) {
            Ok(n) => Ok(n3::LOOKUP3resok {
                object: nfs_fh3 {
                    data: Opaque::owned(ctx.ns.handle(&n)),
                },
                obj_attributes: post(ctx, &n),
                dir_attributes: post(ctx, d),
            }),
            Err(st) => Err((
                st,
                n3::LOOKUP3resfail {
                    dir_attributes: post(ctx, d),
                },
            )),
        }
    }))
}

fn access(ctx: &Ctx, r: &mut Reader) -> Result<n3::ACCESS3res, Garbage> {
    let fh = r.fh()?;
    let want = r.u32()?;
    Ok(with_node(ctx, &fh, |n| {
        let a = ctx.ns.getattr(n).map_err(|st| (st, Default::default()))?;
        let c = &ctx.caller;
        let mut granted = 0;
        let may = |bits| Namespace::may(c, &a, bits);
        if may(R) {
            granted |= n3::ACCESS3_READ;
        }
        if n.is_dir() && may(X) {
            granted |= n3::ACCESS3_LOOKUP;
        }
        let writable = match n {
            Node::Config(_) | Node::Root => false,
            _ => may(W),
        };
        if writable {
            granted |= n3::ACCESS3_MODIFY | n3::ACCESS3_EXTEND;
            if matches!(n, Node::Dir(_)) {
                granted |= n3::ACCESS3_DELETE;
            }
        }
        if !n.is_dir() && may(X) {
            granted |= n3::ACCESS3_EXECUTE;
        }
        Ok(n3::ACCESS3resok {
            obj_attributes: Nfs3Option::Some(a),
            access: want & granted,
        })
    }))
}

fn read(ctx: &Ctx, r: &mut Reader) -> Result<n3::READ3res<'static>, Garbage> {
    let fh = r.fh()?;
    let off = r.u64()?;
    let count = r.u32()?.min(MAX_IO);
    Ok(with_node(ctx, &fh, |n| {
        let fail = |st| {
            (
                st,
                n3::READ3resfail {
                    file_attributes: post(ctx, n),
                },
            )
        };
        ctx.ns.check(&ctx.caller, n, R).map_err(fail)?;
        let (data, eof) = match n {
            Node::Disk(s, d) => {
                ctx.conn.attach(s).map_err(fail)?;
                // A hit is read now: no attributes fetched for nothing.
                if let Some(l) = ctx.later.filter(|_| !d.is_local(off, count as u64)) {
                    if read_later(l, d, off, count, post(ctx, n)) {
                        // The reply goes with the fetch; this one is dropped.
                        let dropped = n3::READ3resfail {
                            file_attributes: Nfs3Option::None,
                        };
                        return Err((nfsstat3::NFS3ERR_JUKEBOX, dropped));
                    }
                }
                let data = d
                    .read(off, count as usize)
                    .map_err(|e| fail(nfs_error(&e)))?;
                let eof = off.saturating_add(data.len() as u64) >= d.size;
                (data, eof)
            }
            Node::Config(s) => {
                let c = &s.config_json;
                let start = (off as usize).min(c.len());
                let end = start.saturating_add(count as usize).min(c.len());
                (c[start..end].to_vec(), end == c.len())
            }
            Node::Side(s, f) => {
                ctx.conn.attach(s).map_err(fail)?;
                read_side(f, off, count).map_err(fail)?
            }
            _ => return Err(fail(nfsstat3::NFS3ERR_ISDIR)),
        };
        Ok(n3::READ3resok {
            file_attributes: post(ctx, n),
            count: data.len() as u32,
            eof,
            data: Opaque::owned(data),
        })
    }))
}

/// Hands a READ that must wait for a fetch to the disk (`Disk::read_later`)
/// with a continuation that sends its reply; false if the disk gives it
/// back (the caller reads now).
fn read_later(
    l: &Later,
    d: &Arc<crate::volume::Volume>,
    off: u64,
    count: u32,
    attrs: n3::post_op_attr,
) -> bool {
    let (xid, send, size) = (l.xid, l.send.clone(), d.size);
    let done: crate::disk::ReadDone = Box::new(move |r| {
        let data = r.as_ref().map(|d| &d[..]);
        // Encoded while `r` lives: the fetched bytes go into the reply
        // record without a copy of their own.
        let res: n3::READ3res = match data {
            Ok(data) => Nfs3Result::Ok(n3::READ3resok {
                file_attributes: attrs,
                count: data.len() as u32,
                eof: off.saturating_add(data.len() as u64) >= size,
                data: Opaque::borrowed(data),
            }),
            Err(e) => Nfs3Result::Err((
                nfs_error(e),
                n3::READ3resfail {
                    file_attributes: attrs,
                },
            )),
        };
        send(rpc::success(xid, &res));
    });
    let taken = d.read_later(off, count as usize, done, &l.spawn).is_ok();
    if taken {
        l.taken.store(true, std::sync::atomic::Ordering::Release);
    }
    taken
}

fn write(ctx: &Ctx, r: &mut Reader) -> Result<n3::WRITE3res, Garbage> {
    let fh = r.fh()?;
    let off = r.u64()?;
    let count = r.u32()?;
    let stable = r.u32()?;
    let data = r.opaque(MAX_IO as usize)?;
    if data.len() != count as usize || stable > 2 {
        return Err(Garbage);
    }
    let sync = stable != 0 || ctx.write_through;
    Ok(with_node(ctx, &fh, |n| {
        let fail = |st, before: Option<&fattr3>| {
            (
                st,
                n3::WRITE3resfail {
                    file_wcc: wcc(ctx, before, n),
                },
            )
        };
        let before = ctx
            .ns
            .check(&ctx.caller, n, W)
            .map_err(|st| fail(st, None))?;
        match n {
            Node::Disk(s, d) => {
                ctx.conn
                    .write_attach(s)
                    .map_err(|st| fail(st, Some(&before)))?;
                d.write(off, data)
                    .map_err(|e| fail(nfs_error(&e), Some(&before)))?;
                if sync {
                    d.flush().map_err(|e| fail(nfs_error(&e), Some(&before)))?;
                }
            }
            Node::Side(s, f) => {
                ctx.conn.attach(s).map_err(|st| fail(st, Some(&before)))?;
                write_side(f, off, data, sync).map_err(|st| {
                    ctx.side_verifier.failed();
                    fail(st, Some(&before))
                })?;
            }
            Node::Config(_) => return Err(fail(nfsstat3::NFS3ERR_ROFS, Some(&before))),
            _ => return Err(fail(nfsstat3::NFS3ERR_ISDIR, Some(&before))),
        }
        Ok(n3::WRITE3resok {
            file_wcc: wcc(ctx, Some(&before), n),
            count,
            committed: if sync {
                stable_how::FILE_SYNC
            } else {
                stable_how::UNSTABLE
            },
            verf: writeverf3(write_verifier(ctx, n)),
        })
    }))
}

/// A disk's verifier is its epoch; side files share the boot's.
fn write_verifier(ctx: &Ctx, n: &Node) -> [u8; 8] {
    match n {
        Node::Disk(_, d) => crate::disk::Disk::epoch(d.as_ref()).to_be_bytes(),
        _ => ctx.side_verifier.get(),
    }
}

fn commit(ctx: &Ctx, r: &mut Reader) -> Result<n3::COMMIT3res, Garbage> {
    let fh = r.fh()?;
    let _off = r.u64()?;
    let _count = r.u32()?;
    let n = match resolve(ctx, &fh) {
        Ok(n) => n,
        Err(st) => {
            return Ok(Nfs3Result::Err((
                st,
                n3::COMMIT3resfail {
                    file_wcc: wcc_data::default(),
                },
            )))
        }
    };
    Ok((|n: &Node| {
        let fail = |st| {
            (
                st,
                n3::COMMIT3resfail {
                    file_wcc: wcc(ctx, None, n),
                },
            )
        };
        match n {
            Node::Disk(s, d) => {
                ctx.conn.attach(s).map_err(fail)?;
                d.flush().map_err(|e| fail(nfs_error(&e)))?;
            }
            Node::Side(_, f) => open_side(f, false)
                .and_then(|file| file.sync_all().map_err(|e| io_error(&e)))
                .map_err(|st| {
                    ctx.side_verifier.failed();
                    fail(st)
                })?,
            _ => {}
        }
        Ok(n3::COMMIT3resok {
            file_wcc: wcc(ctx, None, n),
            verf: writeverf3(write_verifier(ctx, n)),
        })
    })(&n)
    .map_or_else(Nfs3Result::Err, Nfs3Result::Ok))
}

fn fsstat(ctx: &Ctx, r: &mut Reader) -> Result<n3::FSSTAT3res, Garbage> {
    let fh = r.fh()?;
    Ok(with_node(ctx, &fh, |n| {
        let (t, f, a, files, afiles) = ctx.ns.fsstat();
        Ok(n3::FSSTAT3resok {
            obj_attributes: post(ctx, n),
            tbytes: t,
            fbytes: f,
            abytes: a,
            tfiles: files,
            ffiles: afiles,
            afiles,
            invarsec: 0,
        })
    }))
}

fn fsinfo(ctx: &Ctx, r: &mut Reader) -> Result<n3::FSINFO3res, Garbage> {
    let fh = r.fh()?;
    Ok(with_node(ctx, &fh, |n| {
        Ok(n3::FSINFO3resok {
            obj_attributes: post(ctx, n),
            rtmax: MAX_IO,
            rtpref: MAX_IO,
            rtmult: 4096,
            wtmax: MAX_IO,
            wtpref: MAX_IO,
            wtmult: 4096,
            dtpref: 64 << 10,
            maxfilesize: crate::repo::limits::MAX_DISK_BYTES,
            time_delta: nfstime3 {
                seconds: 0,
                nseconds: 1,
            },
            properties: n3::FSF3_HOMOGENEOUS | n3::FSF3_CANSETTIME,
        })
    }))
}

fn pathconf(ctx: &Ctx, r: &mut Reader) -> Result<n3::PATHCONF3res, Garbage> {
    let fh = r.fh()?;
    Ok(with_node(ctx, &fh, |n| {
        Ok(n3::PATHCONF3resok {
            obj_attributes: post(ctx, n),
            linkmax: 1,
            name_max: 255,
            no_trunc: true,
            chown_restricted: true,
            case_insensitive: false,
            case_preserving: true,
        })
    }))
}
