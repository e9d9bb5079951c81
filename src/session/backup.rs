//! Live backups: `recoverfs backup --session VM` (and `POST
//! /sessions/{vm}/backup`) makes a new backup of a VM while it runs from
//! its recovery session, from the session's dirty map alone. Unchanged
//! blocks take the base backup's chunk ids; only blocks the guest wrote
//! since are read (from staging, or from the primary copy after a
//! relocation's cutover) and stored. Nothing is read from the whole disk
//! and nothing is fetched from the repository.
//!
//! **Why generations.** `diskN.changed` means "changed since recovery":
//! the NBD `recoverfs:changed` context, `/changed`, status and the crash
//! tests rely on it, so it is never cleared. A backup needs "changed since
//! the last backup" instead. Clearing bits of a live map is not safe
//! either: `set_durable` returns early for a bit already set, so a write
//! racing the clear could be left unrecorded. So each backup starts a
//! fresh map: generation 0 is `diskN.changed` itself (nothing to migrate,
//! no extra sync until the first live backup); generation `G >= 1` is
//! `diskN.dirty-G`. A guest write sets, durably and before its data, the
//! changed bit, then the current generation's bit, then (while a backup
//! runs) the next generation's.
//!
//! **Why copy-on-write.** Guest writes pause only for the freeze: the time
//! it takes to flush each disk and snapshot its current dirty map (done
//! with every disk's write gate held, in disk order, like a cutover). The
//! backup then reads the frozen blocks while the guest writes on; the
//! first write to a frozen block still unread copies its freeze-time bytes
//! to `diskN.cow` (sparse, never synced, removed after) first. So the
//! backup is the disks at the freeze, and blocks written after it belong
//! to the next backup (they are in the next generation's map). A frozen
//! block that was never staged reads as the session's own backup chunk,
//! which is what the manifest takes, unread.
//!
//! **Uploaded blocks.** If the session uploader ran (`upload`), a frozen
//! block whose upload entry is still valid at the freeze is taken as that
//! chunk, unread, once the chunk is checked to exist under the backup's
//! writer lock (a missing one is read). The backup holds the session's
//! upload gate for its whole run, creates the next generation's empty
//! upload record with the next dirty map (step 1), switches the volumes
//! to it at step 5 and removes the old one with the old map.
//!
//! **Order, and what a crash leaves.**
//! 1. Leftover next-generation maps and cow files are removed; fresh next
//!    maps are created durably; every disk is flushed (so the flush inside
//!    the pause is small).
//! 2. Freeze (writes paused): flush, snapshot the dirty map, install the
//!    freeze and the next map, resume.
//! 3. Store the changed chunks, then the manifest (create-only).
//! 4. Commit: `base-{G+1}.json` (the new manifest), then `since.json`
//!    `{generation: G+1, base: ID}` replaced atomically and durably.
//! 5. Only then the next map becomes current; `dirty-G` (never
//!    `changed`), `base-G.json` and the cow files are removed.
//!
//! A crash before 3 ends leaves no backup, and generation G's map still
//! covers every write since the base. A crash between 3 and 4 leaves a
//! correct new backup while the session stays relative to the old base:
//! the next backup reads more and misses nothing. A crash after 4 leaves
//! the old generation's files, which the next open removes (with any next
//! generation's and cow files: see `staging::open_session`). If the commit
//! fails or cannot be made durable, writes go on marking both maps, so
//! whichever generation a restart finds is complete; the error names the
//! backup that was written, and the session refuses further live backups
//! until it is recovered again.
//!
//! **Cancel.** A backup asked through the control API is cancelled when
//! its client goes away (Ctrl-C, SIGTERM, a dropped ssh session): the
//! handler sets the backup's cancel flag when hyper drops it, the reader
//! stops at the next chunk boundary and the backup ends as one that did
//! not reach its manifest (step 3): nothing is published, generation G's
//! map keeps every write since the base, and the log says
//! `live backup of VM … cancelled: the client went away after N of M
//! chunks`. Chunks stored before the cancel stay unreferenced until `gc`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::{Datastore, Session};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::repo::limits::MAX_MANIFEST_BYTES;
use crate::repo::locks::WriterLock;
use crate::repo::writer::{publish_manifest, store_chunks, stored_bytes_after};
use crate::repo::{Digest, DiskManifest, Manifest, Repository};
use crate::staging::io::{self, BlockFile, Open, Storage};
use crate::staging::uploaded::uploaded_path;
use crate::staging::{base_copy_path, cow_path, dirty_path, MapKind, PersistentBitmap, Since};
use crate::util::validate_name;
use crate::volume::{Frozen, Uploaded, Volume};

