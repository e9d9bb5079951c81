//! Files from a **disk backup**, without booting the VM: a throwaway
//! recovery (temporary staging and FUSE mount, as `verify-boot` makes,
//! with profiles and the default profile off, so only what is read is
//! fetched), the disk file attached to a loop device per partition, the
//! filesystem holding the path mounted read-only, then everything undone
//! in reverse, also when something fails or a signal stops the command
//! (its stop flag is checked between the steps of [`mount`] and of
//! [`walk`]).
//!
//! A crash-consistent backup (a live one, or one whose guest agent did not
//! freeze) may hold its newest metadata only in the filesystem's journal:
//! mounted without replaying it (ext4 `noload`), files written before the
//! backup would be missing or stale (explore6 H1). So the loop device is
//! writable and the mount read-only *with* replay: ext4, xfs and btrfs
//! replay their journal on a read-only mount of a writable device, and the
//! replay writes go to the throwaway session's scratch staging, never to
//! the backup. A journal that does not replay is mounted without it, with
//! a warning that the files are then as of the last checkpoint.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::daemon::{check_mount_point, MountOptions, MountedDatastore};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::repo::Repository;
use crate::staging::StagingDir;

use super::Sink;

/// A disk backup's filesystem, mounted read-only at [`Mounted::root`].
pub struct Mounted {
    pub root: PathBuf,
    /// The partition (or whole disk) mounted, e.g. `/dev/loop3p2`.
    pub device: String,
    pub fstype: String,
    pub backup: String,
    /// What the session fetched from the repository, and the disk's size.
    datastore: Option<MountedDatastore>,
    vm: String,
    loop_dev: Option<String>,
    mounted: bool,
    _scratch: tempfile::TempDir,
}

impl Mounted {
    /// Bytes fetched from the repository so far, and the disk's size.
    pub fn fetched(&self) -> (u64, u64) {
        let Some(s) = self.datastore.as_ref().and_then(|d| d.ds.session(&self.vm)) else {
            return (0, 0);
        };
        let st: Vec<_> = s.disks.iter().map(|d| d.status()).collect();
        (
            st.iter().map(|s| s.fetched_bytes).sum(),
            st.iter().map(|s| s.size).sum(),
        )
    }

