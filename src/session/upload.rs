//! The session uploader: pre-copy for recovered VMs. Between live backups
//! (`backup --session`, see `backup`), a background thread per session
//! stores the blocks the guest changed as chunks, so that the backup at
//! the scheduled time reads and stores only the residue: the blocks
//! written since they were uploaded.
//!
//! **What plays the bitmap.** The session's dirty map of the current
//! generation says which blocks changed since the base backup. Beside it,
//! per disk and generation, the *upload record* `diskN.uploaded-G`
//! (`staging::uploaded`): for block `b`, the chunk stored for `b`'s
//! content, valid only while no guest write landed since. A guest write
//! clears `b`'s entry durably (zeroed, synced) before its data lands, like
//! the relocation's copied map; the uploader reads `b` at a write stamp,
//! stores the chunk (durable in the repository), then sets the entry with
//! set-then-recheck of the stamp (`volume::upload` has the interleaving
//! argument). It reads from staging (or the primary copy after a cutover),
//! never from the repository: a dirty block that was never staged is the
//! session's own backup chunk, which a live backup takes unread anyway.
//!
//! **Throttle.** Before each block read, the uploader consults the same
//! [`Throttle`] as pre-copy (moving averages, levels, hysteresis: copying,
//! throttled at the limit, halted at 1.25 times it), sampling this
//! session's guest I/O: requests completed and the time they took, from
//! its volumes' counters (`latency=MS,queue=N`; no CPU figure here).
//!
//! **The backup.** `backup --session` holds the session's upload gate
//! (the uploader works one batch at a time under it), so no upload is
//! recorded during a backup. At the freeze (writes paused), each frozen
//! block with a valid entry is taken as that chunk, once the backup (under
//! its writer lock) has checked the chunk exists; the rest are read. The
//! manifest is the same as without the uploader: an entry's chunk is the
//! block's content at the freeze, and chunk ids are content hashes. The
//! backup creates the next generation's empty record with the next dirty
//! map; at its commit the volumes switch to it and the old one is removed
//! (a restart removes any other generation's record, `open_session`).
//!
//! **Crashes, step by step.**
//! 1. Block read, chunk stored: a crash leaves an unreferenced chunk (for
//!    `gc`) and no entry; the block is uploaded again.
//! 2. The disk is flushed (the bytes read are durable in staging), then the
//!    entry written: an entry can reach the disk whenever the kernel writes
//!    it back, so it never describes bytes a power cut could take back.
//!    Entries are synced at checkpoints (every [`CHECKPOINT`]) and when the
//!    uploader stops; one lost to a power cut is uploaded again. Entries
//!    are 64-byte aligned (never torn across sectors) and checked.
//! 3. A guest write zeroes a valid entry and syncs before its data lands:
//!    after a crash in between, the block has no entry and is dirty, so
//!    the backup reads it.
//! 4. A live backup: see above and `backup`; a crash before its commit
//!    leaves generation G's record (entries of blocks written since the
//!    freeze were zeroed by those writes), after it G+1's empty one; the
//!    next open removes the other.
//!
//! So after `kill -9` or a power cut a record holds only entries whose
//! chunk is durable and whose block holds, durably, those bytes. A restarted daemon loads the record and the uploader
//! resumes where it was (`upload.json` in the session directory says it
//! was on). A record that does not check (header, or any entry: each has
//! a keyed check of block, generation and digest) is dropped with a
//! one-line warning, and every dirty block is read again. Never a wrong
//! backup: an entry is taken only if valid, and only if its chunk exists.
//!
//! **Garbage collection.** Uploaded chunks are referred to by no manifest
//! until the next backup. The uploader takes a writer lock
//! (`repo::locks`) before it stores a chunk and holds it while any entry
//! of the session is valid, so `gc` sweeps nothing meanwhile; it lets go
//! once a backup has taken them (the record is empty) and it is idle.
//! Between runs nothing protects them: the backup checks each chunk it
//! takes and reads a block whose chunk is gone.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{Datastore, Session};
use crate::error::{Error, ErrorKind, Result};
use crate::precopy::{Gate, IoCounts, Load, LoadLimit, LoadSource, Throttle};
use crate::repo::locks::WriterLock;
use crate::repo::writer::store_chunks;
use crate::repo::Repository;
use crate::staging::io::{self, Storage};
use crate::staging::uploaded::{uploaded_path, UploadRecord};
use crate::util::validate_name;
use crate::volume::{Uploaded, Volume};

