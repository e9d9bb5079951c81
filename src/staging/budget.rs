//! Bounded staging: one byte budget per staging directory (`serve
//! --staging-max SIZE`, `--staging-reserve SIZE`), shared by every session
//! staged there.
//!
//! **What is counted.** Each served disk counts one block size per block
//! whose presence bit is set or whose fill is under way (a reservation
//! taken before the fill writes staging, returned if it fails). Sessions
//! kept but not served count their data files' allocated bytes, measured
//! whenever the set of served disks changes. So staging use is an upper
//! bound of what the data files hold.
//!
//! **The limit.** The hard limit is `--staging-max`, lowered to what the
//! filesystem can hold for this staging (its use plus the filesystem's free
//! bytes) less `--staging-reserve`: a limit above the filesystem would let
//! it fill up before eviction starts, and fills then fail. A fill that would pass
//! it first runs an eviction step itself; if nothing can be evicted (every
//! staged block changed, in flight, or pinned by a writer) the fill fails
//! with ENOSPC, counted in `refused`, and the limit holds: a write that
//! needs the room fails, a prefetch stops, and a read's fill reads through
//! (its bytes answer the read and are not staged, see `volume::fetch`);
//! right after a scan found nothing to evict, reads' fills are refused
//! without another ([`BARREN_TTL`]).
//!
//! **Prefetch** (profile, relocation order, readahead) only fills below
//! the low watermark (80 %) and evicts nothing of another disk: one VM's
//! prefetch must not push another VM's working set out. Readahead may
//! replace its own disk's blocks while staging sits at the watermark; a
//! profile or relocation-order prefetch evicts nothing (its earlier blocks
//! are wanted first). Before a recovery's profile prefetch, room is
//! made below that watermark once ([`Budget::make_room_below_low`]); a
//! profile that does not fit there ([`Budget::prefetch_room`], counting
//! other disks' unchanged blocks) is admitted with a warning. A background
//! thread evicts from a high watermark (90 % of the limit) down to a low
//! one (80 %) so fills rarely wait.
//!
//! **What is evicted** is decided by each disk (`Evictable`, implemented
//! by `volume::Volume`, see `volume::evict`): staged, unchanged blocks no
//! fill, writer or relocation needs, least recently used first
//! (approximately: CLOCK). The budget only asks the disks in turn, so the
//! order across disks is round robin, within a disk CLOCK.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::util::human_bytes;

/// The smallest `--staging-max`, and the least a `--staging-reserve` must
/// leave of its filesystem: 16 blocks of the smallest block size (64 KiB).
/// Below it a staging admits next to nothing.
pub const MIN_LIMIT: u64 = 16 * crate::repo::chunk::MIN_CHUNK_SIZE;

/// What sets the limit in force (`status --json`: `limited_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bound {
    /// `--staging-max`.
    StagingMax,
    /// The filesystem's free bytes less `--staging-reserve`.
    StagingReserve,
    /// The filesystem's free bytes (no reserve given).
    Filesystem,
}

/// A served disk the budget can ask to give bytes back.
pub trait Evictable: Send + Sync {
    /// Evicts idle, unchanged staged blocks worth at least `want` bytes if
    /// it can (a small batch); returns the bytes freed.
    fn evict(&self, want: u64) -> Result<u64>;
    /// The session directory this disk is staged in.
    fn session_dir(&self) -> PathBuf;
    /// Bytes no eviction can free: the blocks the guest changed.
    fn unevictable_bytes(&self) -> u64;
}

/// Staging use and pressure of one staging directory, for `status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BudgetStatus {
    pub root: String,
    /// Bytes counted (served disks' staged and reserved blocks, kept
    /// sessions' allocated bytes).
    pub used: u64,
    /// `--staging-max`, if set.
    pub max: Option<u64>,
    /// `--staging-reserve`: bytes the filesystem keeps free.
    pub reserve: u64,
    /// The limit in force now (max, lowered to what the filesystem can
    /// hold less the reserve).
    pub limit: Option<u64>,
    /// What sets `limit`.
    pub limited_by: Option<Bound>,
    /// Bytes of sessions kept but not served (included in `used`).
    pub kept: u64,
    pub evicted_blocks: u64,
    pub evicted_bytes: u64,
    /// Fills refused because nothing could be evicted (ENOSPC).
    pub refused_fills: u64,
    /// Fills that had to run an eviction step before they could go on.
    pub fills_waited: u64,
    /// Prefetches not made: staging at its low watermark and their own
    /// disk had nothing to evict (prefetch never evicts other disks').
    pub prefetches_held_back: u64,
    /// `used / limit` (0 without a limit).
    pub pressure: f64,
}

