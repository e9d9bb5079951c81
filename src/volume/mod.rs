//! A live virtual disk: the read/write/flush API every frontend (FUSE now,
//! NFS and NBD later) calls. It joins a backup's chunk list with a staging
//! store.
//!
//! * A read of a staged block is a read of the staging file.
//! * A read of a missing block starts a fetch (at most one per block, via
//!   the in-flight table; see `fetch` for its stages) and waits for it.
//!   The fetch hands the verified bytes to its in-flight slot, where
//!   waiting readers take their ranges from memory at once, then writes
//!   them to staging and marks the block present; only then does the fill
//!   end, so a write to the block (which waits for the fill) always lands
//!   after the fetched bytes. A reader never reads staging back. Other
//!   fills (zero chunks, a write's claim) leave no bytes: those readers
//!   wait for the fill and read staging. A write's claim ends `Ok` for its
//!   waiters even when the write failed (the error is the writer's): they
//!   plan again and fetch the block, which is still the backup's.
//! * A zero chunk that is not staged reads as zeros without any I/O.
//! * A write marks its blocks changed (durably, first), fills a partly
//!   covered missing block from the backup, then writes the staging file.
//! * `flush` makes data, then the presence map, then the changed map
//!   durable. Concurrent flushes are grouped: one syncs for all waiting.
//! * While a live backup runs (see `freeze`), a write also marks the next
//!   generation's dirty map and first copies the freeze-time bytes of a
//!   frozen block the backup has not read yet aside.
//!
//! The in-flight table's lock is held only to decide who fills a block; all
//! I/O happens outside it, so a slow fetch never blocks reads of staged
//! blocks; nor does the export point's queue, where staged I/O takes no
//! slot (`IoQueue::enter_staged`). Every fetch goes through the daemon's one [`Scheduler`] with a
//! class: a guest waiting on a block that a prefetch queued promotes that
//! job, so each block is fetched once, whoever needed it first.
//!
//! **Lock order of writes.** A write claims the blocks it fully covers (so
//! readers wait for its data, not the backup's) and waits for the fills of
//! the blocks it partly covers. It does both in ascending block order, and
//! never waits on a block while holding a claim on a higher one, so two
//! overlapping writes can never wait on each other in a cycle.
//!
//! **Failure is sticky.** Once a sync of this disk's staging fails, the
//! kernel may have dropped data that a later sync would then report as
//! durable; so, as QEMU does after a failed flush, every later flush fails
//! until the session is released, and no presence bit is persisted again.
//! Writes fail too (reads go on): bytes that can never be made durable are
//! better refused than silently lost.
//!
//! **Release.** `close` ends fetching: a fetch still running writes nothing
//! to staging after `close` returns, so a later session on the same staging
//! never sees a released session's writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use serde::Serialize;

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::metrics::{Counter, LatencyHistogram};
use crate::prefetch::scheduler::{tenant_of, Job};
use crate::prefetch::stream::Detector;
use crate::prefetch::tracker::{ProfileFigures, RecordWindow, Tracker};
use crate::prefetch::{Class, Scheduler};
use crate::repo::{ChunkIndex, DiskManifest, Manifest, Repository};
use crate::staging::io::BlockFile;
use crate::staging::{DiskStore, PersistentBitmap};

mod evict;
mod fetch;
mod freeze;
mod passthrough;
mod read;
mod relocation;
mod stripes;
mod upload;
mod write;

pub use freeze::Frozen;
pub(crate) use relocation::CopyRead;
pub use upload::Uploaded;

/// Where one block fill stands; readers and writers wait on it.
struct Slot {
    done: Mutex<Option<Result<()>>>,
    cv: Condvar,
    /// The queued fetch, or (before it is queued) the most urgent class a
    /// waiter asked for; one lock so a promotion is never lost.
    job: Mutex<(Option<Arc<Job>>, Class)>,
    /// Room taken in the staging budget for this fill (see `evict`).
    reserved: AtomicBool,
    /// A fetch's verified plain bytes, set before its staging write and
    /// `finish`: its readers answer from them at once (they live as long
    /// as the slot's last waiter, or the last reply that borrows them).
    data: OnceLock<Bytes>,
    /// Readers that hold no thread (`Volume::read_later`): run by whoever
    /// sets `data` or ends the fill, whichever comes first; `None` once
    /// they ran (later ones run at once). Locked before `done` where both
    /// are (`when_data`); `finish` never nests them.
    then: Mutex<Option<Vec<Reader>>>,
}