/// Which backup a session's dirty maps are relative to.
pub(crate) struct BackupBase {
    pub(crate) generation: u64,
    pub(crate) base: Arc<Manifest>,
    /// A live backup whose commit could not be made durable (see the
    /// module docs): further live backups are refused.
    pub(crate) uncertain: Option<String>,
}

/// Reads the session's `since.json` and base copy; `own` (the session's
/// backup) is the base of generation 0.
pub(crate) fn load_base(storage: &dyn Storage, dir: &Path, own: &Manifest) -> Result<BackupBase> {
    let Some(since) = Since::load(storage, dir)? else {
        return Ok(BackupBase {
            generation: 0,
            base: Arc::new(own.clone()),
            uncertain: None,
        });
    };
    let p = base_copy_path(dir, since.generation);
    let bytes = storage
        .read(&p, MAX_MANIFEST_BYTES)
        .ctx(|| format!("read {}", p.display()))?
        .ok_or_else(|| {
            Error::corrupt(format!(
                "{} is missing (since.json names generation {})",
                p.display(),
                since.generation
            ))
        })?;
    let m = Manifest::decode(&bytes, &format!("{} (copy in {})", since.base, p.display()))?;
    if m.vm != own.vm || m.id != since.base {
        return Err(Error::corrupt(format!(
            "{} names backup {}/{}, since.json {}",
            p.display(),
            m.vm,
            m.id,
            since.base
        )));
    }
    Ok(BackupBase {
        generation: since.generation,
        base: Arc::new(m),
        uncertain: None,
    })
}

/// What `backup --session` did.
#[derive(Debug, Clone, Serialize)]
pub struct SessionBackupReport {
    pub vm: String,
    /// The new backup's id.
    pub backup: String,
    /// The backup the unchanged blocks were taken from.
    pub base: String,
    /// How long guest writes were paused for the freeze.
    pub pause_ms: f64,
    pub duration_ms: f64,
    /// Bytes read from staging (or the primary copy after cutover).
    pub read_bytes: u64,
    /// Bytes fetched from the repository: a live backup fetches nothing.
    pub fetched_bytes: u64,
    /// Compressed bytes added to the repository.
    pub new_bytes: u64,
    pub disks: Vec<SessionBackupDisk>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionBackupDisk {
    pub name: String,
    /// Blocks dirty at the freeze.
    pub blocks_frozen: u64,
    /// Of those, the ones read: the residue (the others were never
    /// staged, the session's own backup chunk, or taken from the session
    /// uploader's record, unread).
    pub blocks_read: u64,
    /// Frozen blocks taken as the chunk the session uploader had stored
    /// for them, unread (`upload`).
    pub blocks_uploaded: u64,
    /// Uploaded blocks whose chunk was gone from the repository (a `gc`
    /// between uploader runs): read instead.
    pub uploaded_missing: u64,
    pub bytes_read: u64,
    /// Frozen blocks the guest overwrote before they were read, whose
    /// freeze-time bytes were copied aside first.
    pub cow_blocks: u64,
    /// Chunks this backup added to the repository.
    pub new_chunks: u64,
    /// Non-zero chunks of the new backup already in the repository.
    pub reused_chunks: u64,
    /// Read blocks that are all zeros.
    pub zero_chunks: u64,
    pub new_bytes: u64,
}

/// Clears `backup_running` when the backup ends, however it ends.
struct Running<'a>(&'a Session);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.backup_running.store(false, Ordering::Release);
        *self.0.backup_progress.started.lock() = None;
    }
}

/// The files a backup creates for one disk.
struct NextGen {
    map: Arc<PersistentBitmap>,
    cow: Arc<dyn BlockFile>,
    /// The next generation's empty upload record, for a disk that has one.
    uploaded: Option<Arc<Uploaded>>,
}

impl Datastore {
    /// Backs up a live session from its dirty maps (see the module docs).
    /// Busy while another backup of the VM runs; refused for a failed disk.
    pub fn backup_session(&self, vm: &str) -> Result<SessionBackupReport> {
        self.backup_session_until(vm, &AtomicBool::new(false))
    }

