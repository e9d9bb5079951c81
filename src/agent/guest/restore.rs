//! The agent's restore job (`agent-restore`): what the host sends is
//! written into the guest, each file whole, hard links of one inode made
//! links to the first file of it where they can be.

use super::*;

/// Writes what the host sends: each file appears whole (temp, fsync,
/// rename over the old one), with mode, owner and modification time;
/// directories get theirs last. The host's end frame is checked, so a
/// cut stream is an error (files before the cut are restored, whole).
pub(super) fn restore(
    w: &mut FrameWriter<impl Write>,
    r: &mut FrameReader<impl Read>,
    to: Option<&str>,
) -> Result<()> {
    let base = match to {
        Some(t) => {
            check_path(t).map_err(|e| e.context("--to"))?;
            Some(PathBuf::from(t))
        }
        None => None,
    };
    let root = place::root()?;
    let slash = Path::new("/");
    // --to itself: created, and never through a link a user planted.
    if let Some(b) = &base {
        place::open_dirs(&root, slash, &place::components(b), true)
            .map_err(|e| e.context("--to"))?;
    }
    let is_root = nix::unistd::Uid::effective().is_root();
    let mut dirs = vec![];
    let mut n = 0u64;
    // The parent directory opened last: entries come in tree order.
    let mut last: Option<(PathBuf, std::os::fd::OwnedFd)> = None;
    // The first file restored of each inode the host sent (`Entry::inode`,
    // only where its links are to be links again): where it was written
    // and what it became, for the links to it.
    let mut firsts: std::collections::HashMap<(u64, u64), Written> = Default::default();
    loop {
        let e = match r.next_frame()? {
            Frame::Header(e) => e,
            Frame::End(_) => break,
            Frame::Error(m) => return Err(Error::invalid(format!("the host stopped: {m}"))),
            other => {
                return Err(Error::corrupt(format!(
                    "the host's stream: unexpected {}",
                    describe(&other)
                )))
            }
        };
        e.check_header()?;
        let dst = place::under(base.as_deref(), &e.path);
        let names = place::components(&dst);
        let Some((name, parents)) = names.split_last() else {
            // `/` itself: a directory, its metadata set last.
            if e.kind != EntryKind::Dir {
                return Err(Error::invalid(format!(
                    "cannot restore a {:?} as /",
                    e.kind
                )));
            }
            dirs.push((dst, e));
            n += 1;
            continue;
        };
        let parent = dst.parent().unwrap_or(slash).to_path_buf();
        if last.as_ref().map(|(p, _)| p) != Some(&parent) {
            let fd = place::open_dirs(&root, slash, parents, true)?;
            last = Some((parent.clone(), fd));
        }
        let dir = &last.as_ref().expect("just opened").1;
        let tmp = std::ffi::OsString::from(format!(
            ".{}.recoverfs-restore.{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let tmp_shown = parent.join(&tmp);
        match e.kind {
            EntryKind::Dir => {
                place::open_dirs(dir, &parent, &[name], true)?;
                dirs.push((dst, e));
                n += 1;
                continue;
            }
            EntryKind::File if link_to_first(dir, &tmp, &e, &firsts, w, &root)? => {
                // The link's content still comes (agents before links
                // wrote it out): read and passed over.
                copy_content(&mut r.content(e.size), &mut std::io::sink()).map_err(|err| {
                    let _ = place::remove(dir, &tmp, &tmp_shown);
                    stream_err(err, &tmp_shown)
                })?;
            }
            EntryKind::File => {
                let f = place::create_new(dir, &tmp, &tmp_shown)?;
                // All-zero stretches stay holes: a sparse file restores
                // sparse, and fits where it was backed up (explore6 M5).
                let mut sparse = crate::util::SparseWriter::new(&f);
                let copied = copy_content(&mut r.content(e.size), &mut sparse)
                    .and_then(|()| sparse.finish())
                    .map_err(|err| stream_err(err, &tmp_shown))
                    .and_then(|_| place::set_meta_fd(&f, &e, is_root, &tmp_shown))
                    .and_then(|()| f.sync_all().ctx(|| format!("sync {}", tmp_shown.display())));
                if copied.is_err() {
                    let _ = place::remove(dir, &tmp, &tmp_shown);
                }
                copied?;
                if let Some(ino) = e.inode {
                    let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&f)).map_err(
                        |err| Error::io(format!("stat {}", tmp_shown.display()), err.into()),
                    )?;
                    firsts.entry((ino.dev, ino.ino)).or_insert(Written {
                        parent: parent.clone(),
                        name: name.to_os_string(),
                        header: e.clone(),
                        file: (st.st_dev, st.st_ino),
                    });
                }
            }
            EntryKind::Symlink => {
                place::remove(dir, &tmp, &tmp_shown)?;
                nix::unistd::symlinkat(
                    e.target.as_deref().unwrap_or_default(),
                    Some(std::os::fd::AsRawFd::as_raw_fd(dir)),
                    tmp.as_os_str(),
                )
                .map_err(|err| {
                    Error::io(format!("create link {}", tmp_shown.display()), err.into())
                })?;
                place::set_link_meta(dir, &tmp, &e, is_root, &tmp_shown)?;
            }
        }
        place::replace(dir, &tmp, name, &dst)?;
        n += 1;
    }
    for (d, e) in dirs.iter().rev() {
        let fd = place::open_dirs(&root, slash, &place::components(d), false)?;
        place::set_meta_fd(&fd, e, is_root, d)?;
    }
    w.log(&format!(
        "restored {n} entries {}",
        match to {
            Some(t) => format!("under {t}"),
            None => "to their places".into(),
        }
    ))
    .map_err(|e| Error::io("write to the stream port", e))
}