/// A reader waiting for a fill without a thread (see `Slot::when_data`).
type Reader = Box<dyn FnOnce() + Send>;

impl Slot {
    fn new(class: Class) -> Arc<Slot> {
        Arc::new(Slot {
            done: Mutex::new(None),
            cv: Condvar::new(),
            job: Mutex::new((None, class)),
            reserved: AtomicBool::new(false),
            data: OnceLock::new(),
            then: Mutex::new(Some(Vec::new())),
        })
    }

    /// A waiter of class `class` wants this fill sooner.
    fn promote(&self, sched: &Scheduler, class: Class) {
        let mut j = self.job.lock();
        match &j.0 {
            Some(job) => sched.promote(job, class),
            None => j.1 = j.1.min(class),
        }
    }

    fn finish(&self, r: Result<()>) {
        *self.done.lock() = Some(r);
        self.cv.notify_all();
        self.run_readers();
    }

    /// A fetch's verified bytes, before they are staged: readers answer
    /// from them now; writers still wait for `finish` (the staging write
    /// and the presence bit come first).
    fn set_data(&self, data: Bytes) {
        let _ = self.data.set(data);
        // Under `done`'s lock: a reader in `wait_data` checks both under it.
        drop(self.done.lock());
        self.cv.notify_all();
        self.run_readers();
    }

    fn run_readers(&self) {
        let then = self.then.lock().take();
        for f in then.into_iter().flatten() {
            // Each answers a guest request: one reply that panics must not
            // leave the others unanswered (they were taken off the slot).
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                tracing::error!(
                    "a read's reply panicked: {}",
                    crate::util::panic_message(&p)
                );
            }
        }
    }

    /// Runs `f` once the fill's bytes are there or the fill has ended:
    /// now if so, else on the thread that gets there first (a fetch engine
    /// CPU thread). `f` must not wait.
    fn when_data(&self, f: Reader) {
        let mut then = self.then.lock();
        if let Some(waiting) = then.as_mut() {
            if self.data.get().is_none() && self.done.lock().is_none() {
                waiting.push(f);
                return;
            }
        }
        drop(then);
        f()
    }

    /// The fill's outcome, once it has ended.
    fn outcome(&self) -> Option<Result<()>> {
        self.done.lock().clone()
    }

    fn wait(&self) -> Result<()> {
        let mut g = self.done.lock();
        while g.is_none() {
            self.cv.wait(&mut g);
        }
        g.as_ref().expect("set").clone()
    }

    /// Waits until the fetched bytes are there (they may not be staged
    /// yet) or the fill has ended; the bytes, or the fill's outcome.
    fn wait_data(&self) -> Result<Option<&Bytes>> {
        let mut g = self.done.lock();
        loop {
            if let Some(d) = self.data.get() {
                return Ok(Some(d));
            }
            if let Some(r) = g.as_ref() {
                return r.clone().map(|()| None);
            }
            self.cv.wait(&mut g);
        }
    }
}

/// The outcome of asking for a block under the in-flight lock.
enum Claim {
    Present,
    /// Someone else is filling it: wait.
    Wait(Arc<Slot>),
    /// We fill it and must end it (`complete`; a write: `complete_claim`).
    Owner(Arc<Slot>),
}

#[derive(Default)]
pub struct VolumeStats {
    pub reads: Counter,
    pub read_bytes: Counter,
    /// Reads served without waiting for any fetch.
    pub read_hits: Counter,
    pub writes: Counter,
    pub write_bytes: Counter,
    pub fetched_blocks: Counter,
    /// Bytes transferred from the repository (compressed).
    pub fetched_bytes: Counter,
    /// Fetches that failed (GET, verification, decoding): their readers
    /// got the error.
    pub fetch_errors: Counter,
    /// Fetches whose verified bytes answered their readers but could not
    /// be written to staging (e.g. it is full): no read failed; the block
    /// stays missing and is fetched again when read.
    pub staging_write_errors: Counter,
    pub fetch_latency: LatencyHistogram,
    pub flushes: Counter,
    /// Blocks given back to keep staging under its limit (see `evict`).
    pub evicted_blocks: Counter,
    /// Reads that found a block missing after its fill (evicted, or a
    /// guest write that claimed it failed) and filled it again.
    pub refills: Counter,
    /// Reads of the staging data file on behalf of guest and internal
    /// reads (preads; a fetch's waiters answer without one).
    pub staging_reads: Counter,
    /// Guest reads that waited for a fetch holding no thread
    /// (`Volume::read_later`).
    pub later_reads: Counter,
    /// The most recent fetch failure, for status and verify-boot.
    pub last_fetch_error: Mutex<Option<String>>,
    /// The most recent failed staging write of fetched bytes, for status.
    pub last_staging_write_error: Mutex<Option<String>>,
    /// Guest reads and writes completed, and the time
    /// they took: the session uploader's load figures (see `upload`).
    pub guest_ops: Counter,
    pub guest_time_ns: Counter,
    /// Their latencies, for a p99 limit.
    pub guest_latency: LatencyHistogram,
}