/// How often entries are made durable.
pub const CHECKPOINT: Duration = Duration::from_secs(2);
/// Blocks stored per batch (one batch at a time under the upload gate).
const BATCH: usize = 32;
/// Nothing to upload: look again after this long.
const IDLE: Duration = Duration::from_millis(500);
const SETTINGS: &str = "upload.json";

/// `POST /sessions/{vm}/upload`, also kept as `upload.json` while on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UploadRequest {
    /// `latency=MS,queue=N`: back off when the guest's I/O is this slow.
    pub load_limit: Option<String>,
}

/// The uploader of a session as `GET /sessions/{vm}/upload` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UploadStatus {
    pub vm: String,
    pub running: bool,
    /// `starting`, `copying`, `throttled`, `halted`, `idle` (nothing
    /// left), `paused` (a live backup runs), `stopped`, `failed`.
    pub state: String,
    pub why: String,
    pub load: Option<Load>,
    pub load_limit: Option<LoadLimit>,
    /// The dirty-map generation being uploaded.
    pub generation: u64,
    /// Dirty blocks with a valid upload entry: a backup now takes them
    /// without reading.
    pub blocks_uploaded: u64,
    /// Staged dirty blocks without one: what a backup now would read.
    pub residue: u64,
    /// Valid entries found when this run started (a resumed record).
    pub resumed_entries: u64,
    /// Blocks this run stored and recorded.
    pub stored_blocks: u64,
    pub bytes_read: u64,
    pub new_bytes: u64,
    /// Stored blocks a guest write reached before they were recorded.
    pub raced_blocks: u64,
    /// Time the guest's load held the uploader back.
    pub held_ms: f64,
    pub error: Option<String>,
}

/// Shared between the uploader thread and whoever watches or stops it.
#[derive(Default)]
pub(crate) struct Control {
    stop: AtomicBool,
    status: Mutex<UploadStatus>,
}

pub(crate) struct Job {
    ctl: Arc<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Job {
    fn stop(&mut self) {
        let t = self.ask_stop();
        join(&self.ctl, t);
    }

    /// Tells the thread to stop; it is the caller's to [`join`].
    fn ask_stop(&mut self) -> Option<std::thread::JoinHandle<()>> {
        self.ctl.stop.store(true, Ordering::Release);
        self.thread.take()
    }

    pub(crate) fn status(&self, s: &Session) -> UploadStatus {
        let mut st = self.ctl.status.lock().clone();
        st.running = self.thread.as_ref().is_some_and(|t| !t.is_finished());
        let (up, residue) = figures(s);
        st.blocks_uploaded = up;
        st.residue = residue;
        st.generation = s.backup_base.lock().generation;
        st
    }
}

/// Waits for a stopped uploader's thread.
fn join(ctl: &Control, thread: Option<std::thread::JoinHandle<()>>) {
    if let Some(t) = thread {
        if t.join().is_err() {
            ctl.status.lock().error = Some("the uploader panicked".into());
        }
    }
}

/// Valid entries and residue over the session's disks.
fn figures(s: &Session) -> (u64, u64) {
    let mut up = 0;
    let mut residue = 0;
    for d in &s.disks {
        let u = d.uploaded();
        up += u.as_ref().map_or(0, |u| u.count());
        residue += d.upload_todo(u.as_deref()).len() as u64;
    }
    (up, residue)
}

/// The session's guest I/O, as the throttle samples it.
pub(crate) struct GuestIo<'a>(pub(crate) &'a [Arc<Volume>]);