struct Member {
    dir: PathBuf,
    disk: Weak<dyn Evictable>,
}

pub struct Budget {
    root: PathBuf,
    /// 0: no `--staging-max`.
    max: AtomicU64,
    reserve: AtomicU64,
    /// Served disks' staged and reserved bytes.
    live: AtomicU64,
    /// Of `live`, reservations whose fill has not written staging yet:
    /// the filesystem's free bytes do not show them.
    unwritten: AtomicU64,
    /// Kept, unserved sessions' allocated bytes.
    kept: AtomicU64,
    members: Mutex<Vec<Member>>,
    /// Serialises eviction steps; the disk to ask first next time.
    cursor: Mutex<usize>,
    evicted_blocks: AtomicU64,
    evicted_bytes: AtomicU64,
    refused: AtomicU64,
    waited: AtomicU64,
    /// Prefetches refused at the low watermark (`reserve_speculative`).
    held_back: AtomicU64,
    /// Wakes the background evictor.
    wake: Condvar,
    wake_lock: Mutex<bool>,
    /// The background evictor was started.
    started: std::sync::atomic::AtomicBool,
    /// The last `statvfs` of the staging's filesystem, reused by fills for
    /// [`SPACE_TTL`] (a fill per block would otherwise ask the filesystem
    /// each time: an RPC per block with staging on NFS).
    space: Mutex<Option<SpaceSample>>,
    /// Bytes fills have written since the budget began: a sample's free
    /// bytes less those written after it.
    written_total: AtomicU64,
    /// `statvfs` calls made (tests).
    samples: AtomicU64,
    /// When an eviction step of a refused reservation last freed nothing:
    /// reads through a full staging are refused without another scan for
    /// [`BARREN_TTL`] (see [`Budget::reserve_for_read`]).
    barren: Mutex<Option<std::time::Instant>>,
}

/// A `statvfs` answer and when it was taken.
#[derive(Clone, Copy)]
struct SpaceSample {
    at: std::time::Instant,
    size: u64,
    avail: u64,
    /// `written_total` then.
    written: u64,
}

/// How long fills reuse a filesystem sample. Written bytes are taken off
/// it; space freed meanwhile shows at the next sample (errs low). A fill
/// refused on a sample asks the filesystem again before refusing.
const SPACE_TTL: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a fill a read can do without skips eviction after a step
/// found nothing to evict: a scan of every disk, under each disk's
/// exclusive eviction gate, for each miss of a full staging would stall
/// its staged reads for nothing.
pub(crate) const BARREN_TTL: std::time::Duration = std::time::Duration::from_millis(100);

/// High and low watermarks, in per mille of the limit.
const HIGH: u64 = 900;
const LOW: u64 = 800;

impl Budget {
    /// A budget without a limit (counting only) for the staging at `root`.
    pub fn new(root: &Path) -> Arc<Budget> {
        let b = Arc::new(Budget {
            root: root.to_path_buf(),
            max: AtomicU64::new(0),
            reserve: AtomicU64::new(0),
            live: AtomicU64::new(0),
            unwritten: AtomicU64::new(0),
            kept: AtomicU64::new(0),
            members: Mutex::new(vec![]),
            cursor: Mutex::new(0),
            evicted_blocks: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
            wake: Condvar::new(),
            wake_lock: Mutex::new(false),
            started: std::sync::atomic::AtomicBool::new(false),
            space: Mutex::new(None),
            written_total: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            barren: Mutex::new(None),
        });
        b.rescan();
        b
    }

    /// Sets the limit (`max`, 0 for none) and the free-space reserve, and
    /// starts the background evictor, which ends when the budget is dropped.
    pub fn set_limits(self: &Arc<Self>, max: u64, reserve: u64) {
        self.max.store(max, Ordering::Release);
        self.reserve.store(reserve, Ordering::Release);
        if (max == 0 && reserve == 0) || self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = Arc::downgrade(self);
        let root = self.root.display().to_string();
        let spawned = std::thread::Builder::new()
            .name("staging-evict".into())
            .spawn(move || background(me));
        if let Err(e) = spawned {
            tracing::error!(staging = %root, "cannot start the staging evictor ({e}); fills evict for themselves");
        }
    }

    pub fn is_limited(&self) -> bool {
        self.max.load(Ordering::Acquire) != 0 || self.reserve.load(Ordering::Acquire) != 0
    }

