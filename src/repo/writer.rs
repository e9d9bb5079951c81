//! Writing a backup: cut raw images into fixed chunks, skip zero chunks
//! (the chunks in an image's holes are not even read, see `repo::sparse`),
//! store each distinct chunk once, then publish the manifest last.
//! Hashing and compression run on a small crossbeam worker pool while one
//! thread reads the image sequentially.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossbeam_channel::bounded;

use super::chunk::{is_zero, Digest};
use super::chunk_index::ChunkIndex;
use super::locks::WriterLock;
use super::manifest::{DiskManifest, Manifest, MANIFEST_FORMAT};
use super::Repository;
use crate::error::{Error, IoContext, Result};
use crate::util::{rfc3339, validate_name};

pub struct BackupRequest {
    pub vm: String,
    pub config: Option<serde_json::Value>,
    pub chunk_size: u32,
    pub images: Vec<PathBuf>,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
}

#[derive(Debug, Default, Clone)]
pub struct DiskReport {
    pub name: String,
    pub size: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub new_chunks: u64,
    pub new_bytes: u64,
    /// Plain bytes read: holes are not.
    pub read_bytes: u64,
}

pub struct BackupReport {
    pub manifest: Manifest,
    pub disks: Vec<DiskReport>,
}

/// Size of a raw image: a regular file or a block device, nothing else,
/// and not empty (a disk of 0 bytes would be published and could never
/// boot).
pub fn image_size(path: &Path) -> Result<u64> {
    let size = any_image_size(path)?;
    if size == 0 {
        return Err(Error::invalid(format!(
            "image {} is empty (0 bytes): there is no disk to back up",
            path.display()
        )));
    }
    Ok(size)
}