impl LoadSource for GuestIo<'_> {
    fn io(&mut self, over: Option<Duration>) -> Result<IoCounts> {
        let sum = |f: &dyn Fn(&Volume) -> (u64, u64)| {
            (self.0.iter())
                .map(|d| f(d))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        let (ops, time_ns) = sum(&|d| d.guest_io());
        Ok(IoCounts {
            ops,
            time_ns,
            tail: over.map(|o| sum(&|d| d.guest_tail(o))),
        })
    }
}

impl Datastore {
    /// Starts (or restarts with new settings) the session uploader of
    /// `vm`; remembered in the session's staging so a restarted daemon
    /// resumes it.
    pub fn start_upload(&self, vm: &str, req: UploadRequest) -> Result<UploadStatus> {
        validate_name("VM name", vm)?;
        let limit = req
            .load_limit
            .as_deref()
            .map(LoadLimit::parse)
            .transpose()?;
        if limit.is_some_and(|l| l.cpu_pct.is_some()) {
            return Err(Error::invalid(
                "load_limit: a recovered VM's uploader throttles on latency and queue, not cpu",
            ));
        }
        let op = self.vm_op(vm);
        let _op = op.lock();
        let s = self.served(vm)?;
        let storage = s.staging.storage().clone();
        io::replace(
            storage.as_ref(),
            &s.dir.join(SETTINGS),
            &serde_json::to_vec_pretty(&req).expect("json"),
        )?;
        spawn(&self.repo, &s, limit)?;
        self.upload_status(vm)
    }

    /// The uploader's status (`stopped` after a stop); not found if it was
    /// never started in this session.
    pub fn upload_status(&self, vm: &str) -> Result<UploadStatus> {
        validate_name("VM name", vm)?;
        let s = self.served(vm)?;
        let job = s.upload.lock();
        let job = job
            .as_ref()
            .ok_or_else(|| Error::not_found(format!("no uploader for VM {vm}")))?;
        Ok(job.status(&s))
    }

    /// Stops the uploader (its entries stay valid for the next backup)
    /// and forgets that it was on: a restarted daemon does not resume it.
    /// The stopped job stays in the session, so its status says `stopped`
    /// (with what it uploaded) until a start or the release.
    pub fn stop_upload(&self, vm: &str) -> Result<UploadStatus> {
        validate_name("VM name", vm)?;
        let op = self.vm_op(vm);
        let _op = op.lock();
        let s = self.served(vm)?;
        let p = s.dir.join(SETTINGS);
        let storage = s.staging.storage().clone();
        storage
            .remove_file(&p)
            .map_err(|e| Error::io(format!("remove {}", p.display()), e))?;
        io::sync_parent(storage.as_ref(), &p)?;
        // Joined outside the slot's lock: a status asked meanwhile must
        // not wait on the thread (nor find no uploader).
        let (ctl, thread) = {
            let mut slot = s.upload.lock();
            let job = slot
                .as_mut()
                .ok_or_else(|| Error::not_found(format!("no uploader for VM {vm}")))?;
            (job.ctl.clone(), job.ask_stop())
        };
        join(&ctl, thread);
        {
            let mut st = ctl.status.lock();
            if st.error.is_none() {
                st.state = "stopped".into();
            }
        }
        Ok(Job { ctl, thread: None }.status(&s))
    }
}

/// Starts the uploader of a session just recovered if it was on.
pub(crate) fn resume(repo: &Arc<Repository>, s: &Arc<Session>) {
    let p = s.dir.join(SETTINGS);
    let req = match s.staging.storage().read(&p, 4096) {
        Ok(Some(b)) => serde_json::from_slice::<UploadRequest>(&b).map_err(|e| e.to_string()),
        Ok(None) => return,
        Err(e) => Err(e.to_string()),
    };
    let r = req.and_then(|r| {
        r.load_limit
            .as_deref()
            .map(LoadLimit::parse)
            .transpose()
            .map_err(|e| e.to_string())
    });
    match r.map(|limit| spawn(repo, s, limit).map_err(|e| e.to_string())) {
        Ok(Ok(())) => tracing::info!(vm = %s.vm, "session uploader resumed"),
        Ok(Err(e)) | Err(e) => {
            tracing::error!(vm = %s.vm, "session uploader not resumed ({}): {e}", p.display())
        }
    }
}

