//! The consistent copy the agent takes while the application is quiesced,
//! so that it can resume the application before streaming (issue 15).
//!
//! Choice: a **reflink copy where the filesystem supports it, else a plain
//! copy**, into a private directory (`.recoverfs-agent-copy.<pid>`, mode
//! 0700) at the root of the filesystem that holds each selected path.
//! Filesystem snapshots were not chosen: ext4 (the common guest root) has
//! none, LVM snapshots need free extents and device-mapper the guest may
//! not have, and btrfs/xfs already give reflinks, which cost no data
//! space and take milliseconds. The same filesystem is what makes a
//! reflink possible; a plain copy there also stays off tmpfs (memory).
//!
//! Bound: before the `pre` hooks run, the trees are walked and sized and
//! each copy directory is created; one file is reflinked as a probe. If
//! reflinks work, no data space is needed; otherwise the filesystem must
//! have the space the files take free (allocated, not apparent, size: a
//! plain copy keeps a sparse file's holes), with 1/16 to spare. If it has not,
//! the backup fails there, clearly and before anything is quiesced —
//! unless the host asked (`--allow-quiesced-stream`) to stream while the
//! application stays quiesced instead, which is then said in the log.
//!
//! While quiesced, each tree is walked once: every entry's metadata (the
//! catalog's, with its original path) is taken then, and every regular
//! file is copied (exactly its size at that moment). The copy directories
//! are removed when [`Staged`] drops: after the stream, after a failure,
//! and on a panic; only a killed agent leaves one, which the next run
//! removes ([`remove_stale`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::walk::Found;
use crate::error::{Error, IoContext, Result};
use crate::repo::catalog::Entry;

const PREFIX: &str = ".recoverfs-agent-copy.";

/// The copy directories of one backup, one per filesystem; removed on drop.
pub struct Plan {
    /// `(selected path, its copy directory)`.
    dirs: Vec<(PathBuf, PathBuf)>,
    owned: Vec<PathBuf>,
    /// Whether every copy directory reflinks.
    pub reflink: bool,
    pub bytes: u64,
}

impl Drop for Plan {
    fn drop(&mut self) {
        for d in &self.owned {
            if let Err(e) = std::fs::remove_dir_all(d) {
                tracing::warn!(dir = %d.display(), error = %e, "remove the agent's copy");
            }
        }
    }
}

/// What [`Plan::copy`] took: entries in stream order, each regular file
/// with the copy to stream its contents from.
pub struct Staged {
    pub entries: Vec<(Entry, Option<PathBuf>)>,
    /// Entries passed over, and why: sockets, devices and FIFOs; files
    /// replaced between their stat and their open.
    pub skipped: Vec<(String, &'static str)>,
}

/// Sizes the trees, makes the copy directories and checks the space,
/// before anything is quiesced.
pub fn plan(paths: &[String]) -> std::result::Result<Plan, PlanError> {
    let mut plan = Plan {
        dirs: vec![],
        owned: vec![],
        reflink: true,
        bytes: 0,
    };
    // Per filesystem (st_dev): its copy directory and the bytes it takes.
    let mut per_fs: Vec<(u64, PathBuf, u64, Option<PathBuf>)> = vec![];
    for p in paths {
        let p = Path::new(p);
        let m = std::fs::symlink_metadata(p).ctx(|| format!("stat {}", p.display()))?;
        let (bytes, first) = size_tree(p)?;
        plan.bytes += bytes;
        let i = match per_fs.iter().position(|f| f.0 == m.dev()) {
            Some(i) => i,
            None => {
                let root = mount_root(p, m.dev())?;
                remove_stale(&root);
                let d = root.join(format!("{PREFIX}{}", std::process::id()));
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&d)
                    .ctx(|| format!("create the copy directory {}", d.display()))?;
                plan.owned.push(d.clone());
                per_fs.push((m.dev(), d, 0, None));
                per_fs.len() - 1
            }
        };
        per_fs[i].2 += bytes;
        if per_fs[i].3.is_none() {
            per_fs[i].3 = first;
        }
        plan.dirs.push((p.to_path_buf(), per_fs[i].1.clone()));
    }
    for (_, dir, bytes, first) in &per_fs {
        if *bytes == 0 {
            continue;
        }
        if first.as_deref().is_some_and(|f| probe_reflink(f, dir)) {
            continue;
        }
        plan.reflink = false;
        let st = nix::sys::statvfs::statvfs(dir)
            .map_err(|e| Error::io(format!("statvfs {}", dir.display()), e.into()))?;
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        let need = bytes + bytes / 16;
        if free < need {
            return Err(PlanError::NoSpace(Error::new(
                crate::error::ErrorKind::NoSpace,
                format!(
                    "not enough free space in the guest for a consistent copy in {}: it needs {} (the space the selected files take and 1/16 to spare; this filesystem has no reflinks), {} is free; nothing was quiesced. Free space, or pass --allow-quiesced-stream to stream while the application stays quiesced",
                    dir.display(),
                    crate::util::human_bytes(need),
                    crate::util::human_bytes(free)
                ),
            )));
        }
    }
    Ok(plan)
}