    /// [`Self::backup_session`], cancelled (an `Interrupted` error, nothing
    /// published, the dirty maps as they were) once `cancel` is set: the
    /// control API sets it when the client that asked goes away.
    pub fn backup_session_until(
        &self,
        vm: &str,
        cancel: &AtomicBool,
    ) -> Result<SessionBackupReport> {
        validate_name("VM name", vm)?;
        let no_session = || Error::not_found(format!("no recovery session for VM {vm}"));
        let s = self.session(vm).ok_or_else(no_session)?;
        if s.backup_running.swap(true, Ordering::AcqRel) {
            return Err(Error::busy(format!(
                "a backup of VM {vm} is already running"
            )));
        }
        let _running = Running(&s);
        s.backup_progress.begin();
        let op = self.vm_op(vm);
        let _op = op.lock();
        // The uploader finishes its batch and records nothing until the
        // backup ends (it saw `backup_running`).
        let _uploads = s.upload_gate.lock();
        match self.session(vm) {
            Some(now) if Arc::ptr_eq(&now, &s) => {}
            _ => return Err(no_session()),
        }
        let _span = tracing::info_span!("session_backup", vm).entered();
        let live = Live {
            vm: &s.vm,
            dir: &s.dir,
            storage: s.staging.storage().clone(),
            disks: &s.disks,
            backup_base: &s.backup_base,
            progress: &s.backup_progress,
        };
        // Said in the log too: the client that asked may be gone.
        let r = run_until(&self.repo, &live, cancel).inspect_err(|e| match e.kind() {
            ErrorKind::Interrupted if cancel.load(Ordering::Acquire) => tracing::warn!("{e}"),
            _ => tracing::warn!("live backup of VM {vm} failed, nothing was published: {e}"),
        })?;
        tracing::info!(vm, backup = %r.backup, "live backup of VM {vm} published");
        // Its new base is protected from forget from now on.
        self.pin(&s, true);
        Ok(r)
    }
}

/// What a live backup needs of a session (the power-cut test builds one
/// over recorded storage).
pub(crate) struct Live<'a> {
    pub(crate) vm: &'a str,
    pub(crate) dir: &'a Path,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) disks: &'a [Arc<Volume>],
    pub(crate) backup_base: &'a parking_lot::Mutex<BackupBase>,
    pub(crate) progress: &'a LiveProgress,
}

/// How far the running live backup of a session is, for `status`
/// (explore9 L6: it said only that one was running).
#[derive(Default)]
pub(crate) struct LiveProgress {
    done: AtomicU64,
    total: AtomicU64,
    started: parking_lot::Mutex<Option<Instant>>,
}

/// [`LiveProgress`] as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LiveBackupProgress {
    /// Changed chunks stored so far, of how many (0 of 0 until the
    /// freeze has counted them).
    pub chunks_done: u64,
    pub chunks_total: u64,
    pub seconds: f64,
}

impl LiveProgress {
    fn begin(&self) {
        self.done.store(0, Ordering::Release);
        self.total.store(0, Ordering::Release);
        *self.started.lock() = Some(Instant::now());
    }