    pub fn used(&self) -> u64 {
        self.live.load(Ordering::Acquire) + self.kept.load(Ordering::Acquire)
    }

    /// The limit in force: `max`, lowered to what the filesystem can hold
    /// for this staging (what it uses plus what is free) less `reserve`;
    /// `None` without either.
    pub fn limit(&self) -> Option<u64> {
        self.limit_by().map(|(l, _)| l)
    }

    /// The limit in force and what sets it.
    pub fn limit_by(&self) -> Option<(u64, Bound)> {
        self.limit_on(true)
    }

    /// The filesystem's size and free bytes: asked now (`fresh`), or a
    /// sample younger than [`SPACE_TTL`] less what fills wrote since.
    fn space(&self, fresh: bool) -> Option<(u64, u64)> {
        let mut last = self.space.lock();
        let written = self.written_total.load(Ordering::Acquire);
        if let Some(s) = last.filter(|s| !fresh && s.at.elapsed() < SPACE_TTL) {
            return Some((
                s.size,
                s.avail.saturating_sub(written.saturating_sub(s.written)),
            ));
        }
        self.samples.fetch_add(1, Ordering::Relaxed);
        let (size, avail) = fs_space(&self.root)?;
        *last = Some(SpaceSample {
            at: std::time::Instant::now(),
            size,
            avail,
            written,
        });
        Some((size, avail))
    }

    /// [`Self::limit_by`], on a fresh or a recent filesystem sample.
    fn limit_on(&self, fresh: bool) -> Option<(u64, Bound)> {
        let max = self.max.load(Ordering::Acquire);
        let reserve = self.reserve.load(Ordering::Acquire);
        if max == 0 && reserve == 0 {
            return None;
        }
        let mut limit = (max != 0).then_some((max, Bound::StagingMax));
        if let Some((_, avail)) = self.space(fresh) {
            // Reserved but not written yet: counted in `used`, not yet
            // missing from `avail`; counted once.
            let on_disk = self
                .used()
                .saturating_sub(self.unwritten.load(Ordering::Acquire));
            let by_space = on_disk + avail.saturating_sub(reserve);
            if limit.is_none_or(|(l, _)| by_space < l) {
                let by = match reserve {
                    0 => Bound::Filesystem,
                    _ => Bound::StagingReserve,
                };
                limit = Some((by_space, by));
            }
        }
        limit
    }

    /// What would raise the limit in force, for a refusal: the flag or
    /// the filesystem that sets it, never a flag that was not given.
    pub fn raise_hint(&self) -> String {
        let space = match fs_space(&self.root) {
            Some((size, avail)) => format!(
                "a filesystem of {}, {} available",
                human_bytes(size),
                human_bytes(avail)
            ),
            None => "its filesystem".into(),
        };
        match self.limit_by().map(|(_, b)| b) {
            Some(Bound::StagingReserve) => format!(
                "lower --staging-reserve ({} kept free on {space})",
                human_bytes(self.reserve.load(Ordering::Acquire))
            ),
            Some(Bound::Filesystem) => format!("free space on its filesystem ({space})"),
            _ => "raise --staging-max".into(),
        }
    }

    /// Logs at start what keeps this staging small: a filesystem smaller
    /// than `--staging-max`, or a reserve leaving almost nothing now.
    pub fn warn_if_small(&self) {
        let max = self.max.load(Ordering::Acquire);
        let root = self.root.display();
        if let (Some((size, _)), true) = (fs_space(&self.root), max != 0) {
            if size < max {
                tracing::warn!("staging {root}: --staging-max {} is more than its filesystem holds ({} in all); the limit follows the filesystem's free bytes", human_bytes(max), human_bytes(size));
            }
        }
        if let Some((limit, by)) = self.limit_by() {
            if limit < MIN_LIMIT && by != Bound::StagingMax {
                tracing::warn!("staging {root}: only {} can be staged now; new recoveries are refused until there is room ({})", human_bytes(limit), self.raise_hint());
            }
        }
    }

    /// Starts counting a served disk whose staging holds `staged` bytes.
    pub fn attach(&self, disk: Weak<dyn Evictable>, dir: PathBuf, staged: u64) {
        self.live.fetch_add(staged, Ordering::AcqRel);
        self.members.lock().push(Member { dir, disk });
        self.rescan();
    }

    /// Stops counting a disk (at release); its bytes count as kept until
    /// the session is discarded.
    pub fn detach(&self, dir: &Path, staged: u64) {
        self.take_back(staged);
        self.members.lock().retain(|m| m.dir != dir);
        self.rescan();
    }

