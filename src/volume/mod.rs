//! A live virtual disk: the read/write/flush API every frontend (FUSE,
//! NFS and NBD) and every job that reads or copies a disk calls. It joins
//! a backup's chunk list with a staging store.
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
//!
//! Layout: this file holds the volume's state and its `Disk` face; each
//! part of the data flow is a sibling:
//! * `extents`: what the maps say about a range (served locally? which
//!   extents?), asked before a request runs;
//! * `read`: the guest's reads; `write`: the guest's writes;
//! * `fill`: the in-flight table, one fill per missing block, and the
//!   slot its waiters wait on; `fetch`: one fill's fetch from the backup;
//! * `staging_io`: every change to staging, under the I/O gate, and
//!   `close`;
//! * `flush`: durability (group commit) and the sticky failure;
//! * `evict`: staged blocks given back under a staging limit;
//! * `freeze`: a live backup's dirty maps, freeze and copy-on-write;
//! * `upload`: the session uploader's upload record;
//! * `relocation`: the relocation copier's reads, stamps and cutover;
//! * `passthrough`: direct (kernel) readers;
//! * `stripes`: per-block counters folded onto stripes;
//! * `status`: the disk's counters and status figures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::error::{Error, Result};
use crate::prefetch::scheduler::tenant_of;
use crate::prefetch::stream::Detector;
use crate::prefetch::tracker::{RecordWindow, Tracker};
use crate::prefetch::Scheduler;
use crate::repo::{ChunkIndex, DiskManifest, Manifest, Repository};
use crate::staging::io::BlockFile;
use crate::staging::{DiskStore, PersistentBitmap};

mod evict;
mod extents;
mod fetch;
mod fill;
mod flush;
mod freeze;
mod passthrough;
mod read;
mod relocation;
mod staging_io;
mod status;
mod stripes;
mod upload;
mod write;

use fill::Slot;
pub use freeze::Frozen;
pub(crate) use relocation::CopyRead;
pub use status::{DiskStatus, VolumeStats};
pub use upload::Uploaded;

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
    /// One warning per 10 s for reads through a full staging.
    read_through_log: crate::util::LogLimit,
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
            read_through_log: crate::util::LogLimit::new(Duration::from_secs(10)),
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

    fn block_len(&self, b: u64) -> u64 {
        (self.size - b * self.block_size).min(self.block_size)
    }

    fn blocks(&self, off: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        off / self.block_size..(off + len - 1) / self.block_size + 1
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
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
mod deadlock_tests;
#[cfg(test)]
mod durability_tests;
#[cfg(test)]
mod freeze_tests;
#[cfg(test)]
mod miss_tests;
#[cfg(test)]
mod prefetch_tests;
#[cfg(test)]
mod read_later_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod upload_tests;