    pub(crate) fn shown(&self) -> Option<LiveBackupProgress> {
        let started = (*self.started.lock())?;
        Some(LiveBackupProgress {
            chunks_done: self.done.load(Ordering::Acquire),
            chunks_total: self.total.load(Ordering::Acquire),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
pub(crate) fn run(repo: &Arc<Repository>, s: &Live) -> Result<SessionBackupReport> {
    run_until(repo, s, &AtomicBool::new(false))
}

/// [`run`], cancelled before its manifest once `cancel` is set.
pub(crate) fn run_until(
    repo: &Arc<Repository>,
    s: &Live,
    cancel: &AtomicBool,
) -> Result<SessionBackupReport> {
    let t0 = Instant::now();
    let (g, base) = {
        let b = s.backup_base.lock();
        if let Some(u) = &b.uncertain {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "VM {}: {u}; release and recover the VM before its next live backup",
                    s.vm
                ),
            ));
        }
        (b.generation, b.base.clone())
    };
    check(s, &base)?;
    // A client gone while the backup waited for its locks: the guest's
    // writes are not paused for a freeze nobody wants (review27 L6).
    if cancel.load(Ordering::Acquire) {
        return Err(Error::interrupted(format!(
            "live backup of VM {} cancelled: the client went away before it began",
            s.vm
        )));
    }
    let storage = s.storage.clone();
    let dir = s.dir;
    let next = prepare(storage.as_ref(), dir, s, g)?;
    // The freeze: every disk's writes paused at once, in disk order.
    let tp = Instant::now();
    let frozen = {
        let guards: Vec<_> = s.disks.iter().map(|d| d.pause_writes()).collect();
        let mut out = vec![];
        let mut err = None;
        for ((i, d), n) in s.disks.iter().enumerate().zip(&next) {
            match d.freeze(n.map.clone(), n.cow.clone(), cow_path(dir, i)) {
                Ok(f) => out.push(f),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        drop(guards);
        if let Some(e) = err {
            abort(storage.as_ref(), dir, s, g, out.len());
            return Err(e.context(format!("freeze of VM {} for a backup", s.vm)));
        }
        out
    };
    let pause_ms = tp.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(vm = %s.vm, pause_ms, "guest writes paused for the backup's freeze");
    let (manifest, disks) = match store(repo, s, &base, &frozen, cancel) {
        Ok(r) => r,
        Err(e) => {
            abort(storage.as_ref(), dir, s, g, s.disks.len());
            return Err(e);
        }
    };
    // The commit point: since.json names the new base.
    let commit = manifest.encode().and_then(|bytes| {
        io::replace(storage.as_ref(), &base_copy_path(dir, g + 1), &bytes)?;
        Since {
            generation: g + 1,
            base: manifest.id.clone(),
        }
        .store(storage.as_ref(), dir)
    });
    if let Err(e) = commit {
        for d in s.disks {
            d.end_freeze_keeping_both();
        }
        let msg = format!(
            "backup {} of VM {} was written, but the session could not record it as its new base ({e})",
            manifest.id, s.vm
        );
        tracing::error!(vm = %s.vm, backup = %manifest.id, "{msg}; writes are tracked relative to both backups");
        s.backup_base.lock().uncertain = Some(msg.clone());
        return Err(Error::new(ErrorKind::Io, msg));
    }
    for (d, n) in s.disks.iter().zip(&next) {
        d.end_freeze(true);
        d.set_uploaded(n.uploaded.clone());
    }
    *s.backup_base.lock() = BackupBase {
        generation: g + 1,
        base: Arc::new(manifest.clone()),
        uncertain: None,
    };
    // What the commit made obsolete; a restart removes it if this fails.
    let mut old: Vec<_> = (0..s.disks.len()).map(|i| cow_path(dir, i)).collect();
    old.extend((0..s.disks.len()).map(|i| uploaded_path(dir, i, g)));
    if g >= 1 {
        old.extend((0..s.disks.len()).map(|i| dirty_path(dir, i, g)));
        old.push(base_copy_path(dir, g));
    }
    if let Err(e) = remove_all(storage.as_ref(), dir, &old) {
        tracing::warn!(vm = %s.vm, "could not remove the previous generation's files (the next start does): {e}");
    }
    let report = SessionBackupReport {
        vm: s.vm.to_string(),
        backup: manifest.id.clone(),
        base: base.id.clone(),
        pause_ms,
        duration_ms: t0.elapsed().as_secs_f64() * 1000.0,
        read_bytes: disks.iter().map(|d| d.bytes_read).sum(),
        fetched_bytes: 0,
        new_bytes: manifest.new_bytes(),
        disks,
    };
    tracing::info!(
        vm = %s.vm,
        backup = %report.backup,
        base = %report.base,
        pause_ms,
        read_bytes = report.read_bytes,
        new_bytes = report.new_bytes,
        "live backup written"
    );
    Ok(report)
}

/// The base's geometry must be the session's: a block is one chunk.
fn check(s: &Live, base: &Manifest) -> Result<()> {
    if let Some(d) = s.disks.iter().find(|d| d.is_failed()) {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "disk{} of VM {} has failed: its staging may not hold what the guest wrote; release the session",
                d.index, s.vm
            ),
        ));
    }
    let same = base.disks.len() == s.disks.len()
        && base
            .disks
            .iter()
            .zip(s.disks)
            .all(|(b, d)| b.size == d.size && b.chunk_size as u64 == d.block_size());
    if !same {
        return Err(Error::invalid(format!(
            "backup {} of VM {} does not have the session's disk geometry",
            base.id, s.vm
        )));
    }
    Ok(())
}