    /// Measures the kept, unserved sessions' data files again (after a
    /// session was attached, released or discarded).
    pub fn rescan(&self) {
        let served: Vec<PathBuf> = self.members.lock().iter().map(|m| m.dir.clone()).collect();
        let mut kept = 0;
        for dir in session_dirs(&self.root) {
            if !served.contains(&dir) {
                kept += allocated_data_bytes(&dir);
            }
        }
        self.kept.store(kept, Ordering::Release);
    }

    /// Bytes a new recovery could stage here (evicting what can be):
    /// the limit less kept sessions and served disks' changed blocks;
    /// `None` without a limit.
    pub fn room(&self) -> Option<u64> {
        let limit = self.limit()?;
        Some(limit.saturating_sub(self.kept.load(Ordering::Acquire) + self.held()))
    }

    /// What no eviction can free here (kept sessions, served disks'
    /// changed blocks) and the limit, when that reaches the limit: then
    /// no new block can be staged (reads read through, writes to blocks
    /// not staged fail ENOSPC).
    pub fn unevictable_over_limit(&self) -> Option<(u64, u64)> {
        let limit = self.limit()?;
        let fixed = self.kept.load(Ordering::Acquire) + self.held();
        (fixed >= limit).then_some((fixed, limit))
    }

    /// Served disks' bytes no eviction can free (their changed blocks).
    fn held(&self) -> u64 {
        self.members
            .lock()
            .iter()
            .filter_map(|m| m.disk.upgrade())
            .map(|d| d.unevictable_bytes())
            .sum()
    }

    /// Takes `bytes` before a fill writes them to staging. Over the limit,
    /// runs eviction steps first; fails with ENOSPC when nothing can go.
    pub fn reserve(&self, bytes: u64) -> Result<()> {
        self.reserve_as(bytes, false)
    }

    /// [`Budget::reserve`] for a fill a read can do without (it then reads
    /// through, unstaged): shortly after an eviction step found nothing to
    /// evict, a fill over the limit is refused at once, without scanning
    /// again. Writes and prefetches always scan: a write refused fails.
    pub fn reserve_for_read(&self, bytes: u64) -> Result<()> {
        self.reserve_as(bytes, true)
    }