pub struct Volume {
    pub vm: String,
    /// The scheduler tenant of this session's fetches (its VM name, hashed once).
    tenant: u64,
    pub backup: String,
    pub index: usize,
    pub size: u64,
    block_size: u64,
    nblocks: u64,
    chunks: ChunkIndex,
    repo: Arc<Repository>,
    store: DiskStore,
    inflight: Mutex<HashMap<u64, Arc<Slot>>>,
    /// Serialises flushes so one fsync never returns while another's map
    /// write, which its data depends on, is still pending. Holds the number
    /// of the last flush request a completed sync covered.
    flush_lock: Mutex<u64>,
    /// Flush requests so far (see `flush`: group commit).
    flush_requests: AtomicU64,
    /// The first failed sync of this disk's staging; sticky until release.
    failed: OnceLock<Error>,
    sched: Arc<Scheduler>,
    /// The export point's queue that guest requests pass (none in tests
    /// that run a bare volume).
    io: OnceLock<Arc<crate::placement::IoQueue>>,
    /// See [`Volume::watch_writes`].
    write_watch: OnceLock<Box<dyn Fn(u64, u64) + Send + Sync>>,
    pub stats: VolumeStats,
    /// First reads (the profile being recorded) and the applied profile.
    pub(crate) tracker: Tracker,
    streams: Detector,
    /// Per-block write counters (striped, see `stripes`), bumped before
    /// and after each guest write's data lands: the relocation copier
    /// compares them around a copy to know the copy saw no concurrent or
    /// later write.
    writes_started: stripes::Stripes,
    writes_finished: stripes::Stripes,
    /// The relocation's copied map while a relocation runs.
    copied: RwLock<Option<Arc<PersistentBitmap>>>,
    /// Guest writes hold it shared; the cutover and a live backup's freeze
    /// hold it exclusively.
    write_gate: RwLock<()>,
    /// Live backups' state: dirty maps, the freeze, the upload record.
    live: freeze::LiveBackup,
    /// After cutover, the primary copy that serves all I/O.
    target: OnceLock<Arc<dyn BlockFile>>,
    /// Guest requests in progress (relocation yields while > 0).
    guest_inflight: AtomicU32,
    /// Copied blocks the guest wrote again (relocation's convergence signal).
    copies_revoked: AtomicU64,
    /// Set at release: queued fetches end without I/O, so none writes into
    /// staging that a later session may already be using.
    closed: AtomicBool,
    /// This volume, for the fetch jobs it queues.
    me: std::sync::Weak<Volume>,
    /// When a guest last wrote, in ns since the epoch (0: not this session).
    modified_ns: AtomicU64,
    /// Every write to staging holds it shared and checks `closed` inside;
    /// `close` takes it exclusively, so after `close` nothing lands.
    io_gate: RwLock<()>,
    /// Giving staged blocks back under a staging limit (see `evict`).
    evict: evict::Eviction,
    /// Direct readers (FUSE passthrough opens, see `passthrough`).
    direct_readers: Mutex<u32>,
    /// Staging writes of fetched bytes fail for every miss while staging
    /// is full: their warning is rate limited.
    staging_write_log: crate::util::LogLimit,
    /// Tests only: called by a write after it claimed or waited for each
    /// block, to force an interleaving of concurrent writes.
    #[cfg(test)]
    pub(crate) claim_hook: Mutex<Option<ClaimHook>>,
    /// Tests only: called by a write for each block it claimed, after its
    /// data landed and before the block is marked present.
    #[cfg(test)]
    pub(crate) complete_hook: Mutex<Option<ClaimHook>>,
}