/// Step 1: fresh next-generation maps (durable) and empty cow files, then
/// a flush of every disk so the one inside the pause is short.
fn prepare(storage: &dyn Storage, dir: &Path, s: &Live, g: u64) -> Result<Vec<NextGen>> {
    let mut leftovers = vec![base_copy_path(dir, g + 1)];
    for i in 0..s.disks.len() {
        leftovers.push(dirty_path(dir, i, g + 1));
        leftovers.push(cow_path(dir, i));
        leftovers.push(uploaded_path(dir, i, g + 1));
    }
    remove_all(storage, dir, &leftovers)?;
    let uploaded = super::upload::next_records(storage, dir, s.disks, g)?;
    let mut out = vec![];
    for ((i, d), uploaded) in s.disks.iter().enumerate().zip(uploaded) {
        let map = PersistentBitmap::open(
            storage,
            &dirty_path(dir, i, g + 1),
            MapKind::Dirty,
            d.block_size() as u32,
            d.nblocks(),
        )?;
        let p = cow_path(dir, i);
        let cow = storage
            .open(&p, Open::Empty)
            .and_then(|f| f.set_len(d.size).map(|()| f))
            .ctx(|| format!("create {}", p.display()))?;
        out.push(NextGen {
            map: Arc::new(map),
            cow,
            uploaded,
        });
    }
    for d in s.disks {
        d.flush()?;
    }
    Ok(out)
}

/// Undoes a backup that did not reach its manifest: the first `frozen`
/// disks end their freeze, the next generation's files go.
fn abort(storage: &dyn Storage, dir: &Path, s: &Live, g: u64, frozen: usize) {
    for d in &s.disks[..frozen] {
        d.end_freeze(false);
    }
    let mut paths = vec![];
    for i in 0..s.disks.len() {
        paths.push(dirty_path(dir, i, g + 1));
        paths.push(cow_path(dir, i));
        paths.push(uploaded_path(dir, i, g + 1));
    }
    if let Err(e) = remove_all(storage, dir, &paths) {
        tracing::warn!(vm = %s.vm, "could not remove an aborted backup's files (the next start does): {e}");
    }
}

fn remove_all(storage: &dyn Storage, dir: &Path, paths: &[std::path::PathBuf]) -> Result<()> {
    for p in paths {
        storage
            .remove_file(p)
            .ctx(|| format!("remove {}", p.display()))?;
    }
    storage
        .sync_dir(dir)
        .ctx(|| format!("fsync directory {}", dir.display()))
}

/// Chunks a live backup has stored, of how many, and whether its client
/// is gone.
struct Progress<'a> {
    vm: &'a str,
    cancel: &'a AtomicBool,
    done: &'a AtomicU64,
    total: &'a AtomicU64,
}

impl Progress<'_> {
    /// The cancel error if the client is gone: checked before each chunk
    /// is read and before the manifest.
    fn check(&self) -> Result<()> {
        if !self.cancel.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(Error::interrupted(format!(
            "live backup of VM {} cancelled: the client went away after {} of {} chunks",
            self.vm,
            self.done.load(Ordering::Acquire),
            self.total.load(Ordering::Acquire)
        )))
    }
}

