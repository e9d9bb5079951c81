//! The namespace procedures: CREATE (unchecked, guarded, exclusive),
//! REMOVE/RMDIR, RENAME, READDIR and READDIRPLUS of a VM's directory.

use super::*;

pub(super) fn create(ctx: &Ctx, r: &mut Reader) -> Result<n3::CREATE3res, Garbage> {
    let dir = r.fh()?;
    let name = r.name()?;
    // createhow3: UNCHECKED/GUARDED carry attributes, EXCLUSIVE a verifier.
    let how = r.u32()?;
    let (mode, verf) = match how {
        0 | 1 => {
            let sa = r.sattr3()?;
            let m = match sa.mode {
                Nfs3Option::Some(m) => Some(m),
                Nfs3Option::None => None,
            };
            (m, None)
        }
        2 => (None, Some(r.createverf()?)),
        _ => return Err(Garbage),
    };
    Ok(with_node(ctx, &dir, |d| {
        let fail = |st, before: Option<&fattr3>| {
            (
                st,
                n3::CREATE3resfail {
                    dir_wcc: wcc(ctx, before, d),
                },
            )
        };
        let Node::Dir(s) = d else {
            let st = if d.is_dir() {
                nfsstat3::NFS3ERR_ACCES
            } else {
                nfsstat3::NFS3ERR_NOTDIR
            };
            return Err(fail(st, None));
        };
        let before = ctx
            .ns
            .check(&ctx.caller, d, W | X)
            .map_err(|st| fail(st, None))?;
        ctx.conn.attach(s).map_err(|st| fail(st, Some(&before)))?;
        let existing = ctx.ns.lookup(&ctx.caller, d, name).ok();
        let node = match (existing, how) {
            // UNCHECKED on an existing file: it is simply there.
            (Some(n), 0) => n,
            (Some(n @ Node::Side(..)), 2) if exclusive_matches(&n, verf) => n,
            (Some(_), _) => return Err(fail(nfsstat3::NFS3ERR_EXIST, Some(&before))),
            (None, _) => {
                let name = side_name(s, name).map_err(|st| fail(st, Some(&before)))?;
                let f =
                    create_side(s, name, how != 0, mode).map_err(|st| fail(st, Some(&before)))?;
                if let Some(v) = verf {
                    stamp_verifier(&f, v).map_err(|st| fail(st, Some(&before)))?;
                }
                Node::Side(s.clone(), f)
            }
        };
        Ok(n3::CREATE3resok {
            obj: Nfs3Option::Some(nfs_fh3 {
                data: Opaque::owned(ctx.ns.handle(&node)),
            }),
            obj_attributes: post(ctx, &node),
            dir_wcc: wcc(ctx, Some(&before), d),
        })
    }))
}

/// EXCLUSIVE create keeps the client's verifier in the new file's times
/// (as knfsd does), so a retransmitted CREATE finds its own file.
fn stamp_verifier(f: &crate::export::nfs::fs::SideFile, v: n3::createverf3) -> Res<()> {
    let (a, m) = verifier_times(v);
    set_times(
        f,
        &n3::set_atime::SET_TO_CLIENT_TIME(a),
        &n3::set_mtime::SET_TO_CLIENT_TIME(m),
    )
}

fn verifier_times(v: n3::createverf3) -> (nfstime3, nfstime3) {
    let w = |i: usize| u32::from_be_bytes(v.0[i..i + 4].try_into().expect("4 bytes"));
    // Nanoseconds must stay below 10^9.
    (
        nfstime3 {
            seconds: w(0),
            nseconds: 0,
        },
        nfstime3 {
            seconds: w(4),
            nseconds: 0,
        },
    )
}

fn exclusive_matches(n: &Node, verf: Option<n3::createverf3>) -> bool {
    let (Node::Side(_, f), Some(v)) = (n, verf) else {
        return false;
    };
    let (a, m) = verifier_times(v);
    std::fs::symlink_metadata(&f.path)
        .map(|md| {
            use std::os::unix::fs::MetadataExt;
            md.atime() as u32 == a.seconds && md.mtime() as u32 == m.seconds
        })
        .unwrap_or(false)
}

pub(super) fn remove(ctx: &Ctx, r: &mut Reader, rmdir: bool) -> Result<n3::REMOVE3res, Garbage> {
    let dir = r.fh()?;
    let name = r.name()?;
    Ok(with_node(ctx, &dir, |d| {
        let fail = |st, before: Option<&fattr3>| {
            (
                st,
                n3::REMOVE3resfail {
                    dir_wcc: wcc(ctx, before, d),
                },
            )
        };
        let before = ctx
            .ns
            .check(&ctx.caller, d, W | X)
            .map_err(|st| fail(st, None))?;
        let n = ctx
            .ns
            .lookup(&ctx.caller, d, name)
            .map_err(|st| fail(st, Some(&before)))?;
        match (&n, rmdir) {
            (Node::Side(s, f), false) => {
                ctx.conn.attach(s).map_err(|st| fail(st, Some(&before)))?;
                std::fs::remove_file(&f.path).map_err(|e| fail(io_error(&e), Some(&before)))?;
                sync_dir(&side_dir(s)).map_err(|st| fail(st, Some(&before)))?;
            }
            (Node::Side(..), true) => return Err(fail(nfsstat3::NFS3ERR_NOTDIR, Some(&before))),
            (Node::Dir(_), false) => return Err(fail(nfsstat3::NFS3ERR_ISDIR, Some(&before))),
            // A VM directory goes away with `release`; its disks and vm.json never.
            _ => return Err(fail(nfsstat3::NFS3ERR_PERM, Some(&before))),
        }
        Ok(n3::REMOVE3resok {
            dir_wcc: wcc(ctx, Some(&before), d),
        })
    }))
}