/// Tests only: see `Volume::claim_hook`.
#[cfg(test)]
pub(crate) type ClaimHook = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Per-disk figures for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct DiskStatus {
    pub index: usize,
    pub name: String,
    pub size: u64,
    pub block_size: u64,
    pub blocks_total: u64,
    pub blocks_staged: u64,
    pub blocks_changed: u64,
    /// Blocks written since the session's last live backup (or since
    /// recovery, before the first).
    pub blocks_dirty: u64,
    pub zero_blocks: u64,
    pub reads: u64,
    pub read_bytes: u64,
    pub read_hits: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub fetched_blocks: u64,
    pub fetched_bytes: u64,
    /// Fetches that failed: their reads failed (see `last_fetch_error`).
    pub fetch_errors: u64,
    /// Fetched blocks that could not be staged (e.g. staging is full):
    /// their reads were answered from the verified bytes; the block is
    /// fetched again when read (see `last_staging_write_error`).
    pub staging_write_errors: u64,
    pub fetch_latency_mean_ms: f64,
    pub fetch_latency_p99_ms: f64,
    pub fetches_in_flight: usize,
    pub flushes: u64,
    /// Blocks evicted to keep staging under its limit (see `evict`).
    pub evicted_blocks: u64,
    /// Reads that found a block evicted after its fill and filled it again.
    pub refills: u64,
    /// Preads of the staging data file that served reads (a miss is
    /// answered from the fetched bytes without one).
    pub staging_reads: u64,
    /// Reads that waited for a fetch holding no thread (FUSE, NBD, NFS).
    pub later_reads: u64,
    /// The kernel reads this disk's file itself for a read-only FUSE open
    /// (`serve --fuse-passthrough`): no eviction, no relocation start,
    /// and writable FUSE opens are refused until it closes.
    pub passthrough: bool,
    pub last_fetch_error: Option<String>,
    pub last_staging_write_error: Option<String>,
    /// Set once a sync of this disk's staging failed: every later flush
    /// fails with EIO until the session is released.
    pub failed: Option<String>,
    /// Share of the applied profile's blocks already staged (0..1; 1 when
    /// there is no profile to stage).
    pub profile_coverage: f64,
    /// Share of guest reads served from staging without a fetch (0..1;
    /// 1 before the first read).
    pub profile_hit_ratio: f64,
    pub profile: ProfileFigures,
}

impl Volume {
    /// Disk `index` of backup `m`, staged in `store`, its fetches queued
    /// on `sched`; first reads are recorded for the profile during
    /// `record`.
    pub fn new(
        repo: Arc<Repository>,
        m: &Manifest,
        index: usize,
        store: DiskStore,
        sched: Arc<Scheduler>,
        record: RecordWindow,
    ) -> Arc<Volume> {
        let (vm, backup, disk) = (m.vm.as_str(), m.id.as_str(), &m.disks[index]);
        let nblocks = DiskManifest::chunk_count(disk.size, disk.chunk_size);
        let mut store = store;
        let dirty = freeze::DirtyMaps {
            current: store.dirty.take().map(Arc::new),
            next: None,
        };
        let uploaded = store
            .uploaded
            .take()
            .map(|(r, e)| Uploaded::new(r, e, nblocks));
        Arc::new_cyclic(|me| Volume {
            me: me.clone(),
            modified_ns: AtomicU64::new(0),
            tenant: tenant_of(vm),
            vm: vm.into(),
            backup: backup.into(),
            index,
            size: disk.size,
            block_size: disk.chunk_size as u64,
            nblocks,
            chunks: disk.chunks.clone(),
            repo,
            store,
            inflight: Mutex::new(HashMap::new()),
            flush_lock: Mutex::new(0),
            flush_requests: AtomicU64::new(0),
            failed: OnceLock::new(),
            sched,
            io: OnceLock::new(),
            write_watch: OnceLock::new(),
            stats: VolumeStats::default(),
            tracker: Tracker::new(nblocks, record),
            streams: Detector::default(),
            writes_started: stripes::Stripes::new(nblocks),
            writes_finished: stripes::Stripes::new(nblocks),
            copied: RwLock::new(None),
            write_gate: RwLock::new(()),
            live: freeze::LiveBackup {
                dirty: RwLock::new(dirty),
                freeze: RwLock::new(None),
                uploaded: RwLock::new(uploaded),
            },
            target: OnceLock::new(),
            guest_inflight: AtomicU32::new(0),
            copies_revoked: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            io_gate: RwLock::new(()),
            evict: evict::Eviction::new(nblocks),
            direct_readers: Mutex::new(0),
            staging_write_log: crate::util::LogLimit::new(Duration::from_secs(10)),
            #[cfg(test)]
            claim_hook: Mutex::new(None),
            #[cfg(test)]
            complete_hook: Mutex::new(None),
        })
    }