/// Stops a session's uploader (release, shutdown), keeping `upload.json`.
pub(crate) fn halt(s: &Session) {
    if let Some(mut j) = s.upload.lock().take() {
        j.stop();
    }
}

fn spawn(repo: &Arc<Repository>, s: &Arc<Session>, limit: Option<LoadLimit>) -> Result<()> {
    halt(s);
    let ctl = Arc::new(Control::default());
    {
        let mut st = ctl.status.lock();
        st.vm = s.vm.clone();
        st.state = "starting".into();
        st.load_limit = limit;
        st.resumed_entries = s
            .disks
            .iter()
            .filter_map(|d| d.uploaded())
            .map(|u| u.count())
            .sum();
    }
    let (repo, sess, c) = (repo.clone(), s.clone(), ctl.clone());
    let thread = std::thread::Builder::new()
        .name(format!("upload-{}", s.vm))
        .spawn(move || {
            let _span = tracing::info_span!("upload", vm = %sess.vm).entered();
            let mut up = Uploader::new(repo, &sess, &c, limit);
            let r = up.run();
            up.finish();
            let mut st = c.status.lock();
            match r {
                Ok(()) => st.state = "stopped".into(),
                Err(e) => {
                    tracing::error!(vm = %sess.vm, "session uploader failed: {e}");
                    st.state = "failed".into();
                    st.error = Some(e.to_string());
                }
            }
        })
        .map_err(|e| Error::io("start the session uploader", e))?;
    *s.upload.lock() = Some(Job {
        ctl,
        thread: Some(thread),
    });
    Ok(())
}

struct Uploader<'a> {
    repo: Arc<Repository>,
    s: &'a Session,
    ctl: &'a Control,
    throttle: Throttle,
    lock: Option<WriterLock>,
    last_sync: Instant,
    /// (disk, block) still to store, from one scan of the dirty maps, and
    /// the generation it was made for: a scan per pass, not per batch.
    queue: std::collections::VecDeque<(usize, u64)>,
    queued: Option<u64>,
}

