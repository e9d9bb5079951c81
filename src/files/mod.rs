//! `recoverfs files ls|cat|restore`: single files from a backup, without
//! booting the VM.
//!
//! From a **file backup** (a catalog written by `agent-backup`) the
//! entries come from the catalog and contents from its chunks, each read
//! and verified. Restores write under a directory on this host (`--to`,
//! default the current directory) at the entry's guest path: each file
//! appears atomically (temp, fsync, rename) with its mode, owner (when
//! run as root) and modification time; directories get theirs after
//! their contents. Nothing existing is replaced, and no path is written
//! through a symbolic link: every entry is checked before anything is
//! written. Files the backup recorded as links to one inode are restored
//! as hard links to one file again ([`link_plan`]), or as copies (with a
//! warning) where a link cannot be made (a mount below `--to`).
//!
//! A restore stopped part-way (SIGINT/SIGTERM set its stop flag) leaves a
//! true subset: the entries before the stop, each whole with its
//! metadata (directories get theirs too); the file being written is
//! removed, never left under its name; the rest is not restored.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::repo::catalog::{check_path, is_catalog_id, Catalog, Entry, EntryKind, Inode};
use crate::repo::Repository;
use crate::util::escape_controls;

pub mod disk;

/// The file backup `backup` of `vm`, or its newest.
pub fn catalog(repo: &Repository, vm: &str, backup: Option<&str>) -> Result<Catalog> {
    crate::util::validate_name("VM name", vm)?;
    let id = match backup {
        Some(id) if is_catalog_id(id) => id.to_string(),
        Some(id) => {
            return Err(Error::invalid(format!(
                "backup {id:?} is not a file backup of VM {vm} (file backup ids end in -files; `recoverfs list` shows them)"
            )))
        }
        None => repo.catalog_ids(vm)?.pop().ok_or_else(|| {
            Error::not_found(format!(
                "VM {vm:?} has no file backups in {} (make one with agent-backup)",
                repo.location()
            ))
        })?,
    };
    repo.catalog(vm, &id)
}

/// The entries at or under `path`; an error if there are none.
pub fn select<'a>(c: &'a Catalog, path: &str) -> Result<Vec<&'a Entry>> {
    let path = normalise(path)?;
    let v = distinct(&c.under(&path).collect::<Vec<_>>());
    if v.is_empty() {
        return Err(Error::not_found(format!(
            "{path} is not in file backup {} of VM {}",
            c.id, c.vm
        )));
    }
    Ok(v)
}

/// `/srv/app/` → `/srv/app`.
fn normalise(p: &str) -> Result<String> {
    let t = if p.len() > 1 {
        p.trim_end_matches('/')
    } else {
        p
    };
    check_path(t)?;
    Ok(t.to_string())
}

/// Writes a file entry's content to `out`, every chunk verified; stops
/// between chunks once `stop` is set (an [`ErrorKind::Interrupted`]
/// error saying how far it got).
pub fn cat(
    repo: &Repository,
    c: &Catalog,
    e: &Entry,
    out: &mut dyn Sink,
    stop: &AtomicBool,
) -> Result<()> {
    if e.kind != EntryKind::File {
        return Err(Error::invalid(format!("{} is not a regular file", e.path)));
    }
    let (mut done, mut i) = (0u64, 0u64);
    for ch in &e.chunks {
        if stop.load(Ordering::SeqCst) {
            return Err(copied_part(done, e));
        }
        let what = format!("{}/{} {} chunk {i}", c.vm, c.id, e.path);
        // A run (a sparse file's hole) is read and checked once.
        let (data, _) = repo.read_chunk(&ch.digest, ch.len as usize, &what)?;
        // A run of the zero chunk is a hole: passed over whole where the
        // sink can (a restored file: a seek, not N zero bytes written or
        // scanned; fixmisc 3).
        if data.iter().all(|&b| b == 0) {
            let n = (ch.run_bytes())
                .ok_or_else(|| Error::corrupt(format!("{what}: a run too long")))?;
            if out
                .skip_zeros(n)
                .ctx(|| "write the file's content".into())?
            {
                done += n;
                i += ch.repeat;
                continue;
            }
        }
        for _ in 0..ch.repeat {
            if stop.load(Ordering::SeqCst) {
                return Err(copied_part(done, e));
            }
            out.write_all(&data)
                .ctx(|| "write the file's content".into())?;
            done += data.len() as u64;
        }
        i += ch.repeat;
    }
    Ok(())
}