    /// Unmounts, detaches and releases; the first error.
    pub fn close(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let mut first: Option<Error> = None;
        if self.mounted {
            match run("umount", &[self.root.to_str().unwrap_or_default()]) {
                Ok(_) => self.mounted = false,
                Err(e) => {
                    let _ = run("umount", &["-l", self.root.to_str().unwrap_or_default()]);
                    self.mounted = false;
                    first.get_or_insert(e);
                }
            }
        }
        if let Some(l) = self.loop_dev.take() {
            if let Err(e) = run("losetup", &["-d", &l]) {
                first.get_or_insert(e);
            }
        }
        if let Some(d) = self.datastore.take() {
            if let Some(s) = d.ds.session(&self.vm) {
                s.discard_profile();
            }
            // A detached loop device closes its handle in the background.
            if d.ds.session(&self.vm).is_some() {
                if let Err(e) = d.ds.release_when_closed(&self.vm, true, RELEASE_WAIT) {
                    first.get_or_insert(e.context(format!(
                        "release the scratch recovery of VM {} (its pin under pins/{}/ \
                         in the repository may be left)",
                        self.vm, self.vm
                    )));
                }
            }
            if let Err(e) = d.shutdown() {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// How long the scratch recovery waits for the loop device's handle to close.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

/// Mounts the filesystem of disk `disk` of backup `backup` that holds
/// `path` (or partition `partition`: 0 is the whole disk). Once `stop` is
/// set it undoes what it did and ends with an
/// [`ErrorKind::Interrupted`] error.
pub fn mount(
    repo: &str,
    vm: &str,
    backup: &str,
    disk: usize,
    partition: Option<u32>,
    path: &str,
    stop: &AtomicBool,
) -> Result<Mounted> {
    crate::util::validate_name("VM name", vm)?;
    let repo = Repository::open(repo)?;
    let manifest = repo.manifest(vm, backup)?;
    if disk >= manifest.disks.len() {
        return Err(Error::invalid(format!(
            "backup {backup} of VM {vm} has {} disk(s); there is no disk {disk}",
            manifest.disks.len()
        )));
    }
    // What killed runs left (mounts, loop devices, staging) goes first.
    crate::boot::remove_stale_scratch(&std::env::temp_dir());
    let scratch = crate::boot::scratch_dir("files")?;
    let fuse = scratch.path().join("fuse");
    let root = scratch.path().join("fs");
    for d in [&fuse, &root] {
        std::fs::create_dir(d).ctx(|| format!("create {}", d.display()))?;
    }
    let fuse = check_mount_point(&fuse)?;
    let staging = StagingDir::open(&scratch.path().join("staging"), repo.id(), &repo.location())?;
    let mut opts = MountOptions {
        throwaway: true,
        ..MountOptions::default()
    };
    // Fetch only what the filesystem reads.
    opts.prefetch.use_profile = false;
    opts.prefetch.default_profile = false;
    let ds = MountedDatastore::start(
        repo.clone(),
        crate::staging::StagingSet::single(staging),
        &fuse,
        &opts,
    )?;
    let mut m = Mounted {
        root,
        device: String::new(),
        fstype: String::new(),
        backup: backup.to_string(),
        datastore: Some(ds),
        vm: vm.to_string(),
        loop_dev: None,
        mounted: false,
        _scratch: scratch,
    };
    let info = m
        .datastore
        .as_ref()
        .expect("started")
        .ds
        .recover(vm, Some(backup))?;
    let file = info.disks[disk].to_str().unwrap_or_default().to_string();
    let mut tried = vec![];
    let stopped = || {
        stop.load(Ordering::SeqCst)
            .then(|| Error::interrupted("stopped before the filesystem was mounted"))
    };
    for (num, offset, size) in partitions(&file, partition)? {
        if let Some(e) = stopped() {
            return Err(e);
        }
        let dev = run(
            "losetup",
            &[
                "--find",
                "--show",
                "--offset",
                &offset.to_string(),
                "--sizelimit",
                &size.to_string(),
                &file,
            ],
        )?
        .trim()
        .to_string();
        m.loop_dev = Some(dev.clone());
        let name = if num == 0 {
            "the whole disk".to_string()
        } else {
            format!("partition {num}")
        };
        let Some(fstype) = fs_type(&dev) else {
            tried.push(format!("{name} (no filesystem)"));
            run("losetup", &["-d", &dev])?;
            m.loop_dev = None;
            continue;
        };
        let root = m.root.to_str().unwrap_or_default().to_string();
        if mount_replaying(&fstype, &dev, &root, &name) {
            m.mounted = true;
            if partition.is_some()
                || in_tree(&m.root, path).is_ok_and(|p| p.symlink_metadata().is_ok())
            {
                m.device = format!("{name} of disk{disk}");
                m.fstype = fstype;
                return Ok(m);
            }
            run("umount", &[&root])?;
            m.mounted = false;
            tried.push(format!("{name} ({fstype})"));
        } else {
            tried.push(format!("{name} ({fstype}: does not mount)"));
        }
        run("losetup", &["-d", &dev])?;
        m.loop_dev = None;
    }
    if let Some(e) = stopped() {
        return Err(e);
    }
    Err(Error::not_found(format!(
        "{path} is on no filesystem of disk{disk} of backup {backup} of VM {vm} (looked in: {})",
        tried.join(", ")
    )))
}

/// Mounts `dev` read-only at `root`, replaying its journal (into the
/// throwaway session's staging); if that fails, without the replay, with
/// a warning (the files are then as of the last checkpoint). Whether it
/// is mounted.
fn mount_replaying(fstype: &str, dev: &str, root: &str, name: &str) -> bool {
    if run("mount", &["-t", fstype, "-o", "ro", dev, root]).is_ok() {
        return true;
    }
    let without = match fstype {
        "ext3" | "ext4" => "ro,noload",
        "xfs" => "ro,norecovery",
        "btrfs" => "ro,rescue=nologreplay",
        _ => return false,
    };
    let mounted = run("mount", &["-t", fstype, "-o", without, dev, root]).is_ok();
    if mounted {
        tracing::warn!("{name} ({fstype}) did not mount with its journal replayed: mounted without the replay, so files changed shortly before the backup may be missing or older");
    }
    mounted
}

/// Partitions of a disk image as (number, byte offset, byte size), from
/// its partition table (MBR or GPT, read by `sfdisk`); the whole disk (0)
/// if it has none; or only the one asked for.
fn partitions(file: &str, which: Option<u32>) -> Result<Vec<(u32, u64, u64)>> {
    let whole = || -> Result<u64> {
        Ok(std::fs::metadata(file)
            .ctx(|| format!("stat {file}"))?
            .len())
    };
    if which == Some(0) {
        return Ok(vec![(0, 0, whole()?)]);
    }
    let table: Option<serde_json::Value> = Command::new("sfdisk")
        .args(["--json", file])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice(&o.stdout).ok());
    let Some(t) = table else {
        return match which {
            None => Ok(vec![(0, 0, whole()?)]),
            Some(n) => Err(Error::not_found(format!(
                "the disk has no partition table, so no partition {n}"
            ))),
        };
    };
    let sector = t["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    let mut out = vec![];
    for p in t["partitiontable"]["partitions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let node = p["node"].as_str().unwrap_or_default();
        let num: u32 = node
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(out.len() as u32 + 1);
        let (start, size) = (
            p["start"].as_u64().unwrap_or(0),
            p["size"].as_u64().unwrap_or(0),
        );
        if size > 0 && which.is_none_or(|w| w == num) {
            out.push((num, start * sector, size * sector));
        }
    }
    if out.is_empty() {
        if let Some(n) = which {
            return Err(Error::not_found(format!("the disk has no partition {n}")));
        }
    }
    Ok(out)
}

fn fs_type(dev: &str) -> Option<String> {
    // -p: probe the device itself (the cache may remember an earlier
    // partition that used the same loop device).
    run("blkid", &["-p", "-o", "value", "-s", "TYPE", dev])
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Runs a system tool; its stdout, or an error with its stderr.
fn run(tool: &str, args: &[&str]) -> Result<String> {
    let o = Command::new(tool)
        .args(args)
        .output()
        .ctx(|| format!("run {tool} (util-linux)"))?;
    if !o.status.success() {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "{tool} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Entries at or under `path` of a mounted tree, as a catalog has them
/// (guest paths), in name order, not following links; an
/// [`ErrorKind::Interrupted`] error once `stop` is set.
pub fn walk(
    root: &Path,
    path: &str,
    stop: &AtomicBool,
) -> Result<Vec<crate::repo::catalog::Entry>> {
    let mut out = vec![];
    walk_into(root, &in_tree(root, path)?, &mut out, stop)?;
    Ok(out)
}

/// Guest path `path` in the tree mounted at `root`. The kernel would
/// resolve a link in the guest's tree against the host's root (an
/// absolute `/var/run -> /run`, a hostile `/srv -> /etc`), so no
/// component but the last may be a link: the host's files must never pass
/// for the backup's. A trailing `/` is dropped (it would follow a link).
pub fn in_tree(root: &Path, path: &str) -> Result<PathBuf> {
    let path = match path.trim_end_matches('/') {
        "" => "/",
        p => p,
    };
    if path == "/" {
        return Ok(root.to_path_buf());
    }
    crate::repo::catalog::check_path(path)?;
    let names: Vec<&str> = path.split('/').skip(1).collect();
    let mut p = root.to_path_buf();
    for (i, name) in names.iter().enumerate() {
        p.push(name);
        if i + 1 == names.len() {
            break;
        }
        let at = format!("/{}", names[..=i].join("/"));
        let m = std::fs::symlink_metadata(&p).ctx(|| format!("stat {at} in the backup"))?;
        if m.file_type().is_symlink() {
            let to = std::fs::read_link(&p).unwrap_or_default();
            return Err(Error::invalid(format!(
                "{at} is a link in the guest (to {:?}): ask for the path it points to",
                to
            )));
        }
        if !m.is_dir() {
            return Err(Error::not_found(format!(
                "{at} is not a directory in the backup"
            )));
        }
    }
    Ok(p)
}

/// A file's bytes from the tree mounted at `root` into `out`, holes as
/// holes: only the data extents the filesystem reports
/// (`SEEK_DATA`/`SEEK_HOLE`, see [`crate::repo::sparse::data_extents`])
/// are read, 1 MiB at a time, so a 1 TiB sparse file with 1 MiB written
/// costs 1 MiB of reads; each hole is given to `out` as one
/// [`Sink::skip_zeros`] (a restored file keeps it as a hole), or written
/// as zeros where `out` cannot skip (`files cat`). A filesystem that
/// cannot tell holes is read whole, as before. A stop ends it within one
/// read; an [`ErrorKind::Interrupted`] error says how far it got.
pub fn copy_file(
    root: &Path,
    e: &crate::repo::catalog::Entry,
    out: &mut dyn Sink,
    stop: &AtomicBool,
) -> Result<()> {
    if e.kind != crate::repo::catalog::EntryKind::File {
        return Err(Error::invalid(format!("{} is not a regular file", e.path)));
    }
    let p = in_tree(root, &e.path)?;
    // Not following a link, should the entry have changed into one.
    let f = std::os::unix::fs::OpenOptionsExt::custom_flags(
        std::fs::OpenOptions::new().read(true),
        libc::O_NOFOLLOW,
    )
    .open(&p)
    .map_err(|err| Error::io(format!("open {}", e.path), err))?;
    copy_data(&f, e, out, stop).map(|_| ())
}

/// [`copy_file`] of the open file `f`; the bytes it read (holes are not).
pub(crate) fn copy_data(
    f: &std::fs::File,
    e: &crate::repo::catalog::Entry,
    out: &mut dyn Sink,
    stop: &AtomicBool,
) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let size = f
        .metadata()
        .map_err(|err| Error::io(format!("stat {}", e.path), err))?
        .len();
    let extents = crate::repo::sparse::data_extents(f, size)
        .map_err(|err| err.context(format!("read {}", e.path)))?;
    let write = |out: &mut dyn Sink, b: &[u8]| {
        out.write_all(b)
            .map_err(|err| Error::io(format!("copy {}", e.path), err))
    };
    let mut buf = vec![0u8; 1 << 20];
    let (mut pos, mut read) = (0u64, 0u64);
    // Zeros from `pos` up to `to`: a hole where `out` takes one.
    let hole = |out: &mut dyn Sink, pos: &mut u64, to: u64| -> Result<()> {
        if *pos >= to {
            return Ok(());
        }
        let skipped = out
            .skip_zeros(to - *pos)
            .map_err(|err| Error::io(format!("copy {}", e.path), err))?;
        if skipped {
            *pos = to;
            return Ok(());
        }
        let zeros = vec![0u8; 1 << 20];
        while *pos < to {
            if stop.load(Ordering::SeqCst) {
                return Err(super::copied_part(*pos, e));
            }
            let n = (to - *pos).min(zeros.len() as u64) as usize;
            write(out, &zeros[..n])?;
            *pos += n as u64;
        }
        Ok(())
    };
    for &(start, end) in &extents {
        hole(out, &mut pos, start)?;
        while pos < end {
            if stop.load(Ordering::SeqCst) {
                return Err(super::copied_part(pos, e));
            }
            let want = (end - pos).min(buf.len() as u64) as usize;
            let n = match f.read_at(&mut buf[..want], pos) {
                // Short of the size it had: never a restored file that
                // silently lacks its end (review29 L3).
                Ok(0) => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!(
                            "read {}: it ends at {pos} bytes, short of the {size} it had when the copy began",
                            e.path
                        ),
                    ))
                }
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(Error::io(format!("read {}", e.path), err)),
            };
            write(out, &buf[..n])?;
            pos += n as u64;
            read += n as u64;
        }
    }
    // A hole to the end of the file (or a file of holes only).
    hole(out, &mut pos, size)?;
    Ok(read)
}

fn walk_into(
    root: &Path,
    p: &Path,
    out: &mut Vec<crate::repo::catalog::Entry>,
    stop: &AtomicBool,
) -> Result<()> {
    if stop.load(Ordering::SeqCst) {
        return Err(Error::interrupted(format!(
            "stopped listing the backup's files after {} entries",
            out.len()
        )));
    }
    let m = std::fs::symlink_metadata(p).ctx(|| format!("stat {}", p.display()))?;
    let Some(mut e) = super::entry_of(p, &m)? else {
        return Ok(());
    };
    let rel = p.strip_prefix(root).unwrap_or(p);
    e.path = format!("/{}", rel.to_string_lossy());
    if e.path.len() > 1 {
        e.path = e.path.trim_end_matches('/').to_string();
    }
    let dir = e.kind == crate::repo::catalog::EntryKind::Dir;
    out.push(e);
    if dir {
        let mut names: Vec<PathBuf> = std::fs::read_dir(p)
            .ctx(|| format!("list {}", p.display()))?
            .filter_map(|d| d.ok().map(|d| d.path()))
            .collect();
        names.sort();
        for n in names {
            walk_into(root, &n, out, stop)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::catalog::EntryKind;

    #[test]
    fn files_from_a_disk_backup_never_follow_a_guest_link_out_of_its_filesystem() {
        let d = tempfile::tempdir().unwrap();
        let (root, outside) = (d.path().join("fs"), d.path().join("outside"));
        std::fs::create_dir_all(root.join("var")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"host file").unwrap();
        // As Debian has /var/run -> /run, absolute: the host's, if followed.
        std::os::unix::fs::symlink(&outside, root.join("var/run")).unwrap();
        let go = AtomicBool::new(false);
        for asked in ["/var/run/", "/var/run"] {
            let all = walk(&root, asked, &go).unwrap();
            let found: Vec<_> = all.iter().map(|e| (e.path.as_str(), e.kind)).collect();
            assert_eq!(found, [("/var/run", EntryKind::Symlink)], "{asked}");
        }
        let e = walk(&root, "/var/run/secret", &go).unwrap_err().to_string();
        assert!(e.contains("/var/run is a link in the guest"), "{e}");
        assert!(walk(&root, "/var/../../outside", &go).is_err());
        let all = walk(&root, "/", &go).unwrap();
        assert!(all.iter().all(|e| !e.path.contains("secret")), "{all:?}");
    }

    /// Counts what crosses `write` (bytes the copy read and passed on)
    /// on the way to a restored file.
    struct Counting<'a> {
        inner: crate::util::SparseWriter<'a>,
        written: u64,
    }

    impl std::io::Write for Counting<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(b)?;
            self.written += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }

    impl Sink for Counting<'_> {
        fn skip_zeros(&mut self, n: u64) -> std::io::Result<bool> {
            self.inner.skip_zeros(n)
        }
    }

    fn file_entry(path: &str, size: u64) -> crate::repo::catalog::Entry {
        let m = std::fs::metadata("/").unwrap();
        let mut e = crate::files::entry_of(Path::new("/"), &m).unwrap().unwrap();
        (e.path, e.kind, e.size) = (path.into(), EntryKind::File, size);
        e
    }

    /// fixstatus 3: a sparse file of a disk backup was read whole, holes
    /// and all (1 TiB of zeros for a 1 TiB sparse file).
    #[test]
    fn a_sparse_file_is_copied_reading_only_its_data_and_restores_sparse_and_equal() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("fs");
        std::fs::create_dir(&root).unwrap();
        let src = root.join("big");
        let f = std::fs::File::create(&src).unwrap();
        // 1 GiB, 1 MiB of data in the middle and 4 KiB at the start; the
        // rest holes, the last one up to the end.
        f.set_len(1 << 30).unwrap();
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
        f.write_all_at(&data, 512 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 0).unwrap();
        f.sync_all().unwrap();
        let e = file_entry("/big", 1 << 30);
        let go = AtomicBool::new(false);
        let out_path = d.path().join("restored");
        let out = std::fs::File::create(&out_path).unwrap();
        let mut w = Counting {
            inner: crate::util::SparseWriter::new(&out),
            written: 0,
        };
        copy_file(&root, &e, &mut w, &go).unwrap();
        let written = w.written;
        w.inner.finish().unwrap();
        // Only the data crossed: 1 MiB + 4 KiB (extents are whole blocks).
        assert!(
            written <= (1 << 20) + (64 << 10),
            "{written} bytes read and copied of a file with 1 MiB of data"
        );
        let m = std::fs::metadata(&out_path).unwrap();
        assert_eq!(m.len(), 1 << 30);
        assert!(m.blocks() * 512 <= 4 << 20, "{} blocks", m.blocks());
        let (a, b) = (
            std::fs::File::open(&src).unwrap(),
            std::fs::File::open(&out_path).unwrap(),
        );
        let (mut x, mut y) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
        for off in (0..1u64 << 30).step_by(8 << 20) {
            a.read_exact_at(&mut x, off).unwrap();
            b.read_exact_at(&mut y, off).unwrap();
            assert!(x == y, "differs in the 8 MiB at {off}");
        }
        // Where holes cannot be skipped (`files cat` to stdout): zeros are
        // written, still without reading them.
        let small = root.join("small");
        let rw = |p: &Path| {
            (std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true))
            .truncate(true)
            .open(p)
            .unwrap()
        };
        let f = rw(&small);
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"middle", 3 << 20).unwrap();
        let mut bytes: Vec<u8> = vec![];
        let read = copy_data(&f, &file_entry("/small", 8 << 20), &mut bytes, &go).unwrap();
        assert!(read <= 64 << 10, "{read}");
        assert!(bytes == std::fs::read(&small).unwrap());
        // A file of holes only.
        let empty = rw(&root.join("holes"));
        empty.set_len(5 << 20).unwrap();
        let mut bytes: Vec<u8> = vec![];
        assert_eq!(
            copy_data(&empty, &file_entry("/holes", 5 << 20), &mut bytes, &go).unwrap(),
            0
        );
        assert!(bytes.len() == 5 << 20 && bytes.iter().all(|&b| b == 0));
    }
}