impl<'a> Uploader<'a> {
    fn new(
        repo: Arc<Repository>,
        s: &'a Session,
        ctl: &'a Control,
        limit: Option<LoadLimit>,
    ) -> Uploader<'a> {
        Uploader {
            repo,
            s,
            ctl,
            throttle: Throttle::new(limit, None),
            lock: None,
            last_sync: Instant::now(),
            queue: Default::default(),
            queued: None,
        }
    }

    fn limited(&self) -> bool {
        self.ctl.status.lock().load_limit.is_some()
    }

    fn stopping(&self) -> bool {
        self.ctl.stop.load(Ordering::Acquire)
    }

    fn go_on(&self) -> bool {
        go_on(self.s, self.ctl)
    }

    fn set(&self, f: impl FnOnce(&mut UploadStatus)) {
        f(&mut self.ctl.status.lock());
    }

    fn run(&mut self) -> Result<()> {
        // With a limit, nothing is read before the guest's load is known.
        while self.limited() && self.throttle.load.is_none() && !self.stopping() {
            std::thread::sleep(Duration::from_millis(20));
            self.throttle.sample(&mut GuestIo(&self.s.disks))?;
        }
        while !self.stopping() {
            if self.s.disks.iter().any(|d| d.is_failed()) {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "a disk of VM {} has failed; nothing more is uploaded",
                        self.s.vm
                    ),
                ));
            }
            if !self.go_on() {
                self.set(|st| st.state = "paused".into());
                self.sleep(IDLE);
                continue;
            }
            // Waits here while the guest is too busy, outside the gate.
            let held0 = self.throttle.held;
            let (s, ctl) = (self.s, self.ctl);
            self.throttle.before_read_watched(
                &mut GuestIo(&s.disks),
                &|| go_on(s, ctl),
                &mut |t| publish(ctl, t, false),
            )?;
            self.held(held0);
            let did = {
                let _gate = self.s.upload_gate.lock();
                self.batch()?
            };
            self.checkpoint(false)?;
            if did == 0 {
                self.set(|st| {
                    if st.state != "throttled" && st.state != "halted" {
                        st.state = "idle".into();
                    }
                });
                // Held while any entry names a chunk no manifest does yet
                // (also entries resumed after a restart); else gc may run.
                if figures(self.s).0 == 0 {
                    self.lock = None;
                } else if self.lock.is_none() {
                    self.lock = Some(WriterLock::acquire(&self.repo, &self.s.vm)?);
                }
                self.sleep(IDLE);
            }
        }
        Ok(())
    }

    fn sleep(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end && !self.stopping() {
            std::thread::sleep(Duration::from_millis(20));
            // Keep the load figures current for the status.
            let _ = self.throttle.sample(&mut GuestIo(&self.s.disks));
        }
        publish(self.ctl, &self.throttle, false);
    }

    /// Adds the time the throttle held the uploader back since `held0`.
    fn held(&self, held0: Duration) {
        let held = (self.throttle.held - held0).as_secs_f64() * 1000.0;
        self.set(|st| st.held_ms += held);
    }

    /// Makes the entries written so far durable (every `CHECKPOINT`, or
    /// `now`).
    fn checkpoint(&mut self, now: bool) -> Result<()> {
        if !now && self.last_sync.elapsed() < CHECKPOINT {
            return Ok(());
        }
        for d in &self.s.disks {
            if let Some(u) = d.uploaded() {
                u.sync()?;
            }
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    fn finish(&mut self) {
        if let Err(e) = self.checkpoint(true) {
            tracing::warn!(vm = %self.s.vm, "upload record not synced at stop (its entries are uploaded again): {e}");
        }
    }

    /// Stores the next batch (blocks of one disk); the blocks it read (0:
    /// nothing to do, or interrupted).
    /// Runs under the upload gate, so the generation cannot change.
    fn batch(&mut self) -> Result<u64> {
        let generation = self.s.backup_base.lock().generation;
        let mut records = vec![];
        for d in &self.s.disks {
            let storage = self.s.staging.storage();
            records.push(record(storage.as_ref(), &self.s.dir, d, generation)?);
        }
        if self.queued != Some(generation) {
            self.queue.clear();
            self.queued = Some(generation);
        }
        if self.queue.is_empty() {
            for (i, (d, u)) in self.s.disks.iter().zip(&records).enumerate() {
                self.queue
                    .extend(d.upload_todo(Some(u)).into_iter().map(|b| (i, b)));
            }
        }
        let Some(&(i, _)) = self.queue.front() else {
            return Ok(0);
        };
        let (d, u) = (&self.s.disks[i], &records[i]);
        let mut batch = vec![];
        while batch.len() < BATCH {
            match self.queue.front() {
                Some(&(j, b)) if j == i => {
                    self.queue.pop_front();
                    // Recorded since the scan (by an earlier batch): done.
                    if u.get(b).is_none() {
                        batch.push(b);
                    }
                }
                _ => break,
            }
        }
        if batch.is_empty() {
            // Everything queued was done meanwhile: look again.
            return Ok(1);
        }
        // Taken before the first chunk of ours a manifest does not name
        // yet (see the module docs).
        if self.lock.is_none() {
            self.lock = Some(WriterLock::acquire(&self.repo, &self.s.vm)?);
        }
        self.store(d, u, &batch)
    }

    fn store(&mut self, d: &Volume, u: &Uploaded, batch: &[u64]) -> Result<u64> {
        let _span = tracing::debug_span!("disk", disk = d.index).entered();
        let held0 = self.throttle.held;
        let stamps = std::sync::Mutex::new(HashMap::new());
        let throttle = std::sync::Mutex::new(&mut self.throttle);
        let s = self.s;
        let ctl = self.ctl;
        let go_on = || go_on(s, ctl);
        let read = |b: u64, buf: &mut [u8]| -> Result<()> {
            let mut t = throttle.lock().expect("throttle lock");
            t.before_read_watched(&mut GuestIo(&s.disks), &go_on, &mut |t| {
                publish(ctl, t, true)
            })?;
            if !go_on() {
                return Err(Error::busy("upload interrupted"));
            }
            let t0 = Instant::now();
            let stamp = d.read_for_upload(b, buf)?;
            t.after_read(t0.elapsed(), buf.len() as u64, &go_on);
            stamps.lock().expect("stamps lock").insert(b, stamp);
            Ok(())
        };
        let st = match store_chunks(
            &self.repo,
            d.size,
            d.block_size() as u32,
            batch.iter().copied(),
            &read,
            &|_| {},
        ) {
            Ok(st) => st,
            Err(e) if e.kind() == ErrorKind::Busy && !go_on() => return Ok(0),
            Err(e) => return Err(e),
        };
        // Stored under a lock others still trust: gc cannot have taken them.
        self.lock
            .as_ref()
            .expect("taken before a batch")
            .check_fresh()?;
        let stamps = stamps.into_inner().expect("stamps lock");
        let done: Vec<_> = (st.chunks.iter())
            .filter_map(|(b, c)| Some((*b, stamps.get(b).copied().flatten()?, *c)))
            .collect();
        let recorded = d.record_uploads(u, &done)?;
        let raced = st.chunks.len() as u64 - recorded;
        self.held(held0);
        self.set(|x| {
            x.stored_blocks += recorded;
            x.raced_blocks += raced;
            x.bytes_read += st.read_bytes;
            x.new_bytes += st.new_bytes;
        });
        // Work was done even if every block raced: not idle.
        Ok(st.chunks.len() as u64)
    }
}

/// The throttle's figures in the status; the state is the gate's while it
/// holds the uploader back, else `copying` if `working` (else it stays what
/// it was: idle, paused).
fn publish(ctl: &Control, t: &Throttle, working: bool) {
    let mut st = ctl.status.lock();
    st.load = t.load;
    if t.gate != Gate::Copying {
        st.state = t.gate.name().into();
        st.why = t.why.clone();
    } else if working || st.state == "throttled" || st.state == "halted" {
        st.state = t.gate.name().into();
        st.why.clear();
    }
}

/// Neither stopped nor asked to make way for a live backup.
fn go_on(s: &Session, ctl: &Control) -> bool {
    !ctl.stop.load(Ordering::Acquire) && !s.backup_running.load(Ordering::Acquire)
}

/// The disk's record of generation `g`, created (empty, durably) if it has
/// none. Called under the upload gate.
fn record(storage: &dyn Storage, dir: &Path, d: &Volume, g: u64) -> Result<Arc<Uploaded>> {
    if let Some(u) = d.uploaded().filter(|u| u.generation() == g) {
        return Ok(u);
    }
    let rec = UploadRecord::create(
        storage,
        &uploaded_path(dir, d.index, g),
        d.block_size() as u32,
        d.nblocks(),
        g,
    )?;
    let u = Uploaded::new(rec, Default::default(), d.nblocks());
    d.set_uploaded(Some(u.clone()));
    Ok(u)
}

/// A live backup's part (see `backup`): for each disk with a record, the
/// next generation's empty one, created durably before the freeze.
pub(crate) fn next_records(
    storage: &dyn Storage,
    dir: &Path,
    disks: &[Arc<Volume>],
    g: u64,
) -> Result<Vec<Option<Arc<Uploaded>>>> {
    disks
        .iter()
        .map(|d| {
            if d.uploaded().is_none() {
                return Ok(None);
            }
            let rec = UploadRecord::create(
                storage,
                &uploaded_path(dir, d.index, g + 1),
                d.block_size() as u32,
                d.nblocks(),
                g + 1,
            )?;
            Ok(Some(Uploaded::new(rec, Default::default(), d.nblocks())))
        })
        .collect()
}