/// A copy of `e` stopped after `done` bytes.
pub fn copied_part(done: u64, e: &Entry) -> Error {
    Error::interrupted(format!("{done} of {} bytes of {} copied", e.size, e.path))
}

/// Restores `entries` of a file backup under `to`; the number written.
pub fn restore(
    repo: &Repository,
    c: &Catalog,
    entries: &[&Entry],
    to: &Path,
    stop: &AtomicBool,
) -> Result<u64> {
    restore_from(repo, c, entries, to, stop, &How::default())
}

/// [`restore`], with what to do about entries already there.
pub fn restore_from(
    repo: &Repository,
    c: &Catalog,
    entries: &[&Entry],
    to: &Path,
    stop: &AtomicBool,
    how: &How,
) -> Result<u64> {
    let content = |e: &Entry, out: &mut dyn Sink| cat(repo, c, e, out, stop);
    restore_into(entries, to, &content, stop, how)
}

/// A file's content, written to the sink.
pub type Content<'a> = dyn Fn(&Entry, &mut dyn Sink) -> Result<()> + 'a;

/// Where a file's content goes: a writer that may take a run of zeros
/// as a hole instead of being given the bytes.
pub trait Sink: Write {
    /// Takes `n` zero bytes as a hole: `Ok(false)` if it cannot (write
    /// them instead).
    fn skip_zeros(&mut self, _n: u64) -> std::io::Result<bool> {
        Ok(false)
    }
}

impl<W: Write> Sink for std::io::BufWriter<W> {}
impl Sink for Vec<u8> {}

/// Content passed over (an `agent-restore` link's): a hole costs nothing.
impl Sink for std::io::Sink {
    fn skip_zeros(&mut self, _n: u64) -> std::io::Result<bool> {
        Ok(true)
    }
}

/// A restored file: a hole is a seek (the length set at the end).
impl Sink for crate::util::SparseWriter<'_> {
    fn skip_zeros(&mut self, n: u64) -> std::io::Result<bool> {
        self.skip(n).map(|()| true)
    }
}

/// Restores `entries` under `to`, each file's bytes from `content`. Once
/// `stop` is set (checked before each entry; `content` checks it while it
/// copies) it ends with an [`ErrorKind::Interrupted`] error saying how
/// many entries it restored, leaving the subset the module describes.
pub fn restore_with(
    entries: &[&Entry],
    to: &Path,
    content: &Content,
    stop: &AtomicBool,
) -> Result<u64> {
    restore_into(entries, to, content, stop, &How::default())
}

/// What a restore does with an entry already under `--to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuses to start: restore into an empty directory.
    Refuse,
    /// Keeps a file or link that is what the entry says (kind, size,
    /// mtime, mode; a link's target), and refuses to start if one is not:
    /// a restore writes each file whole (temporary name, fsync, rename),
    /// so what a stopped run left is whole, and a rerun carries on.
    Skip,
}

/// How a restore treats entries already there, and where its notes go.
pub struct How<'a> {
    pub existing: Existing,
    /// A note for the person restoring (a hard link restored as a copy).
    pub say: &'a dyn Fn(&str),
}

impl Default for How<'_> {
    fn default() -> Self {
        How {
            existing: Existing::Refuse,
            say: &|n| tracing::warn!("{n}"),
        }
    }
}