fn any_image_size(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).ctx(|| format!("image {}", path.display()))?;
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(meta.len());
    }
    if ft.is_block_device() {
        let f = File::open(path).ctx(|| format!("open {}", path.display()))?;
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
        // points at a live local of that type; the fd is open.
        let rc =
            unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), 0x8008_1272, &mut size) };
        if rc != 0 {
            return Err(Error::io(
                format!("size of {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        return Ok(size);
    }
    Err(Error::invalid(format!(
        "image {} is neither a regular file nor a block device",
        path.display()
    )))
}

/// A VM configuration given to a backup: a JSON object whose `memory_mib`,
/// if it names one, a boot would accept on a large enough host (refused
/// now, not when the backup is needed).
pub fn check_config(config: &serde_json::Value) -> Result<()> {
    if !config.is_object() {
        return Err(Error::invalid("VM configuration must be a JSON object"));
    }
    use super::limits::{memory_mib_within, MAX_MEMORY_MIB, MIN_MEMORY_MIB};
    match config.get("memory_mib") {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(m) if memory_mib_within(m, MAX_MEMORY_MIB).is_some() => Ok(()),
        Some(m) => Err(Error::invalid(format!(
            "the VM configuration asks for memory_mib {m}; it must be a whole number from {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}"
        ))),
    }
}

/// A configuration that lists its disks lists one per image backed up:
/// a recovered `vm.json` naming no disk, or fewer, beside the disk files
/// would mislead whoever boots it.
pub fn check_config_disks(config: &serde_json::Value, images: usize) -> Result<()> {
    match config.get("disks") {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::Array(d)) if d.len() == images => Ok(()),
        Some(serde_json::Value::Array(d)) => Err(Error::invalid(format!(
            "the VM configuration lists {} disk(s) and {images} image(s) were given: list one per image, in order, or leave \"disks\" out",
            d.len()
        ))),
        Some(_) => Err(Error::invalid(
            "the VM configuration's \"disks\" must be a list (one entry per image)",
        )),
    }
}

pub fn default_config(vm: &str, disks: usize) -> serde_json::Value {
    let disks: Vec<_> = (0..disks)
        .map(|i| serde_json::json!({"name": format!("disk{i}"), "file": format!("disk{i}.raw"), "format": "raw", "bus": "virtio"}))
        .collect();
    serde_json::json!({"name": vm, "vcpus": 1, "memory_mib": 512, "firmware": "bios", "disks": disks})
}

pub fn run_backup(repo: &Arc<Repository>, req: BackupRequest) -> Result<BackupReport> {
    validate_name("VM name", &req.vm)?;
    if req.images.is_empty() {
        return Err(Error::invalid("no disk image given"));
    }
    let sizes = req
        .images
        .iter()
        .map(|p| image_size(p))
        .collect::<Result<Vec<_>>>()?;
    if let Some(c) = &req.config {
        check_config(c)?;
        check_config_disks(c, req.images.len())?;
    }
    // Refused before any reading, not only when its manifest is written.
    super::chunk::validate_chunk_size(u64::from(req.chunk_size))?;
    let blocks = (sizes.iter())
        .map(|&s| DiskManifest::chunk_count(s, req.chunk_size))
        .sum();
    super::limits::check_blocks(blocks)
        .map_err(|e| e.context(format!("backup of VM {}", req.vm)))?;
    let lock = WriterLock::acquire(repo, &req.vm)?;
    let total: u64 = sizes.iter().sum();
    let bar = progress_bar(req.progress, total);
    let mut disks = vec![];
    let mut reports = vec![];
    for (i, (path, size)) in req.images.iter().zip(&sizes).enumerate() {
        let name = format!("disk{i}");
        let (dm, rep) = backup_disk(repo, &name, path, *size, req.chunk_size, &|b| bar.inc(b))?;
        disks.push(dm);
        reports.push(rep);
    }
    bar.finish_and_clear();
    let config = req
        .config
        .unwrap_or_else(|| default_config(&req.vm, disks.len()));
    let manifest = publish_manifest(repo, &lock, &req.vm, config, disks)?;
    Ok(BackupReport {
        manifest,
        disks: reports,
    })
}

/// Publishes a backup whose chunks are all stored: the manifest is
/// created only if absent, under a new time-based id (with a random part
/// where the store cannot create atomically; a suffix if the id is taken).
/// `lock` was held since before the first chunk was stored or found
/// (see `repo::locks`); it must still be trusted.
pub fn publish_manifest(
    repo: &Repository,
    lock: &WriterLock,
    vm: &str,
    config: serde_json::Value,
    disks: Vec<DiskManifest>,
) -> Result<Manifest> {
    publish_manifest_at(repo, lock, vm, config, disks, std::time::SystemTime::now())
}

/// [`publish_manifest`] with the backup's time given: the seam tests use
/// to lay out backups over simulated days (retention).
pub(crate) fn publish_manifest_at(
    repo: &Repository,
    lock: &WriterLock,
    vm: &str,
    config: serde_json::Value,
    disks: Vec<DiskManifest>,
    at: std::time::SystemTime,
) -> Result<Manifest> {
    // Held to the end: a signal's lock release waits for the manifest.
    let _held = lock
        .hold()
        .map_err(|e| e.context(format!("backup of VM {vm} not published")))?;
    let now = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let created_unix = now.as_secs();
    let mut base_id = backup_id(created_unix);
    if !repo.create_only_is_atomic()? {
        // The store could let a concurrent writer replace a manifest with
        // the same id: make ids that cannot collide, and that still sort
        // in time order (milliseconds before the random part).
        base_id = format!(
            "{base_id}.{:03}-{}",
            now.subsec_millis(),
            super::random_hex(3)
        );
    }
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT,
        vm: vm.into(),
        id: base_id.clone(),
        created: rfc3339(created_unix),
        created_unix,
        config,
        disks,
    };
    // Ids are time-based; two backups in one second get a suffix.
    for n in 1.. {
        if repo.put_manifest(&manifest)? {
            break;
        }
        manifest.id = format!("{base_id}-{n}");
    }
    Ok(manifest)
}

fn backup_id(unix: u64) -> String {
    rfc3339(unix)
        .replace(['-', ':'], "")
        .replace('T', "-")
        .trim_end_matches('Z')
        .to_string()
}

fn progress_bar(enabled: bool, total: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("valid template"),
    );
    bar
}

enum Outcome {
    Zero,
    Stored {
        digest: Digest,
        new_bytes: u64,
        stored_size: u64,
    },
}

/// What [`store_chunks`] did.
#[derive(Debug, Default)]
pub struct StoredChunks {
    /// Per chunk read: its index and digest (`None`: all zeros), ascending.
    pub chunks: Vec<(u64, Option<Digest>)>,
    /// Stored (compressed) size of every distinct digest in `chunks`.
    pub sizes: std::collections::HashMap<Digest, u64>,
    pub zero_chunks: u64,
    /// Chunks this call added to the repository, and their bytes.
    pub new_chunks: u64,
    pub new_bytes: u64,
    /// Plain bytes read.
    pub read_bytes: u64,
}

