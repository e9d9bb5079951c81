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

    // Set at the first error: no chunk is read or stored after it. A store
    // that stopped answering would otherwise be asked once per remaining
    // chunk, each request retried: an outage during a backup of 10 GiB
    // of changes took hours to end in the error it had at the first.
    let failed = std::sync::atomic::AtomicBool::new(false);
    let failed = &failed;
    let stop = || failed.load(std::sync::atomic::Ordering::Acquire);
    let indexes = std::sync::Mutex::new(indexes);
    let next = || match stop() {
        true => None,
        false => indexes.lock().expect("index lock").next(),
    };
    let next = &next;
    std::thread::scope(|s| -> Result<StoredChunks> {
        for _ in 0..workers {
            let (job_rx, res_tx, repo) = (job_rx.clone(), res_tx.clone(), repo.clone());
            s.spawn(move || {
                for (idx, data) in job_rx {
                    if stop() {
                        // Drained, so that the readers never block.
                        continue;
                    }
                    let r = store_chunk(&repo, &data);
                    if r.is_err() {
                        // At once, not when the results are read: this
                        // worker's next job must not ask a store that
                        // just did not answer (explore9 M4).
                        failed.store(true, std::sync::atomic::Ordering::Release);
                    }
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
                        if let Err(e) = read(idx, &mut buf) {
                            failed.store(true, std::sync::atomic::Ordering::Release);
                            return Err(e);
                        }
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
                    failed.store(true, std::sync::atomic::Ordering::Release);
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
mod tests;