/// [`restore_with`], with what to do about entries already there.
pub fn restore_into(
    entries: &[&Entry],
    to: &Path,
    content: &Content,
    stop: &AtomicBool,
    how: &How,
) -> Result<u64> {
    let existing = how.existing;
    let to = std::fs::canonicalize(to).ctx(|| format!("--to {}", to.display()))?;
    if !to.is_dir() {
        return Err(Error::invalid(format!(
            "--to {} is not a directory",
            to.display()
        )));
    }
    // Check every entry before writing anything.
    let entries = &check_tree(entries)?[..];
    let mut kept = vec![false; entries.len()];
    for (i, e) in entries.iter().enumerate() {
        let dst = dest(&to, &e.path);
        if let Some(p) = parent_in(&to, &dst) {
            check_no_link(&to, p)?;
        }
        if e.kind == EntryKind::Dir && is_link(&dst) {
            return Err(link_refused(&dst));
        }
        let Ok(there) = std::fs::symlink_metadata(&dst) else {
            continue;
        };
        if e.kind == EntryKind::Dir {
            continue;
        }
        kept[i] = existing == Existing::Skip && is_as_restored(e, &dst, &there);
        if !kept[i] {
            return Err(Error::new(
                crate::error::ErrorKind::AlreadyExists,
                match existing {
                    Existing::Refuse => format!(
                        "{} exists; restore into an empty directory (--to), or add --skip-existing to keep what a stopped restore wrote",
                        dst.display()
                    ),
                    Existing::Skip => format!(
                        "{} exists and is not what the backup has (kind, size, time or mode differ): move it away first",
                        dst.display()
                    ),
                },
            ));
        }
    }
    // A killed restore's temporary file (kill -9: no cleanup ran) in a
    // directory this one writes to: removed, said (explore9 L1).
    for gone in remove_dead_temps(&to, entries) {
        (how.say)(&format!(
            "removed {}, a file a killed restore was writing",
            gone.display()
        ));
    }
    let root = nix::unistd::Uid::effective().is_root();
    let (links, notes) = link_plan(entries);
    for n in &notes {
        (how.say)(n);
    }
    // Where each file was restored, for the links to it.
    let mut written: Vec<Option<PathBuf>> = vec![None; entries.len()];
    let mut dirs = vec![];
    let mut done = 0u64;
    // Set when stopped: the file being written then, if one was.
    let mut stopped: Option<Option<&str>> = None;
    let mut run = || -> Result<()> {
        for (i, e) in entries.iter().enumerate() {
            if stop.load(Ordering::SeqCst) {
                stopped = Some(None);
                break;
            }
            let dst = dest(&to, &e.path);
            if kept[i] {
                written[i] = Some(dst);
                done += 1;
                continue;
            }
            if let Some(p) = parent_in(&to, &dst) {
                check_no_link(&to, p)?;
                std::fs::create_dir_all(p).ctx(|| format!("create {}", p.display()))?;
            }
            match e.kind {
                EntryKind::Dir => {
                    if !dst.is_dir() {
                        std::fs::create_dir(&dst).ctx(|| format!("create {}", dst.display()))?;
                    }
                    dirs.push((dst, *e));
                }
                EntryKind::File => {
                    let first = links[i].and_then(|j| written[j].as_deref());
                    if let Some(first) = first {
                        match std::fs::hard_link(first, &dst) {
                        Ok(()) => {
                            crate::util::fsync_dir(dst.parent().expect("under --to"))?;
                            done += 1;
                            continue;
                        }
                        // Another filesystem (a mount below --to), or one
                        // without hard links: a copy.
                        Err(err) => (how.say)(&format!(
                            "{} was a hard link to {} in the guest; restored as a separate copy ({err})",
                            escape_controls(&e.path),
                            escape_controls(&entries[links[i].expect("linked")].path)
                        )),
                    }
                    }
                    match write_file(content, e, &dst, root) {
                        Err(err) if err.kind() == ErrorKind::Interrupted => {
                            stopped = Some(Some(&e.path));
                            break;
                        }
                        r => r?,
                    }
                    written[i] = Some(dst);
                }
                EntryKind::Symlink => {
                    let t = e.target.as_deref().unwrap_or_default();
                    std::os::unix::fs::symlink(t, &dst)
                        .ctx(|| format!("create link {}", dst.display()))?;
                    set_meta(&dst, e, root)?;
                }
            }
            done += 1;
        }
        Ok(())
    };
    let r = run();
    // Directories last, deepest first: their times change as they fill.
    // Also after a stop or a failure: what is there is whole, metadata
    // included, and a rerun with --skip-existing keeps it.
    let dirs_done = dirs
        .iter()
        .rev()
        .try_for_each(|(d, e)| set_meta(d, e, root));
    let carry_on = "each file restored is whole: add --skip-existing to carry on";
    // The run's own error first: a directory's metadata failing after it
    // is the lesser news (review26 L4).
    if let Err(e) = r {
        return Err(e.context(format!(
            "restored {done} of {} entries ({carry_on}), then",
            entries.len()
        )));
    }
    dirs_done?;
    match stopped {
        None => Ok(done),
        Some(at) => Err(Error::interrupted(format!(
            "restored {done} of {} entries{}; {carry_on}",
            entries.len(),
            at.map(|p| format!(" (stopped while writing {p}: removed, not kept half-written)"))
                .unwrap_or_default()
        ))),
    }
}