/// Not enough space for the copy is the one error the host may turn into
/// streaming while quiesced.
pub enum PlanError {
    NoSpace(Error),
    Other(Error),
}

impl From<Error> for PlanError {
    fn from(e: Error) -> Self {
        PlanError::Other(e)
    }
}

impl Plan {
    /// Walks and copies every selected tree (the application quiesced).
    pub fn copy(&self) -> Result<Staged> {
        let mut s = Staged {
            entries: vec![],
            skipped: vec![],
        };
        let mut n = 0u64;
        for (p, dir) in &self.dirs {
            copy_tree(p, dir, &mut n, &mut s)?;
        }
        Ok(s)
    }
}

/// Bytes the regular files under `p` take (allocated: a sparse file's
/// copy keeps its holes) and the first such file.
fn size_tree(p: &Path) -> Result<(u64, Option<PathBuf>)> {
    let m = std::fs::symlink_metadata(p).ctx(|| format!("stat {}", p.display()))?;
    if m.is_file() {
        return Ok((
            m.blocks().saturating_mul(512),
            (m.size() > 0).then(|| p.to_path_buf()),
        ));
    }
    if !m.is_dir() {
        return Ok((0, None));
    }
    let (mut total, mut first) = (0, None);
    for d in std::fs::read_dir(p).ctx(|| format!("list {}", p.display()))? {
        let d = d.ctx(|| format!("list {}", p.display()))?;
        let (b, f) = size_tree(&d.path())?;
        total += b;
        first = first.or(f);
    }
    Ok((total, first))
}

/// The root of the filesystem (device `dev`) that holds `p`.
fn mount_root(p: &Path, dev: u64) -> Result<PathBuf> {
    let mut root = std::fs::canonicalize(p).ctx(|| format!("resolve {}", p.display()))?;
    if !root.is_dir() {
        root.pop();
    }
    while let Some(up) = root.parent() {
        let m = std::fs::metadata(up).ctx(|| format!("stat {}", up.display()))?;
        if m.dev() != dev {
            break;
        }
        root = up.to_path_buf();
    }
    Ok(root)
}

/// Removes copy directories of agents that no longer run (killed).
pub fn remove_stale(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for d in rd.flatten() {
        let name = d.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(d.path());
        }
    }
}

/// Whether `dir` can hold a reflink of `file`.
fn probe_reflink(file: &Path, dir: &Path) -> bool {
    let probe = dir.join("probe");
    let ok = File::open(file)
        .and_then(|src| {
            let dst = File::create(&probe)?;
            clone(&src, &dst)
        })
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// FICLONE: `dst` shares `src`'s extents (copy-on-write).
fn clone(src: &File, dst: &File) -> std::io::Result<()> {
    // SAFETY: both descriptors are open for the call; FICLONE takes the
    // source descriptor as its argument and touches no memory of ours.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn copy_tree(p: &Path, dir: &Path, n: &mut u64, s: &mut Staged) -> Result<()> {
    super::walk::walk(p, Some(dir), &mut |found| {
        match found {
            Found::Skipped(p, why) => s.skipped.push((p, why)),
            Found::Entry(e, Some(src)) => {
                *n += 1;
                let dst = dir.join(n.to_string());
                copy_file(src, Path::new(&e.path), &dst, e.size)?;
                s.entries.push((e, Some(dst)));
            }
            Found::Entry(e, None) => s.entries.push((e, None)),
        }
        Ok(())
    })
}

/// A reflink of `s` (opened from `src`), else its first `size` bytes copied
/// with its holes left holes (a file that shrank meanwhile is copied as
/// long as it is, so that streaming the copy warns about it).
fn copy_file(s: File, src: &Path, dst: &Path, size: u64) -> Result<()> {
    let d = File::create(dst).ctx(|| format!("create {}", dst.display()))?;
    if clone(&s, &d).is_ok() {
        return Ok(());
    }
    copy_sparse(&s, &d, size).ctx(|| {
        format!(
            "copy {} to {} (the guest's free space?)",
            src.display(),
            dst.display()
        )
    })
}

/// The data of `s` up to `size` into the empty `d`, holes and all-zero
/// pieces left holes.
fn copy_sparse(s: &File, d: &File, size: u64) -> std::io::Result<()> {
    use super::NextData;
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let (mut pos, mut len) = (0u64, size);
    'file: while pos < size {
        let (data, end) = match super::next_data(s, pos, size) {
            NextData::Data(a, b) => (a, b),
            NextData::None => {
                len = s.metadata()?.len().clamp(pos, size);
                break;
            }
            NextData::Unsupported => (pos, size),
        };
        pos = data;
        while pos < end {
            let want = (end - pos).min(buf.len() as u64) as usize;
            let n = s.read_at(&mut buf[..want], pos)?;
            if n == 0 {
                len = pos;
                break 'file;
            }
            if buf[..n].iter().any(|&b| b != 0) {
                d.write_all_at(&buf[..n], pos)?;
            }
            pos += n as u64;
        }
    }
    d.set_len(len)
}

#[cfg(test)]
mod tests;