    pub fn name(&self) -> String {
        format!("disk{}", self.index)
    }

    /// Puts the volume behind its export point's queue (once, before any
    /// frontend sees it).
    pub fn set_queue(&self, q: Arc<crate::placement::IoQueue>) {
        let _ = self.io.set(q);
    }

    pub fn queue(&self) -> Option<&Arc<crate::placement::IoQueue>> {
        self.io.get()
    }

    /// Registers `f`, told `(offset, length)` after every guest write to
    /// this disk, whichever frontend it came from: a frontend whose kernel
    /// caches the disk's bytes (FUSE's page cache) drops what another
    /// frontend (NBD, NFS) wrote. One per disk; false if one is set.
    pub fn watch_writes(&self, f: Box<dyn Fn(u64, u64) + Send + Sync>) -> bool {
        self.write_watch.set(f).is_ok()
    }

    pub fn writes_watched(&self) -> bool {
        self.write_watch.get().is_some()
    }

    /// A guest request's place in the export point's queue, if the disk
    /// has one: at once and apart from admission if staging alone serves
    /// `[off, off + len)`, else a slot when one is free. The presence bits
    /// are looked at only when there is a queue.
    fn enter_guest(&self, off: u64, len: u64) -> Option<crate::placement::queue::Ticket> {
        let q = self.io.get()?;
        Some(match self.is_local(off, len) {
            true => q.enter_staged(len),
            false => q.enter(crate::placement::IoClass::Sync, len),
        })
    }

    /// Bytes of the applied profile's blocks not staged yet (approximated
    /// by whole blocks).
    pub fn profile_remaining_bytes(&self) -> u64 {
        let f = self.tracker.figures(|b| self.store.present.test(b));
        f.blocks.saturating_sub(f.staged) * self.block_size
    }

    /// Bytes of blocks with data in the backup that are not staged yet.
    pub fn unstaged_bytes(&self) -> u64 {
        if self.target.get().is_some() {
            return 0;
        }
        (self.chunks.iter_present())
            .filter(|&(b, _)| !self.store.present.test(b))
            .map(|(b, _)| self.block_len(b))
            .sum()
    }

    fn block_len(&self, b: u64) -> u64 {
        (self.size - b * self.block_size).min(self.block_size)
    }

    fn blocks(&self, off: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        off / self.block_size..(off + len - 1) / self.block_size + 1
    }

    /// True if a read of the range needs no fetch: frontends serve such
    /// reads on their event threads and hand the rest to I/O workers.
    pub fn is_local(&self, off: u64, len: u64) -> bool {
        if self.target.get().is_some() {
            return true;
        }
        let len = len.min(self.size.saturating_sub(off));
        self.blocks(off, len)
            .all(|b| self.store.present.test(b) || !self.chunks.has_data(b))
    }

    /// True if a write of the range neither waits for a fetch nor syncs a
    /// map or the upload record nor waits for another writer's map sync
    /// (every block staged and durably marked changed, no valid upload
    /// entry to clear; a copy is revoked in memory) nor waits out a
    /// cutover's pause: frontends may serve it on an event thread.
    pub fn write_is_quick(&self, off: u64, len: u64) -> bool {
        if self.write_gate.is_locked_exclusive() {
            return false;
        }
        let len = len.min(self.size.saturating_sub(off));
        if self.target.get().is_some() {
            return self.blocks(off, len).all(|b| {
                self.store.changed.test_durable(b)
                    && self.dirty_is_quick(b)
                    && self.upload_is_quick(b)
            });
        }
        self.blocks(off, len).all(|b| {
            self.store.present.test(b)
                && self.store.changed.test_durable(b)
                && self.dirty_is_quick(b)
                && self.upload_is_quick(b)
        })
    }