/// Whether `dst` (whose metadata is `there`) is what restoring `e` makes.
fn is_as_restored(e: &Entry, dst: &Path, there: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ft = there.file_type();
    match e.kind {
        EntryKind::File => {
            // A file system with coarser times (vfat: 2 s) keeps less of
            // the mtime; chmod by a user not in the file's group drops
            // the setgid bit (review26 M1).
            let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
            let skew = ns(there.mtime(), there.mtime_nsec()) - ns(e.mtime, e.mtime_nsec as i64);
            let mode = there.mode() & 0o7777;
            ft.is_file()
                && there.len() == e.size
                && skew.abs() < 2_000_000_000
                && (mode == e.mode || mode == e.mode & !0o2000)
        }
        EntryKind::Symlink => {
            ft.is_symlink()
                && std::fs::read_link(dst).ok().as_deref() == e.target.as_deref().map(Path::new)
        }
        EntryKind::Dir => ft.is_dir(),
    }
}

/// Which entries to restore as hard links: for each entry, the index of
/// the earlier one of the same inode it is a link to. Only for files the
/// backup recorded the inode of ([`Entry::inode`], since 2026-11-24;
/// older backups restore links as separate files) and whose size,
/// content and metadata are those of the first entry of that inode:
/// links whose file changed between their reads (their copies differ)
/// stay separate files, each with its own bytes, with a note (the second
/// value) saying so.
pub fn link_plan(entries: &[&Entry]) -> (Vec<Option<usize>>, Vec<String>) {
    let mut first: std::collections::HashMap<(u64, u64), usize> = Default::default();
    let mut links = vec![None; entries.len()];
    let mut notes = vec![];
    for (i, e) in entries.iter().enumerate() {
        let Some(ino) = e.inode.filter(|_| e.kind == EntryKind::File) else {
            continue;
        };
        let Some(&j) = first.get(&(ino.dev, ino.ino)) else {
            first.insert((ino.dev, ino.ino), i);
            continue;
        };
        let f = entries[j];
        let same = (
            f.size,
            &f.chunks,
            f.mode,
            f.uid,
            f.gid,
            f.mtime,
            f.mtime_nsec,
            f.inode,
        ) == (
            e.size,
            &e.chunks,
            e.mode,
            e.uid,
            e.gid,
            e.mtime,
            e.mtime_nsec,
            e.inode,
        );
        if same {
            links[i] = Some(j);
        } else {
            notes.push(format!(
                "{} and {} were hard links to one file in the guest, but it changed between their reads: restored as separate files, each as it was read",
                escape_controls(&f.path),
                escape_controls(&e.path)
            ));
        }
    }
    (links, notes)
}

fn dest(to: &Path, guest_path: &str) -> PathBuf {
    to.join(guest_path.trim_start_matches('/'))
}

/// The directory `dst` is created in; none for the guest's `/`, which is
/// `to` itself (its parent lies outside).
fn parent_in<'a>(to: &Path, dst: &'a Path) -> Option<&'a Path> {
    if dst == to {
        return None;
    }
    dst.parent()
}