/// Copies a file's content from the stream to `out`: a hole frame is
/// passed over whole where `out` takes holes (a seek), never read out as
/// zeros and looked at again (fixmisc 3: a TiB hole took minutes).
fn copy_content(
    src: &mut impl crate::repo::catalog::SparseRead,
    out: &mut dyn crate::files::Sink,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let zeros = src.zeros_ahead();
        if zeros > 0 && out.skip_zeros(zeros)? {
            src.skip_zeros(zeros);
            continue;
        }
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
    }
}

/// A file an `agent-restore` wrote, that later entries may be links to.
struct Written {
    parent: PathBuf,
    name: std::ffi::OsString,
    header: crate::repo::catalog::Entry,
    /// Its device and inode number here.
    file: (u64, u64),
}

/// Makes `tmp` in `dir` a hard link to the file restored first of `e`'s
/// inode, if the host sent one with the same header: whether it did. A
/// first file that is no longer the one written there, or a link that
/// cannot be made (another filesystem, one without hard links), is a
/// copy instead, said in the log.
fn link_to_first(
    dir: &std::os::fd::OwnedFd,
    tmp: &std::ffi::OsStr,
    e: &crate::repo::catalog::Entry,
    firsts: &std::collections::HashMap<(u64, u64), Written>,
    w: &mut FrameWriter<impl Write>,
    root: &std::os::fd::OwnedFd,
) -> Result<bool> {
    use nix::fcntl::{AtFlags, OFlag};
    use std::os::fd::AsRawFd;
    let Some(first) = e
        .inode
        .and_then(|i| firsts.get(&(i.dev, i.ino)))
        .filter(|f| same_file(&f.header, e))
    else {
        return Ok(false);
    };
    let shown = first.parent.join(&first.name);
    let linked = place::open_dirs(
        root,
        Path::new("/"),
        &place::components(&first.parent),
        false,
    )
    .map_err(|err| err.to_string())
    .and_then(|d| {
        // The first file pinned by a descriptor, checked, and linked from
        // that descriptor: a user who swaps the name in between gets no
        // link to another file.
        let fd = nix::fcntl::openat(
            Some(d.as_raw_fd()),
            first.name.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|err| err.to_string())?;
        // SAFETY: `fd` was just returned by openat and is owned by no one else.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|err| err.to_string())?;
        if (st.st_dev, st.st_ino) != first.file {
            return Err("it was replaced since".to_string());
        }
        let _ = nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            tmp,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        nix::unistd::linkat(
            Some(fd.as_raw_fd()),
            std::ffi::OsStr::new(""),
            Some(dir.as_raw_fd()),
            tmp,
            AtFlags::AT_EMPTY_PATH,
        )
        .or_else(|_| {
            // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH: through /proc.
            nix::unistd::linkat(
                None,
                std::ffi::OsStr::new(&format!("/proc/self/fd/{}", fd.as_raw_fd())),
                Some(dir.as_raw_fd()),
                tmp,
                AtFlags::AT_SYMLINK_FOLLOW,
            )
        })
        .map_err(|err| err.to_string())
    });
    match linked {
        Ok(()) => Ok(true),
        Err(why) => {
            w.log(&format!(
                "{} was a hard link to {} in the backup; restored as a separate copy ({why})",
                e.path,
                shown.display()
            ))
            .map_err(io)?;
            Ok(false)
        }
    }
}

/// Whether two headers of one inode say the same about it.
fn same_file(a: &crate::repo::catalog::Entry, b: &crate::repo::catalog::Entry) -> bool {
    (
        a.kind,
        a.size,
        a.mode,
        a.uid,
        a.gid,
        a.mtime,
        a.mtime_nsec,
        a.inode,
    ) == (
        b.kind,
        b.size,
        b.mode,
        b.uid,
        b.gid,
        b.mtime,
        b.mtime_nsec,
        b.inode,
    )
}

/// An error from reading a file's content off the stream or writing it
/// to `shown`: ours (carried through `io::Error::other`) as it was.
fn stream_err(err: std::io::Error, shown: &Path) -> Error {
    err.get_ref()
        .and_then(|i| i.downcast_ref::<Error>())
        .cloned()
        .unwrap_or_else(|| Error::io(format!("write {}", shown.display()), err))
}