    fn claim(&self, b: u64, class: Class) -> Claim {
        if self.store.present.test(b) {
            return Claim::Present;
        }
        let mut map = self.inflight.lock();
        if self.store.present.test(b) {
            return Claim::Present;
        }
        if let Some(s) = map.get(&b) {
            return Claim::Wait(s.clone());
        }
        let s = Slot::new(class);
        map.insert(b, s.clone());
        Claim::Owner(s)
    }

    /// Ends a fill: on success the block is present before it leaves the
    /// in-flight table, so no second fetch can start in between.
    fn complete(&self, b: u64, slot: &Slot, r: Result<()>) {
        self.release_fill(b, slot, r.is_ok());
        slot.finish(r);
    }

    /// Ends a guest write's claim on `b`: the block is present if the
    /// write's data landed. Its waiters (readers, the copier, other
    /// writers) are told `Ok` either way: a failed write's error is its
    /// own caller's, and the block is then as the claim found it (not
    /// staged, the backup's bytes), so a waiter plans again (reads staging
    /// or fetches) instead of failing for a write it did not make.
    fn complete_claim(&self, b: u64, slot: &Slot, landed: bool) {
        self.release_fill(b, slot, landed);
        slot.finish(Ok(()));
    }

    /// A fill's block leaves the in-flight table, present first if `ok`.
    fn release_fill(&self, b: u64, slot: &Slot, ok: bool) {
        if ok {
            // Outside the in-flight lock (it writes the same-boot mirror),
            // yet before the block leaves the table: no second fetch starts.
            self.store.present.set(b);
            self.touch(b);
        }
        self.settle(slot, ok);
        self.inflight.lock().remove(&b);
    }

    /// Ends a fill that left nothing in staging (the copier's fetch): the
    /// block stays missing, its waiters answer from the slot's bytes.
    fn complete_unstaged(&self, b: u64, slot: &Slot, r: Result<()>) {
        self.settle(slot, false);
        self.inflight.lock().remove(&b);
        slot.finish(r);
    }

    /// Starts filling block `b` from the backup unless it is present, at
    /// priority `class`. Returns a slot to wait on, or `None` when the
    /// block is already local.
    fn start_fill(&self, b: u64, class: Class) -> Option<Arc<Slot>> {
        match self.claim(b, class) {
            Claim::Present => None,
            Claim::Wait(s) => {
                s.promote(&self.sched, class);
                Some(s)
            }
            Claim::Owner(s) => {
                match self.chunks.get(b) {
                    None => {
                        let r = self.admit(&s).and_then(|()| self.zero_fill(b));
                        self.complete(b, &s, r);
                    }
                    Some(_) => self.queue_fetch(b, &s, true),
                }
                Some(s)
            }
        }
    }