    /// Takes `bytes` for a prefetch (profile, relocation order,
    /// readahead): only below the low watermark, on the recent filesystem
    /// sample (a prefetch held back costs no `statvfs`). A readahead
    /// (`own`: it evicts `bytes` or more of its own disk's blocks, and
    /// returns what it freed) may replace its own disk's blocks while
    /// staging sits at the watermark: one eviction, when that alone makes
    /// room. Anything else is held back (`held_back`). So one VM's
    /// prefetch never evicts another VM's blocks nor wakes the background
    /// evictor that would; guest misses (any VM's) still fill up to the
    /// limit.
    pub fn reserve_speculative(&self, bytes: u64, own: Option<&dyn Fn(u64) -> u64>) -> Result<()> {
        let mut evicted = false;
        loop {
            self.unwritten.fetch_add(bytes, Ordering::AcqRel);
            let Some(limit) = self.limit_on(false).map(|(l, _)| l) else {
                self.live.fetch_add(bytes, Ordering::AcqRel);
                return Ok(());
            };
            let low = limit / 1000 * LOW;
            let kept = self.kept.load(Ordering::Acquire);
            let taken = self
                .live
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |live| {
                    (live + bytes + kept <= low).then_some(live + bytes)
                });
            let live = match taken {
                Ok(_) => return Ok(()),
                Err(live) => live,
            };
            self.settle_unwritten(bytes);
            // Over the watermark by more than this block (guest misses
            // pushed staging up, or other disks fill it): evicting its own
            // blocks would not make room for it.
            let at_watermark = live + kept <= low;
            match own {
                Some(evict) if !evicted && at_watermark && evict(bytes) > 0 => evicted = true,
                _ => {
                    self.held_back.fetch_add(1, Ordering::Relaxed);
                    return Err(Error::new(
                        ErrorKind::NoSpace,
                        format!(
                            "prefetch held back: staging {} is at its low watermark ({} of its {} limit) and prefetch evicts no other disk's blocks (readahead only its own)",
                            self.root.display(),
                            human_bytes(low),
                            human_bytes(limit)
                        ),
                    ));
                }
            }
        }
    }

    /// Before a recovery's profile prefetch: evicts (CLOCK, every disk)
    /// until `bytes` more fit below the low watermark, or nothing more can
    /// go. Admission found room for the profile there counting other
    /// disks' unchanged blocks (`prefetch_room`), which prefetch itself
    /// may not evict; without this a warm staging (the steady state, at
    /// 80-90 %) would hold back every block of the new VM's profile.
    pub fn make_room_below_low(&self, bytes: u64) {
        let Some(limit) = self.limit() else { return };
        let low = limit / 1000 * LOW;
        loop {
            let over = (self.used() + bytes).saturating_sub(low);
            if over == 0 {
                return;
            }
            match self.evict_step(over) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Bytes a new recovery's prefetch could stage here: as
    /// [`Budget::room`], below the low watermark (see
    /// [`Budget::reserve_speculative`]).
    pub fn prefetch_room(&self) -> Option<u64> {
        let low = self.limit()? / 1000 * LOW;
        Some(low.saturating_sub(self.kept.load(Ordering::Acquire) + self.held()))
    }

    fn recently_barren(&self) -> bool {
        self.barren
            .lock()
            .is_some_and(|at| at.elapsed() < BARREN_TTL)
    }

    fn reserve_as(&self, bytes: u64, for_read: bool) -> Result<()> {
        let mut waited = false;
        // A recent filesystem sample first; a refusal asks it again.
        let mut fresh = false;
        loop {
            // Before `live`: a limit computed meanwhile errs low, not high.
            self.unwritten.fetch_add(bytes, Ordering::AcqRel);
            let limit = self.limit_on(fresh).map(|(l, _)| l);
            let kept = self.kept.load(Ordering::Acquire);
            // Counted only if it fits: the count itself never passes the limit.
            let taken = self
                .live
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |live| {
                    let after = live + bytes;
                    limit.is_none_or(|l| after + kept <= l).then_some(after)
                });
            let used = match taken {
                Ok(live) => {
                    if let Some(l) = limit {
                        if live + bytes + kept > l / 1000 * HIGH {
                            self.kick();
                        }
                    }
                    return Ok(());
                }
                Err(live) => {
                    self.settle_unwritten(bytes);
                    let barren = for_read && self.recently_barren();
                    if !fresh && !barren {
                        fresh = true;
                        continue;
                    }
                    if barren {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                        let limit = limit.expect("only a limit refuses");
                        return Err(self.full(live + kept, limit));
                    }
                    live + kept
                }
            };
            let limit = limit.expect("only a limit refuses");
            if !waited {
                waited = true;
                self.waited.fetch_add(1, Ordering::Relaxed);
            }
            let freed = self.evict_step((used + bytes).saturating_sub(limit).max(bytes))?;
            if freed == 0 {
                *self.barren.lock() = Some(std::time::Instant::now());
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(self.full(used, limit));
            }
        }
    }

    /// The refusal of a fill: staging is full and nothing can be evicted.
    fn full(&self, used: u64, limit: u64) -> Error {
        Error::new(
            ErrorKind::NoSpace,
            format!(
                "staging {} is full: {} used of its {} limit and nothing can be evicted (every staged block is changed or in use); release a session with --discard (a relocated one once it has cut over), or {}",
                self.root.display(),
                human_bytes(used),
                human_bytes(limit),
                self.raise_hint()
            ),
        )
    }

    /// Gives back a reservation whose fill failed.
    pub fn unreserve(&self, bytes: u64) {
        self.settle_unwritten(bytes);
        self.take_back(bytes);
    }

    /// A reservation's fill wrote staging: the filesystem's free bytes
    /// show it now.
    pub fn written(&self, bytes: u64) {
        self.written_total.fetch_add(bytes, Ordering::AcqRel);
        self.settle_unwritten(bytes);
    }

    fn settle_unwritten(&self, bytes: u64) {
        let _ = self
            .unwritten
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    /// Lowers the served count, never below zero (a late settlement of a
    /// disk already detached must not wrap it).
    fn take_back(&self, bytes: u64) {
        let _ = self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                Some(l.saturating_sub(bytes))
            });
    }

    /// Called by a disk for each block it evicted.
    pub fn evicted(&self, blocks: u64, bytes: u64) {
        self.take_back(bytes);
        self.evicted_blocks.fetch_add(blocks, Ordering::Relaxed);
        self.evicted_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// One eviction step: asks the served disks in turn until `want`
    /// bytes are freed or every disk was asked; returns the bytes freed.
    pub fn evict_step(&self, want: u64) -> Result<u64> {
        let mut cursor = self.cursor.lock();
        let disks: Vec<Arc<dyn Evictable>> = self
            .members
            .lock()
            .iter()
            .filter_map(|m| m.disk.upgrade())
            .collect();
        let mut freed = 0;
        let n = disks.len();
        for i in 0..n {
            if freed >= want {
                break;
            }
            let d = &disks[(*cursor + i) % n];
            match d.evict(want - freed) {
                Ok(f) => freed += f,
                Err(e) => tracing::error!(staging = %self.root.display(), "eviction failed: {e}"),
            }
        }
        if n > 0 {
            *cursor = (*cursor + 1) % n;
        }
        Ok(freed)
    }

    fn kick(&self) {
        *self.wake_lock.lock() = true;
        self.wake.notify_one();
    }

    pub fn status(&self) -> BudgetStatus {
        let limited = self.limit_by();
        let limit = limited.map(|(l, _)| l);
        let used = self.used();
        let max = self.max.load(Ordering::Acquire);
        BudgetStatus {
            root: self.root.display().to_string(),
            used,
            max: (max != 0).then_some(max),
            reserve: self.reserve.load(Ordering::Acquire),
            limit,
            limited_by: limited.map(|(_, b)| b),
            kept: self.kept.load(Ordering::Acquire),
            evicted_blocks: self.evicted_blocks.load(Ordering::Relaxed),
            evicted_bytes: self.evicted_bytes.load(Ordering::Relaxed),
            refused_fills: self.refused.load(Ordering::Relaxed),
            fills_waited: self.waited.load(Ordering::Relaxed),
            prefetches_held_back: self.held_back.load(Ordering::Relaxed),
            pressure: limit.map_or(0.0, |l| used as f64 / l.max(1) as f64),
        }
    }
}