/// Step 3: stores each disk's frozen blocks and publishes the manifest.
fn store(
    repo: &Arc<Repository>,
    s: &Live,
    base: &Manifest,
    frozen: &[Frozen],
    cancel: &AtomicBool,
) -> Result<(Manifest, Vec<SessionBackupDisk>)> {
    let progress = Progress {
        vm: s.vm,
        cancel,
        done: &s.progress.done,
        total: &s.progress.total,
    };
    let frozen_blocks: u64 = frozen.iter().map(|f| f.read.len() as u64).sum();
    progress.total.store(frozen_blocks, Ordering::Release);
    progress.check()?;
    // The base's chunks and the session's own backup's are reused: both
    // must still exist once the writer lock is held.
    let lock = WriterLock::acquire_until(repo, s.vm, &|| progress.check())?;
    let mut reused: Vec<&str> = vec![&base.id];
    reused.extend(s.disks.iter().map(|d| d.backup.as_str()));
    reused.dedup();
    for id in reused {
        lock.require_manifest(s.vm, id)
            .map_err(|e| e.context(format!("live backup of VM {}", s.vm)))?;
    }
    // What each disk takes from the uploader, first: M, the chunks to
    // read, is then known for the cancel's log line.
    let ups = (s.disks.iter().zip(frozen))
        .map(|(d, f)| take_uploaded(repo, d, f))
        .collect::<Result<Vec<_>>>()?;
    let residues: Vec<Vec<u64>> = (frozen.iter().zip(&ups))
        .map(|(f, up)| {
            (f.read.iter().copied())
                .filter(|b| !up.taken.contains_key(b))
                .collect()
        })
        .collect();
    let residue: u64 = residues.iter().map(|r| r.len() as u64).sum();
    progress.total.store(residue, Ordering::Release);
    let progress = &progress;
    let mut disks = vec![];
    let mut reports = vec![];
    let per_disk = s.disks.iter().zip(frozen).zip(&base.disks);
    for ((((d, f), bd), up), residue) in per_disk.zip(ups).zip(residues) {
        let _span = tracing::info_span!("disk", disk = d.index).entered();
        let read = |b: u64, buf: &mut [u8]| {
            progress.check()?;
            d.read_frozen(b, buf).map(|_| ())
        };
        let done = |_| {
            progress.done.fetch_add(1, Ordering::AcqRel);
        };
        let stored = store_chunks(
            repo,
            d.size,
            bd.chunk_size,
            residue.iter().copied(),
            &read,
            &done,
        );
        // A read that failed because the client went away: the cancel.
        let mut st = stored.map_err(|e| progress.check().err().unwrap_or(e))?;
        st.sizes.extend(up.sizes);
        // Frozen blocks never staged are the session's own backup chunk;
        // those read or taken from the uploader are what they hold now.
        let own = f.blocks.iter().map(|&b| (b, d.chunks().get(b)));
        let taken = up.taken.iter().map(|(b, c)| (*b, *c));
        let chunks = bd
            .chunks
            .with_changes(own.chain(st.chunks.iter().copied()).chain(taken));
        let stored_bytes = stored_bytes_after(repo, bd, &chunks, &st.sizes)?;
        let nonzero = chunks.data_chunks();
        reports.push(SessionBackupDisk {
            name: bd.name.clone(),
            blocks_frozen: f.blocks.len() as u64,
            blocks_read: residue.len() as u64,
            blocks_uploaded: up.taken.len() as u64,
            uploaded_missing: up.missing,
            bytes_read: st.read_bytes,
            cow_blocks: d.cow_blocks(),
            new_chunks: st.new_chunks,
            reused_chunks: nonzero.saturating_sub(st.new_chunks),
            zero_chunks: st.zero_chunks,
            new_bytes: st.new_bytes,
        });
        disks.push(DiskManifest {
            name: bd.name.clone(),
            size: bd.size,
            chunk_size: bd.chunk_size,
            chunks,
            stored_bytes,
            new_bytes: st.new_bytes,
        });
    }
    // The last point where a cancel publishes nothing.
    progress.check()?;
    let m = publish_manifest(repo, &lock, s.vm, base.config.clone(), disks)?;
    Ok((m, reports))
}

/// The frozen blocks a disk takes from the session uploader's record.
struct Taken {
    taken: std::collections::HashMap<u64, Option<Digest>>,
    /// Stored sizes of the taken chunks.
    sizes: std::collections::HashMap<Digest, u64>,
    missing: u64,
}

/// Takes each frozen block with a valid upload entry whose chunk exists
/// now (the caller holds its writer lock, so it stays) and lets go of its
/// freeze-time bytes; a block whose chunk is gone is left to be read.
fn take_uploaded(repo: &Repository, d: &Volume, f: &Frozen) -> Result<Taken> {
    let mut t = Taken {
        taken: Default::default(),
        sizes: Default::default(),
        missing: 0,
    };
    for &(b, c) in &f.uploaded {
        if let Some(c) = c {
            match repo.chunk_stored_size(&c)? {
                Some(n) => {
                    t.sizes.insert(c, n);
                }
                None => {
                    t.missing += 1;
                    continue;
                }
            }
        }
        t.taken.insert(b, c);
        d.release_frozen(b);
    }
    if t.missing > 0 {
        tracing::warn!(vm = %d.vm, disk = d.index, blocks = t.missing, "uploaded chunks are gone from the repository (collected between uploader runs): those blocks are read");
    }
    Ok(t)
}