    /// Starts fetching `b` in the background unless it is local or
    /// already coming; true if this queued a fetch or raised its class.
    /// Never after cutover: the disk reads its target, and staging would
    /// only fill with blocks nobody reads.
    pub fn prefetch_block(&self, b: u64, class: Class) -> bool {
        if b >= self.nblocks
            || !self.chunks.has_data(b)
            || self.store.present.test(b)
            || self.is_switched()
        {
            return false;
        }
        self.start_fill(b, class).is_some()
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::busy(format!(
                "disk{} of VM {} was released",
                self.index, self.vm
            )));
        }
        Ok(())
    }

    /// Every write into staging: never after `close` returned.
    fn staging_write(&self, data: &[u8], off: u64) -> Result<()> {
        self.staging_io("write", |f| f.write_all_at(data, off))
    }

    /// [`Volume::staging_write`] of a fetched block: past the page cache
    /// where the filesystem allows (`BlockFile::write_fill_at`).
    fn staging_fill(&self, data: &[u8], off: u64) -> Result<()> {
        self.staging_io("write", |f| f.write_fill_at(data, off))
    }

    /// One change to the staging file, under the I/O gate and only while
    /// the disk is open; `what` names it in the error.
    fn staging_io(
        &self,
        what: &str,
        op: impl FnOnce(&dyn crate::staging::BlockFile) -> std::io::Result<()>,
    ) -> Result<()> {
        let _g = self.io_gate.read();
        self.check_open()?;
        op(self.store.data.as_ref())
            .ctx(|| format!("{what} staging {}", self.store.data_path.display()))
    }

    /// Makes a zero block's staging range read as zeros (it may hold
    /// leftovers of a write that was never acknowledged before a crash).
    fn zero_fill(&self, b: u64) -> Result<()> {
        self.staging_zero(b * self.block_size, self.block_len(b))
    }

    /// Zeros a staging range (a hole where the filesystem can punch one);
    /// like every staging write, never after `close`.
    fn staging_zero(&self, off: u64, len: u64) -> Result<()> {
        self.staging_io("zero", |f| f.punch_hole(off, len))
    }

    /// Waits for each fill to end: the first error of a fill that left no
    /// bytes. A fetch whose staging write failed after its bytes were
    /// verified still answers readers from them.
    fn wait_fills<'a>(slots: impl IntoIterator<Item = &'a Arc<Slot>>) -> Result<()> {
        let mut first = Ok(());
        for s in slots {
            if let Err(e) = s.wait() {
                if s.data.get().is_none() && first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Makes every write and fetch completed before the call durable: data
    /// first, then the presence map (from a snapshot taken before the data
    /// sync), then the changed map. Only then may a guest's fsync be
    /// answered. Concurrent calls are grouped: a sync that started after a
    /// call was made covers it, so waiting callers share one sync.
    pub fn flush(&self) -> Result<()> {
        let me = self.flush_requests.fetch_add(1, Ordering::AcqRel) + 1;
        let mut covered = self.flush_lock.lock();
        self.check_failed()?;
        if *covered >= me {
            return Ok(());
        }
        // Every request numbered up to here was made before this sync starts.
        let upto = self.flush_requests.load(Ordering::Acquire);
        self.sync_all()?;
        *covered = upto;
        self.stats.flushes.add(1);
        Ok(())
    }

    fn sync_all(&self) -> Result<()> {
        if let Some(t) = self.target.get() {
            return t
                .sync_data()
                .ctx(|| format!("fsync relocated disk{}", self.index))
                .map_err(|e| self.fail(e));
        }
        let snap = self.store.present.snapshot_if_dirty();
        if let Err(e) = self.store.data.sync_data() {
            return Err(self.fail(Error::io(
                format!("fsync {}", self.store.data_path.display()),
                e,
            )));
        }
        if let Some(s) = snap {
            self.store
                .present
                .write_snapshot(&s)
                .map_err(|e| self.fail(e))?;
        }
        self.store.changed.persist().map_err(|e| self.fail(e))
    }

    /// Records the first failed sync (logged once, naming the disk) and
    /// returns the sticky error every later flush gets.
    fn fail(&self, e: Error) -> Error {
        if self.failed.set(e.clone()).is_ok() {
            // Pages the mirror describes may be gone: a restart must not
            // trust it, and NFS clients must resend (the epoch changes).
            self.store.present.poison_mirror();
            tracing::error!(
                vm = %self.vm,
                disk = self.index,
                "staging of disk{} of VM {} failed: {e}; every later flush of this disk fails until the session is released",
                self.index,
                self.vm
            );
        }
        self.failed_error().unwrap_or(e)
    }

    pub(crate) fn failed_error(&self) -> Option<Error> {
        self.failed.get().map(|first| {
            Error::new(
                ErrorKind::Io,
                format!(
                    "disk{} of VM {} has failed ({first}); writes since its last good flush may be lost; release the session",
                    self.index, self.vm
                ),
            )
        })
    }

    fn check_failed(&self) -> Result<()> {
        match self.failed_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// True once a sync of this disk failed (see `flush`).
    pub fn is_failed(&self) -> bool {
        self.failed.get().is_some()
    }

    /// Extents of `[off, off + len)`: a zero chunk not staged is a hole;
    /// staged blocks are local; changed blocks were written by the guest.
    /// After a cutover everything is local on the target.
    /// Walked by runs: each extent ends where the changed map, the
    /// presence map or (for blocks not staged) the backup's data runs
    /// change, found a bitmap word or a chunk run at a time.
    pub fn block_status(&self, off: u64, len: u64) -> Vec<crate::disk::Extent> {
        let switched = self.target.get().is_some();
        let (present, changed) = (self.store.present.bits(), self.store.changed.bits());
        // The end of the run of bits in `[b, to)` equal to bit `b`.
        let same = |m: &crate::staging::AtomicBitmap, b: u64, to: u64| match m.test(b) {
            true => m.next_clear(b, to),
            false => m.next_set(b, to),
        };
        crate::disk::extents_by_runs(self.size, self.block_size, off, len, |b, to| {
            let staged = switched || present.test(b);
            let data = self.chunks.has_data(b);
            let mut end = same(changed, b, to);
            if !switched {
                end = same(present, b, end);
            }
            if !staged {
                let data_end = match data {
                    true => self.chunks.data_end(b),
                    false => self.chunks.next_data(b).unwrap_or(to),
                };
                end = end.min(data_end);
            }
            let hole = !staged && !data;
            let flags = crate::disk::ExtentFlags {
                hole,
                zero: hole,
                staged,
                changed: changed.test(b),
            };
            (flags, end)
        })
    }

    /// Changed blocks as half-open block ranges.
    pub fn changed_ranges(&self) -> Vec<(u64, u64)> {
        self.store.changed.bits().ranges()
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn status(&self) -> DiskStatus {
        let s = &self.stats;
        let profile = self.tracker.figures(|b| self.store.present.test(b));
        let ratio = |num: u64, den: u64| {
            if den == 0 {
                1.0
            } else {
                num as f64 / den as f64
            }
        };
        DiskStatus {
            profile_coverage: ratio(profile.staged, profile.blocks),
            profile_hit_ratio: ratio(s.read_hits.get(), s.reads.get()),
            profile,
            index: self.index,
            name: self.name(),
            size: self.size,
            block_size: self.block_size,
            blocks_total: self.nblocks,
            blocks_staged: self.store.present.bits().count(),
            blocks_changed: self.store.changed.bits().count(),
            blocks_dirty: self.blocks_dirty(),
            zero_blocks: self.chunks.zero_chunks(),
            reads: s.reads.get(),
            read_bytes: s.read_bytes.get(),
            read_hits: s.read_hits.get(),
            writes: s.writes.get(),
            write_bytes: s.write_bytes.get(),
            fetched_blocks: s.fetched_blocks.get(),
            fetched_bytes: s.fetched_bytes.get(),
            fetch_errors: s.fetch_errors.get(),
            staging_write_errors: s.staging_write_errors.get(),
            fetch_latency_mean_ms: s.fetch_latency.mean_us() / 1000.0,
            fetch_latency_p99_ms: s.fetch_latency.quantile_us(0.99) / 1000.0,
            fetches_in_flight: self.inflight.lock().len(),
            flushes: s.flushes.get(),
            evicted_blocks: s.evicted_blocks.get(),
            refills: s.refills.get(),
            staging_reads: s.staging_reads.get(),
            later_reads: s.later_reads.get(),
            passthrough: self.direct_readers() > 0,
            last_fetch_error: s.last_fetch_error.lock().clone(),
            last_staging_write_error: s.last_staging_write_error.lock().clone(),
            failed: self.failed.get().map(|e| e.to_string()),
        }
    }

    /// Ends the volume's fetching and writing (at release): queued fetches
    /// finish without touching the repository or staging, and once this
    /// returns no running fetch or write can still land in staging.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        drop(self.io_gate.write());
        self.detach_budget();
    }

    /// Waits for in-flight fills to settle (used before release/shutdown).
    pub fn quiesce(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.inflight.lock().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl crate::disk::Disk for Volume {
    fn describe(&self) -> String {
        format!("{}/disk{}", self.vm, self.index)
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u64 {
        self.block_size
    }
    fn read_at(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        self.read(off, len)
    }
    fn read_later(
        &self,
        off: u64,
        len: usize,
        done: crate::disk::ReadDone,
        spawn: &crate::disk::Spawner,
    ) -> std::result::Result<(), crate::disk::ReadDone> {
        Volume::read_later(self, off, len, done, spawn)
    }
    fn write_at(&self, off: u64, data: &[u8]) -> Result<()> {
        self.write(off, data).map(|_| ())
    }
    fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        Volume::write_zeroes(self, off, len)
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        Volume::discard(self, off, len)
    }
    fn flush(&self) -> Result<()> {
        Volume::flush(self)
    }
    fn epoch(&self) -> u64 {
        self.store.present.epoch()
    }
    fn block_status(&self, off: u64, len: u64) -> Result<Vec<crate::disk::Extent>> {
        Ok(Volume::block_status(self, off, len))
    }
}

#[cfg(test)]
mod claim_tests;
#[cfg(test)]
mod copy_read_tests;
#[cfg(test)]
mod freeze_tests;
#[cfg(test)]
mod read_later_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod upload_tests;