/// The background evictor: above the high watermark, evicts down to the
/// low one; wakes when a reservation passes the high mark, or every 200 ms.
fn background(budget: Weak<Budget>) {
    loop {
        let Some(b) = budget.upgrade() else { return };
        {
            let mut woken = b.wake_lock.lock();
            if !*woken {
                b.wake.wait_for(&mut woken, Duration::from_millis(200));
            }
            *woken = false;
        }
        let Some(limit) = b.limit() else { continue };
        let (high, low) = (limit / 1000 * HIGH, limit / 1000 * LOW);
        while b.used() > high {
            match b.evict_step(b.used().saturating_sub(low)) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// `root/sessions/<vm>/<backup>` directories.
fn session_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for vm in std::fs::read_dir(root.join("sessions"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for s in std::fs::read_dir(vm.path()).into_iter().flatten().flatten() {
            out.push(s.path());
        }
    }
    out
}

/// Allocated bytes of a session's `diskN.data` files.
pub fn allocated_data_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("disk") && n.ends_with(".data")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Size and free bytes (for unprivileged users) of the filesystem holding
/// `dir`.
fn fs_space(dir: &Path) -> Option<(u64, u64)> {
    nix::sys::statvfs::statvfs(dir).ok().map(|s| {
        (
            s.blocks() * s.fragment_size(),
            s.blocks_available() * s.fragment_size(),
        )
    })
}

/// Refuses limits that could never admit anything: a `--staging-max`
/// below [`MIN_LIMIT`], or a `--staging-reserve` leaving less than that
/// of the filesystem that holds (or, before it is made, will hold) the
/// staging directory `dir`, even with nothing else on it.
pub fn check_limits(dir: &Path, max: u64, reserve: u64) -> Result<()> {
    if max != 0 && max < MIN_LIMIT {
        return Err(Error::invalid(format!(
            "--staging-max {} is too small: staging needs at least {} (16 blocks of 64 KiB) to admit anything",
            human_bytes(max),
            human_bytes(MIN_LIMIT)
        )));
    }
    if reserve == 0 {
        return Ok(());
    }
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    // Not made yet: it will be on its nearest existing parent's filesystem.
    let Some((size, _)) = dir.ancestors().find(|a| a.exists()).and_then(fs_space) else {
        return Ok(());
    };
    if size < reserve.saturating_add(MIN_LIMIT) {
        return Err(Error::invalid(format!(
            "--staging-reserve {} leaves no room for staging {}: its filesystem is {} in all, and the reserve must leave at least {} of it",
            human_bytes(reserve),
            dir.display(),
            human_bytes(size),
            human_bytes(MIN_LIMIT)
        )));
    }
    Ok(())
}

#[cfg(test)]
#[path = "budget_tests.rs"]
mod tests;