pub(super) fn rename(ctx: &Ctx, r: &mut Reader) -> Result<n3::RENAME3res, Garbage> {
    let from_dir = r.fh()?;
    let from = r.name()?;
    let to_dir = r.fh()?;
    let to = r.name()?;
    let fail = |st| {
        Nfs3Result::Err((
            st,
            n3::RENAME3resfail {
                fromdir_wcc: wcc_data::default(),
                todir_wcc: wcc_data::default(),
            },
        ))
    };
    let (fd, td) = match (resolve(ctx, &from_dir), resolve(ctx, &to_dir)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(st), _) | (_, Err(st)) => return Ok(fail(st)),
    };
    let res = (|| {
        let (Node::Dir(s), Node::Dir(t)) = (&fd, &td) else {
            return Err(nfsstat3::NFS3ERR_ACCES);
        };
        if s.serial != t.serial {
            return Err(nfsstat3::NFS3ERR_XDEV);
        }
        ctx.ns.check(&ctx.caller, &fd, W | X)?;
        let Node::Side(_, f) = ctx.ns.lookup(&ctx.caller, &fd, from)? else {
            // Disk files and vm.json keep their names.
            return Err(nfsstat3::NFS3ERR_PERM);
        };
        let to = side_name(s, to).map_err(|st| match st {
            // Renaming over a disk or vm.json.
            nfsstat3::NFS3ERR_EXIST => nfsstat3::NFS3ERR_PERM,
            st => st,
        })?;
        ctx.conn.attach(s)?;
        std::fs::rename(&f.path, side_dir(s).join(to)).map_err(|e| io_error(&e))?;
        sync_dir(&side_dir(s))
    })();
    Ok(match res {
        Ok(()) => Nfs3Result::Ok(n3::RENAME3resok {
            fromdir_wcc: wcc(ctx, None, &fd),
            todir_wcc: wcc(ctx, None, &td),
        }),
        Err(st) => fail(st),
    })
}

/// Entries of a directory with their cookies: "." and ".." first (1, 2),
/// then every entry with its file id as its cookie, in file id order, so
/// a listing continues correctly even when entries come and go meanwhile.
fn entries(ctx: &Ctx, d: &Node) -> Res<Vec<(u64, String, Option<Node>)>> {
    let mut list: Vec<(u64, String, Option<Node>)> = ctx
        .ns
        .list(&ctx.caller, d)?
        .into_iter()
        .map(|(name, n)| (ctx.ns.fileid_of(&n), name, Some(n)))
        .collect();
    list.sort_by_key(|e| e.0);
    let mut out = vec![
        (1, ".".to_string(), Some(d.clone())),
        (2, "..".to_string(), None),
    ];
    out.extend(list);
    Ok(out)
}

pub(super) fn readdir(ctx: &Ctx, r: &mut Reader) -> Result<n3::READDIR3res<'static>, Garbage> {
    let dir = r.fh()?;
    let cookie = r.u64()?;
    let _verf = r.fixed::<8>()?;
    let count = r.u32()?.clamp(512, MAX_IO);
    Ok(with_node(ctx, &dir, |d| {
        let list = entries(ctx, d).map_err(|st| {
            (
                st,
                n3::READDIR3resfail {
                    dir_attributes: post(ctx, d),
                },
            )
        })?;
        let mut out = BoundedList::new(count as usize - 128);
        let mut eof = true;
        for (id, name, _) in list.into_iter().filter(|e| e.0 > cookie) {
            let e = entry3 {
                fileid: id,
                name: filename3::from(name.into_bytes()),
                cookie: id,
            };
            if out.try_push(e).is_err() {
                eof = false;
                break;
            }
        }
        Ok(n3::READDIR3resok {
            dir_attributes: post(ctx, d),
            cookieverf: cookieverf3::default(),
            reply: dirlist3 {
                entries: out.into_inner(),
                eof,
            },
        })
    }))
}

pub(super) fn readdirplus(
    ctx: &Ctx,
    r: &mut Reader,
) -> Result<n3::READDIRPLUS3res<'static>, Garbage> {
    let dir = r.fh()?;
    let cookie = r.u64()?;
    let _verf = r.fixed::<8>()?;
    let _dircount = r.u32()?;
    let maxcount = r.u32()?.clamp(512, MAX_IO);
    Ok(with_node(ctx, &dir, |d| {
        let list = entries(ctx, d).map_err(|st| {
            (
                st,
                n3::READDIRPLUS3resfail {
                    dir_attributes: post(ctx, d),
                },
            )
        })?;
        let mut out = BoundedList::new(maxcount as usize - 128);
        let mut eof = true;
        for (id, name, node) in list.into_iter().filter(|e| e.0 > cookie) {
            let node = node.unwrap_or(Node::Root);
            let e = entryplus3 {
                fileid: id,
                name: filename3::from(name.into_bytes()),
                cookie: id,
                name_attributes: post(ctx, &node),
                name_handle: Nfs3Option::Some(nfs_fh3 {
                    data: Opaque::owned(ctx.ns.handle(&node)),
                }),
            };
            if out.try_push(e).is_err() {
                eof = false;
                break;
            }
        }
        Ok(n3::READDIRPLUS3resok {
            dir_attributes: post(ctx, d),
            cookieverf: cookieverf3::default(),
            reply: dirlistplus3 {
                entries: out.into_inner(),
                eof,
            },
        })
    }))
}