/// No component of directory `p` below `to`, `p` included, may be a
/// symbolic link: checked again before each entry is written, since a link
/// an earlier entry created must not carry a later one out of `to`.
fn check_no_link(to: &Path, p: &Path) -> Result<()> {
    let rel = p
        .strip_prefix(to)
        .map_err(|_| Error::invalid(format!("{} is outside {}", p.display(), to.display())))?;
    let mut cur = to.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        if is_link(&cur) {
            return Err(link_refused(&cur));
        }
    }
    Ok(())
}

fn is_link(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

fn link_refused(p: &Path) -> Error {
    Error::not_permitted(format!(
        "{} is a symbolic link: refusing to restore through it",
        p.display()
    ))
}

/// `entries` without those identical to an earlier one: agents before
/// they dropped overlapping `--paths` (`/srv /srv/app`) sent what two of
/// them cover twice. A path twice with different metadata or content
/// stays twice (`files ls` shows both; a restore refuses it).
pub fn distinct<'a>(entries: &[&'a Entry]) -> Vec<&'a Entry> {
    let mut seen: std::collections::HashMap<&str, Vec<&Entry>> =
        std::collections::HashMap::with_capacity(entries.len());
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let same = seen.entry(e.path.as_str()).or_default();
        if !same.contains(e) {
            same.push(*e);
            out.push(*e);
        }
    }
    out
}

/// The entries must form a tree a restore can create: each path once
/// (identical repeats are dropped, see [`distinct`]), and nothing below a
/// symbolic link (a catalog comes from the guest, and a link it restores
/// first would carry a later entry anywhere on the host). The entries, each
/// path once.
fn check_tree<'a>(entries: &[&'a Entry]) -> Result<Vec<&'a Entry>> {
    let entries = distinct(entries);
    let mut kinds = std::collections::HashMap::with_capacity(entries.len());
    for e in &entries {
        if kinds.insert(e.path.as_str(), e.kind).is_some() {
            return Err(Error::corrupt(format!(
                "{} is in the file backup twice, with different metadata or content (changed between the walks of overlapping --paths?): `files ls` shows both; restore around it",
                escape_controls(&e.path)
            )));
        }
    }
    for e in &entries {
        let mut up = Path::new(&e.path).parent();
        while let Some(a) = up {
            if kinds.get(a.to_str().unwrap_or_default()) == Some(&EntryKind::Symlink) {
                return Err(Error::not_permitted(format!(
                    "{} is below {}, a symbolic link in the same backup: refusing to restore through it",
                    e.path,
                    a.display()
                )));
            }
            up = a.parent();
        }
    }
    Ok(entries)
}

/// The temporary files (`.recoverfs-tmp.PID`, see [`write_file`]) of
/// restores whose process is gone, in the directories under `to` that
/// `entries` write files to: removed; the paths removed. A PID that is in
/// use again (another process now) keeps its file: never a live one's.
fn remove_dead_temps(to: &Path, entries: &[&Entry]) -> Vec<PathBuf> {
    let dirs: std::collections::BTreeSet<PathBuf> = (entries.iter())
        .filter(|e| e.kind != EntryKind::Dir)
        .filter_map(|e| dest(to, &e.path).parent().map(Path::to_path_buf))
        .collect();
    let mut removed = vec![];
    for dir in dirs {
        let Ok(list) = std::fs::read_dir(&dir) else {
            continue;
        };
        for f in list.flatten() {
            let name = f.file_name();
            let pid = (name.to_str())
                .and_then(|n| n.strip_prefix(".recoverfs-tmp."))
                .and_then(|p| p.parse::<i32>().ok());
            let Some(pid) = pid.filter(|&p| p > 0) else {
                continue;
            };
            let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                == Err(nix::errno::Errno::ESRCH);
            if gone && std::fs::remove_file(f.path()).is_ok() {
                removed.push(f.path());
            }
        }
    }
    removed
}