/// Reads chunks `indexes` of a disk with `read(index, buf)` (`buf` is the
/// chunk's length; one reader thread, in the given order) and stores each
/// distinct non-zero one, hashing and compressing on a worker pool.
/// `done(bytes)` is called as each chunk is finished.
pub fn store_chunks(
    repo: &Arc<Repository>,
    size: u64,
    chunk_size: u32,
    indexes: impl Iterator<Item = u64> + Send,
    read: &(dyn Fn(u64, &mut [u8]) -> Result<()> + Sync),
    done: &dyn Fn(u64),
) -> Result<StoredChunks> {
    store_chunks_with(repo, size, chunk_size, indexes, 1, read, done)
}

/// [`store_chunks`] with `readers` threads calling `read` at once (each
/// takes the next index; for sources that serve requests in parallel,
/// such as an NBD server over several connections).
pub fn store_chunks_with(
    repo: &Arc<Repository>,
    size: u64,
    chunk_size: u32,
    indexes: impl Iterator<Item = u64> + Send,
    readers: usize,
    read: &(dyn Fn(u64, &mut [u8]) -> Result<()> + Sync),
    done: &dyn Fn(u64),
) -> Result<StoredChunks> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2);
    let (job_tx, job_rx) = bounded::<(u64, Vec<u8>)>(workers * 2);
    let (res_tx, res_rx) = bounded::<(u64, Result<Outcome>)>(workers * 2);
    let chunk_len = |idx: u64| (size - idx * chunk_size as u64).min(chunk_size as u64);

    let indexes = std::sync::Mutex::new(indexes);
    let next = || indexes.lock().expect("index lock").next();
    let next = &next;
    std::thread::scope(|s| -> Result<StoredChunks> {
        for _ in 0..workers {
            let (job_rx, res_tx, repo) = (job_rx.clone(), res_tx.clone(), repo.clone());
            s.spawn(move || {
                for (idx, data) in job_rx {
                    let r = store_chunk(&repo, &data);
                    if res_tx.send((idx, r)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(res_tx);
        let reader_threads: Vec<_> = (0..readers.max(1))
            .map(|_| {
                let job_tx = job_tx.clone();
                s.spawn(move || -> Result<()> {
                    while let Some(idx) = next() {
                        let mut buf = vec![0u8; chunk_len(idx) as usize];
                        read(idx, &mut buf)?;
                        if job_tx.send((idx, buf)).is_err() {
                            break;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        drop(job_tx);

        let mut out = StoredChunks::default();
        let mut first_err = None;
        for (idx, r) in res_rx {
            done(chunk_len(idx));
            out.read_bytes += chunk_len(idx);
            match r {
                Ok(Outcome::Zero) => {
                    out.zero_chunks += 1;
                    out.chunks.push((idx, None));
                }
                Ok(Outcome::Stored {
                    digest,
                    new_bytes,
                    stored_size,
                }) => {
                    if new_bytes > 0 {
                        out.new_chunks += 1;
                        out.new_bytes += new_bytes;
                    }
                    out.sizes.entry(digest).or_insert(stored_size);
                    out.chunks.push((idx, Some(digest)));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        for r in reader_threads {
            r.join().expect("reader thread")?;
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        out.chunks.sort_unstable_by_key(|c| c.0);
        Ok(out)
    })
}

/// `stored_bytes` of a disk whose chunk list went from `base` to `chunks`:
/// the base's figure, less the stored size of each distinct chunk no
/// longer referenced, plus that of each one newly referenced. Sizes come
/// from `known`, else from the repository (a size query, never a read).
pub fn stored_bytes_after(
    repo: &Repository,
    base: &DiskManifest,
    chunks: &ChunkIndex,
    known: &std::collections::HashMap<Digest, u64>,
) -> Result<u64> {
    use std::collections::HashSet;
    let before: HashSet<&Digest> = base.chunks.digests().collect();
    let after: HashSet<&Digest> = chunks.digests().collect();
    let size = |d: &Digest| -> Result<u64> {
        match known.get(d) {
            Some(n) => Ok(*n),
            None => repo.existing_chunk_size(d),
        }
    };
    let mut total = base.stored_bytes;
    // A chunk the new backup no longer names only leaves the figure: one
    // that is missing (a base block the guest has since overwritten)
    // must not fail the backup, which does not need it. A chunk it keeps
    // or adds must exist.
    for d in before.difference(&after) {
        let n = size(d).unwrap_or_else(|e| {
            tracing::warn!("a chunk of the base backup that this one no longer uses: {e}");
            0
        });
        total = total.saturating_sub(n);
    }
    for d in after.difference(&before) {
        total += size(d)?;
    }
    // Kept chunks are not looked up one by one (an incremental of a large
    // disk keeps millions), but one `verify --repair` found damaged and
    // set aside must have been stored again since.
    let quarantined = repo.quarantined()?;
    for d in after
        .intersection(&before)
        .filter(|d| quarantined.contains(*d))
    {
        if !repo.has_chunk(d)? {
            return Err(Error::corrupt(format!(
                "chunk {d} of the base backup was found damaged and set aside (verify --repair) and has not been stored again: this backup would name it; take a full backup, which stores it again (of a VM recoverfs serves: `recoverfs backup --repo REPO --vm VM` with its disks' NBD URLs from `status`; a block never staged is lost with the chunk)"
            )));
        }
    }
    Ok(total)
}

/// Reads one image into chunks; `done(bytes)` as each part is done.
fn backup_disk(
    repo: &Arc<Repository>,
    name: &str,
    path: &Path,
    size: u64,
    chunk_size: u32,
    done: &dyn Fn(u64),
) -> Result<(DiskManifest, DiskReport)> {
    let file = File::open(path).ctx(|| format!("open image {}", path.display()))?;
    let before = Stamp::of(&file, path)?;
    if before.as_ref().is_some_and(|b| b.len != size) {
        return Err(changed(path, "its size changed since the backup began"));
    }
    let n = DiskManifest::chunk_count(size, chunk_size);
    let extents = super::sparse::data_extents(&file, size)
        .map_err(|e| e.context(format!("image {}", path.display())))?;
    let with_data = super::sparse::chunks_with_data(&extents, chunk_size);
    let read_chunks: u64 = with_data.iter().map(|r| r.end - r.start).sum();
    // Chunks in holes are done without a read.
    let cs = chunk_size as u64;
    let data_len: u64 = (with_data.iter())
        .map(|r| (r.end * cs).min(size) - r.start * cs)
        .sum();
    done(size - data_len);
    let read = |idx: u64, buf: &mut [u8]| -> Result<()> {
        let off = idx * chunk_size as u64;
        file.read_exact_at(buf, off)
            .ctx(|| format!("read {} at {off}", path.display()))
    };
    let indexes = with_data.into_iter().flatten();
    let st = store_chunks(repo, size, chunk_size, indexes, &read, done)?;
    if let Some(before) = before {
        let after = Stamp::of(&file, path)?.expect("still a regular file");
        if let Some(what) = before.changed(&after) {
            return Err(changed(path, &what));
        }
    }
    let chunks = ChunkIndex::zeros(n).with_changes(st.chunks.iter().copied());
    let rep = DiskReport {
        name: name.into(),
        size,
        chunks: n,
        zero_chunks: st.zero_chunks + (n - read_chunks),
        new_chunks: st.new_chunks,
        new_bytes: st.new_bytes,
        read_bytes: st.read_bytes,
    };
    let dm = DiskManifest {
        name: name.into(),
        size,
        chunk_size,
        chunks,
        stored_bytes: st.sizes.values().sum(),
        new_bytes: st.new_bytes,
    };
    Ok((dm, rep))
}

/// What a writer changes in a regular file: its size, mtime and ctime
/// (ctime too, since a writer may set mtime back). Read before and after
/// the image is: a difference means the copy mixes blocks of two moments.
/// A block device has no such stamp (its mtime stays as it was).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(file: &File, path: &Path) -> Result<Option<Stamp>> {
        use std::os::unix::fs::MetadataExt;
        let m = file
            .metadata()
            .ctx(|| format!("image {}", path.display()))?;
        Ok(m.file_type().is_file().then(|| Stamp {
            len: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }))
    }

    /// How `after` differs, in words; `None`: not at all.
    fn changed(&self, after: &Stamp) -> Option<String> {
        let at = |(s, ns): (i64, i64)| {
            let t = rfc3339(s.max(0) as u64);
            format!("{}.{ns:09}Z", t.trim_end_matches('Z'))
        };
        if self.len != after.len {
            Some(format!("size {} then {} bytes", self.len, after.len))
        } else if self.mtime != after.mtime {
            Some(format!(
                "modified at {} then {}",
                at(self.mtime),
                at(after.mtime)
            ))
        } else if self.ctime != after.ctime {
            Some(format!(
                "inode changed at {} then {}",
                at(self.ctime),
                at(after.ctime)
            ))
        } else {
            None
        }
    }
}

/// A torn image fails the backup rather than becoming a restore point
/// that `list` shows and retention counts like a good one; its chunks
/// stay for the next run to reuse (or `gc` to free).
fn changed(path: &Path, what: &str) -> Error {
    Error::busy(format!(
        "image {} changed while it was read ({what}): the copy would mix blocks \
         of two moments, so nothing was published; back up an image nothing \
         writes to (VM shut down, or a snapshot), or a running VM with `backup-vms`",
        path.display()
    ))
}

fn store_chunk(repo: &Repository, data: &[u8]) -> Result<Outcome> {
    if is_zero(data) {
        return Ok(Outcome::Zero);
    }
    let digest = repo.chunk_id(data);
    let new_bytes = repo.put_chunk(&digest, data)?;
    let stored_size = if new_bytes > 0 {
        new_bytes
    } else {
        repo.existing_chunk_size(&digest)?
    };
    Ok(Outcome::Stored {
        digest,
        new_bytes,
        stored_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn image(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    fn req(vm: &str, images: Vec<PathBuf>) -> BackupRequest {
        BackupRequest {
            vm: vm.into(),
            config: None,
            chunk_size: 65536,
            images,
            progress: false,
        }
    }

    #[test]
    fn an_empty_image_is_refused_before_anything_is_written() {
        let d = tempfile::tempdir().unwrap();
        let (repo, _) =
            Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
        let empty = image(d.path(), "empty.raw", b"");
        let e = image_size(&empty).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("empty.raw"), "{e}");
        let full = image(d.path(), "a.raw", &[1; 100]);
        let e = run_backup(&repo, req("vm1", vec![full, empty]))
            .err()
            .expect("a 0-byte disk was backed up");
        assert!(e.to_string().contains("0 bytes"), "{e}");
        assert!(repo.vms().unwrap().is_empty());
    }

    #[test]
    fn a_config_listing_another_number_of_disks_than_images_is_refused_at_backup() {
        let d = tempfile::tempdir().unwrap();
        let (repo, _) =
            Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
        let img = image(d.path(), "a.raw", &[1; 100]);
        for bad in [
            serde_json::json!([]),
            serde_json::json!([{"name": "disk0"}, {"name": "disk1"}]),
            serde_json::json!("disk0"),
        ] {
            let mut r = req("vm1", vec![img.clone()]);
            r.config = Some(serde_json::json!({ "disks": bad }));
            let e = run_backup(&repo, r)
                .err()
                .unwrap_or_else(|| panic!("disks {bad} accepted"));
            assert_eq!(e.kind(), crate::error::ErrorKind::InvalidInput);
            assert!(
                e.to_string().contains("\"disks\"") || e.to_string().contains("disk(s)"),
                "{e}"
            );
        }
        assert!(repo.vms().unwrap().is_empty());
        let mut r = req("vm1", vec![img]);
        r.config = Some(serde_json::json!({ "disks": [{"name": "disk0"}] }));
        run_backup(&repo, r).unwrap();
    }

    #[test]
    fn a_config_asking_for_memory_a_boot_would_refuse_is_refused_at_backup() {
        let d = tempfile::tempdir().unwrap();
        let (repo, _) =
            Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
        let img = image(d.path(), "a.raw", &[1; 100]);
        for bad in [
            serde_json::json!(0),
            serde_json::json!(15),
            serde_json::json!(-1),
            serde_json::json!("512"),
            serde_json::json!(1.5),
            serde_json::json!(crate::repo::limits::MAX_MEMORY_MIB + 1),
        ] {
            let mut r = req("vm1", vec![img.clone()]);
            r.config = Some(serde_json::json!({ "memory_mib": bad }));
            let e = run_backup(&repo, r)
                .err()
                .unwrap_or_else(|| panic!("memory_mib {bad} accepted"));
            assert_eq!(e.kind(), crate::error::ErrorKind::InvalidInput);
            assert!(e.to_string().contains("memory_mib"), "{e}");
        }
        assert!(repo.vms().unwrap().is_empty());
        for good in [
            serde_json::json!(16),
            serde_json::json!(512),
            serde_json::Value::Null,
        ] {
            let mut r = req("vm1", vec![img.clone()]);
            r.config = Some(serde_json::json!({ "memory_mib": good }));
            run_backup(&repo, r).unwrap();
        }
        let mut r = req("vm1", vec![img.clone()]);
        r.config = Some(serde_json::json!({}));
        run_backup(&repo, r).unwrap();
    }

    #[test]
    fn second_backup_of_changed_image_stores_only_changed_chunks() {
        let d = tempfile::tempdir().unwrap();
        let (repo, created) =
            Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
        assert!(created);
        let mut data: Vec<u8> = (0..10 * 65536 + 123).map(|i| (i % 253) as u8).collect();
        data[65536..2 * 65536].fill(0);
        let img = image(d.path(), "a.raw", &data);
        let r1 = run_backup(&repo, req("vm1", vec![img.clone()])).unwrap();
        assert_eq!(r1.disks[0].zero_chunks, 1);
        assert_eq!(r1.manifest.disks[0].chunks.get(1), None);
        data[5 * 65536 + 7] ^= 0xff;
        std::fs::write(&img, &data).unwrap();
        let r2 = run_backup(&repo, req("vm1", vec![img])).unwrap();
        assert_eq!(r2.disks[0].new_chunks, 1);
        assert!(r2.manifest.new_bytes() > 0 && r2.manifest.new_bytes() < r1.manifest.new_bytes());
        assert_ne!(
            r1.manifest.id, r2.manifest.id,
            "same-second backups get distinct ids"
        );
        assert_eq!(repo.backup_ids("vm1").unwrap().len(), 2);
        // Every chunk reads back verified and in order.
        let m = repo.resolve("vm1", None).unwrap();
        assert_eq!(crate::testutil::disk_bytes(&repo, &m.disks[0]), data);
    }

    #[test]
    fn a_sparse_image_is_read_only_where_it_has_data_and_restores_identically() {
        let d = tempfile::tempdir().unwrap();
        let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
        let p = d.path().join("sparse.raw");
        let f = std::fs::File::create(&p).unwrap();
        let size = (256u64 << 20) + 12345; // a short last chunk
        f.set_len(size).unwrap();
        let cs = 65536u64;
        // Data across a chunk boundary, a written run of zeros (data to
        // the filesystem, a zero chunk to the backup), the short last chunk.
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8 + 1).collect();
        f.write_all_at(&data, 10 * cs + 1000).unwrap();
        f.write_all_at(&vec![0u8; cs as usize], 100 * cs).unwrap();
        f.write_all_at(b"tail", size - 4).unwrap();
        f.sync_all().unwrap();
        let ext = crate::repo::sparse::data_extents(&f, size).unwrap();
        let overlapping: u64 = (crate::repo::sparse::chunks_with_data(&ext, cs as u32).iter())
            .map(|r| r.end - r.start)
            .sum();
        let r = run_backup(&repo, req("sparse", vec![p.clone()])).unwrap();
        let rep = &r.disks[0];
        let n = size.div_ceil(cs);
        assert_eq!(rep.chunks, n);
        // Chunks 10 and 11, 100, the last: 4 chunks, the last 12345 bytes.
        assert!((4..=6).contains(&overlapping), "{ext:?}");
        assert!(
            rep.read_bytes <= overlapping * cs,
            "{} read",
            rep.read_bytes
        );
        assert!(
            rep.read_bytes < 8 * cs,
            "holes were read: {} bytes",
            rep.read_bytes
        );
        let m = &r.manifest.disks[0].chunks;
        let have: Vec<u64> = m.iter_present().map(|(i, _)| i).collect();
        assert_eq!(have, vec![10, 11, n - 1]);
        assert_eq!(rep.zero_chunks, n - 3);
        // Restored chunk by chunk, it is the image, byte for byte.
        let disk = &repo.resolve("sparse", None).unwrap().disks[0];
        assert_eq!(&disk.chunks, m);
        let img = std::fs::read(&p).unwrap();
        for (i, c) in disk.chunks.iter().enumerate() {
            let len = disk.chunk_len(i as u64);
            let want = &img[i * cs as usize..][..len];
            match c {
                Some(dg) => assert_eq!(repo.read_chunk(&dg, len, &"t").unwrap().0, want),
                None => assert!(want.iter().all(|&b| b == 0), "chunk {i}"),
            }
        }
    }

    /// A repository behind test knobs, with one chunk stored; its digest.
    fn repo_with_a_chunk(
        d: &tempfile::TempDir,
    ) -> (Arc<Repository>, super::super::testing::Knobs, Digest) {
        let path = d.path().join("r");
        Repository::open_or_create(path.to_str().unwrap()).unwrap();
        let knobs = super::super::testing::Knobs::default();
        let backend = super::super::testing::TestBackend::new(&path, knobs.clone());
        let repo = Repository::open_backend(Box::new(backend)).unwrap();
        let data = vec![7u8; 65536];
        let st = store_chunk(&repo, &data).unwrap();
        let Outcome::Stored { digest, .. } = st else {
            panic!("not zeros")
        };
        (repo, knobs, digest)
    }

    #[test]
    fn a_chunk_that_vanishes_after_a_backup_found_it_is_an_error_not_size_zero() {
        let d = tempfile::tempdir().unwrap();
        let (repo, knobs, digest) = repo_with_a_chunk(&d);
        // Found (exists), then removed before its size is asked: by a
        // collector that did not see this writer's lock.
        let (key, again, dir) = (digest.key(), knobs.clone(), d.path().join("r"));
        knobs.before_first(&key.clone(), move || {
            again.before_first(&key.clone(), move || {
                use super::super::backend::Backend;
                super::super::backend::LocalDir::new(&dir)
                    .delete(&key)
                    .unwrap()
            })
        });
        let e = store_chunk(&repo, &[7u8; 65536]).err().unwrap();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains(&digest.to_hex()), "{e}");
    }

    #[test]
    fn a_base_chunk_missing_from_the_repository_fails_stored_bytes_only_if_the_new_backup_keeps_it()
    {
        let d = tempfile::tempdir().unwrap();
        let (repo, _knobs, digest) = repo_with_a_chunk(&d);
        let lost = Digest::of(b"never stored");
        let base = DiskManifest {
            name: "disk0".into(),
            size: 2 * 65536,
            chunk_size: 65536,
            chunks: [Some(digest), Some(lost)].into_iter().collect(),
            stored_bytes: 100,
            new_bytes: 0,
        };
        // The lost chunk overwritten (zeros now): the new backup does not
        // need it, so it does not fail.
        let dropped: ChunkIndex = [Some(digest), None].into_iter().collect();
        stored_bytes_after(&repo, &base, &dropped, &Default::default()).unwrap();
        // A new chunk the repository does not have: an error.
        let added: ChunkIndex = [Some(digest), Some(Digest::of(b"also never stored"))]
            .into_iter()
            .collect();
        let e = stored_bytes_after(&repo, &base, &added, &Default::default()).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
    }

    /// explore4 M4: an incremental keeps its base's chunks unread; one
    /// that `verify --repair` set aside (damaged) must not be named again
    /// until a backup has stored it again.
    #[test]
    fn a_kept_chunk_verify_repair_set_aside_fails_the_backup_until_it_is_stored_again() {
        let d = tempfile::tempdir().unwrap();
        let (repo, _knobs, digest) = repo_with_a_chunk(&d);
        let base = DiskManifest {
            name: "disk0".into(),
            size: 65536,
            chunk_size: 65536,
            chunks: [Some(digest)].into_iter().collect(),
            stored_bytes: 100,
            new_bytes: 0,
        };
        let kept = base.chunks.clone();
        stored_bytes_after(&repo, &base, &kept, &Default::default()).unwrap();
        let path = d.path().join("r").join(digest.key());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[2] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let done =
            super::super::verify::repair(&repo, &[(digest, 65536)], std::time::Duration::ZERO)
                .unwrap();
        assert_eq!(done.set_aside, 1, "{done:?}");
        let e = stored_bytes_after(&repo, &base, &kept, &Default::default()).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("take a full backup"), "{e}");
        // A full backup stores it again: then it may be kept.
        assert!(repo.put_chunk(&digest, &[7u8; 65536]).unwrap() > 0);
        stored_bytes_after(&repo, &base, &kept, &Default::default()).unwrap();
    }

    #[test]
    fn a_backup_needing_more_blocks_in_all_than_the_bound_is_refused_before_reading() {
        use crate::repo::limits::MAX_BLOCKS;
        let d = tempfile::tempdir().unwrap();
        let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
        // Two sparse images one chunk over half the bound each, with data.
        let half = (MAX_BLOCKS / 2 + 1) * 65536;
        let images: Vec<PathBuf> = (0..2)
            .map(|i| {
                let p = image(d.path(), &format!("disk{i}.raw"), b"data");
                std::fs::File::options()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(half)
                    .unwrap();
                p
            })
            .collect();
        let e = run_backup(&repo, req("vm", images)).err().unwrap();
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("blocks in all"), "{e}");
        let stored = walkdir(&d.path().join("r").join("chunks"));
        assert_eq!(stored, 0, "chunks were stored before the refusal");
    }

    fn walkdir(p: &Path) -> usize {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.map(|e| e.unwrap().path())
            .map(|p| if p.is_dir() { walkdir(&p) } else { 1 })
            .sum()
    }

    /// A 4-chunk image last modified an hour ago (so a write now moves
    /// its mtime whatever the clock's grain), with a handle to change it.
    fn old_image(dir: &Path) -> (PathBuf, File, u64) {
        let data: Vec<u8> = (0..4 * 65536).map(|i| (i % 251) as u8 + 1).collect();
        let p = image(dir, "disk0.raw", &data);
        let f = File::options().write(true).open(&p).unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        f.set_modified(hour_ago).unwrap();
        (p, f, data.len() as u64)
    }

    /// Runs `change` once, while the image is being read.
    fn backup_changing(
        repo: &Arc<Repository>,
        p: &Path,
        size: u64,
        change: impl Fn(),
    ) -> Result<(DiskManifest, DiskReport)> {
        let once = std::sync::Once::new();
        backup_disk(repo, "disk0", p, size, 65536, &|_| once.call_once(&change))
    }

    #[test]
    fn an_image_written_while_it_is_read_fails_naming_it_and_what_changed() {
        let d = tempfile::tempdir().unwrap();
        let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
        let (p, f, size) = old_image(d.path());
        let e = backup_changing(&repo, &p, size, || f.write_all_at(b"new", 65536).unwrap())
            .expect_err("a torn image was backed up");
        assert_eq!(e.kind(), crate::error::ErrorKind::Busy, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("image {} changed while it was read", p.display())),
            "{msg}"
        );
        assert!(
            msg.contains("modified at") && msg.contains("backup-vms"),
            "{msg}"
        );
        // Left alone, the same image backs up.
        backup_disk(&repo, "disk0", &p, size, 65536, &|_| {}).unwrap();
    }

    #[test]
    fn an_image_grown_or_with_its_mtime_set_back_while_read_is_caught_by_size_and_ctime() {
        let d = tempfile::tempdir().unwrap();
        let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
        let (p, f, size) = old_image(d.path());
        let grow = || f.set_len(size + 65536).unwrap();
        let e = backup_changing(&repo, &p, size, grow).expect_err("grown");
        assert!(
            e.to_string().contains("size 262144 then 327680 bytes"),
            "{e}"
        );
        // A writer that puts the old mtime back still moves ctime; the
        // pause lets the coarse file clock tick past the stamp taken first.
        f.set_len(size).unwrap();
        let mtime = f.metadata().unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let hidden = || {
            f.write_all_at(b"new", 0).unwrap();
            f.set_modified(mtime).unwrap();
        };
        let e = backup_changing(&repo, &p, size, hidden).expect_err("mtime set back");
        assert!(e.to_string().contains("inode changed at"), "{e}");
    }

    #[test]
    fn non_regular_image_is_rejected() {
        let d = tempfile::tempdir().unwrap();
        let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
        let e = run_backup(&repo, req("vm", vec![d.path().to_path_buf()]))
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("neither a regular file nor a block device"),
            "{e}"
        );
    }
}