/// Temp file, content, fsync, rename (never over an existing file), fsync
/// the directory.
fn write_file(content: &Content, e: &Entry, dst: &Path, root: bool) -> Result<()> {
    let dir = dst.parent().expect("under --to");
    // Not derived from the file's name: a name near 255 bytes plus a
    // suffix would be too long. One file is written at a time, and
    // create_new never reuses a name that exists.
    let tmp = dir.join(format!(".recoverfs-tmp.{}", std::process::id()));
    let r = (|| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .ctx(|| format!("create {}", tmp.display()))?;
        // All-zero stretches stay holes: a sparse file restores sparse.
        let mut w = crate::util::SparseWriter::new(&f);
        content(e, &mut w)?;
        w.finish().ctx(|| format!("write {}", tmp.display()))?;
        // Its metadata before it appears: a file under its name is whole
        // with its mode, owner and time, which `--skip-existing` checks
        // (review26 M1: a kill between the link and the metadata left a
        // whole file the rerun refused).
        set_meta(&tmp, e, root)?;
        f.sync_all().ctx(|| format!("fsync {}", tmp.display()))?;
        std::fs::hard_link(&tmp, dst).ctx(|| format!("create {}", dst.display()))?;
        crate::util::fsync_dir(dir)
    })();
    let _ = std::fs::remove_file(&tmp);
    r
}

/// Mode, owner (as root) and modification time, not following links.
pub fn set_meta(p: &Path, e: &Entry, root: bool) -> Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    if root {
        std::os::unix::fs::lchown(p, Some(e.uid), Some(e.gid))
            .ctx(|| format!("chown {}", p.display()))?;
    }
    if e.kind != EntryKind::Symlink {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(e.mode))
            .ctx(|| format!("chmod {}", p.display()))?;
    }
    let mtime = TimeSpec::new(e.mtime, e.mtime_nsec as i64);
    utimensat(
        None,
        p,
        &TimeSpec::UTIME_OMIT,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|err| Error::io(format!("set times of {}", p.display()), err.into()))
}

/// An entry for `path` from its metadata (not following a link).
pub fn entry_of(path: &Path, m: &std::fs::Metadata) -> Result<Option<Entry>> {
    let ft = m.file_type();
    let (kind, target) = if ft.is_file() {
        (EntryKind::File, None)
    } else if ft.is_dir() {
        (EntryKind::Dir, None)
    } else if ft.is_symlink() {
        let t = std::fs::read_link(path).ctx(|| format!("read link {}", path.display()))?;
        (EntryKind::Symlink, Some(t.to_string_lossy().into_owned()))
    } else {
        return Ok(None);
    };
    let p = path
        .to_str()
        .ok_or_else(|| Error::invalid(format!("{} is not UTF-8", path.display())))?;
    Ok(Some(Entry {
        path: p.to_string(),
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec() as u32,
        size: if kind == EntryKind::File { m.size() } else { 0 },
        target,
        chunks: vec![],
        inode: (kind == EntryKind::File && m.nlink() > 1).then_some(Inode {
            dev: m.dev(),
            ino: m.ino(),
            nlink: m.nlink(),
        }),
    }))
}

/// One `ls -l`-like line; control characters in names are escaped.
pub fn ls_line(e: &Entry) -> String {
    let kind = match e.kind {
        EntryKind::File => '-',
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
    };
    let mut perms = String::new();
    // setuid, setgid and sticky in the x places, as ls: s/t over x, S/T
    // without it.
    for (shift, special, set) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
        let b = (e.mode >> shift) & 7;
        perms.push(if b & 4 != 0 { 'r' } else { '-' });
        perms.push(if b & 2 != 0 { 'w' } else { '-' });
        perms.push(match (b & 1 != 0, e.mode & special != 0) {
            (true, false) => 'x',
            (false, false) => '-',
            (true, true) => set,
            (false, true) => set.to_ascii_uppercase(),
        });
    }
    let target = e
        .target
        .as_deref()
        .map(|t| format!(" -> {}", escape_controls(t)))
        .unwrap_or_default();
    format!(
        "{kind}{perms} {:>5} {:>5} {:>12} {} {}{target}",
        e.uid,
        e.gid,
        e.size,
        crate::util::rfc3339(e.mtime.max(0) as u64),
        escape_controls(&e.path)
    )
}

// `pub(crate)`: the agent's tests restore its sparse catalog too.
#[cfg(test)]
pub(crate) mod tests;
