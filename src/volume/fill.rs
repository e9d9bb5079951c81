//! The in-flight table: who fills a missing block (one fill per block),
//! the [`Slot`] its readers and writers wait on, and how a fill ends (the
//! block present before it leaves the table). Apart from the read and
//! write paths, which both claim blocks here, and from `fetch`, which runs
//! a fill's fetch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::Volume;
use crate::error::Result;
use crate::prefetch::scheduler::Job;
use crate::prefetch::{Class, Scheduler};

/// Where one block fill stands; readers and writers wait on it.
pub(super) struct Slot {
    pub(super) done: Mutex<Option<Result<()>>>,
    cv: Condvar,
    /// The queued fetch, or (before it is queued) the most urgent class a
    /// waiter asked for; one lock so a promotion is never lost.
    pub(super) job: Mutex<(Option<Arc<Job>>, Class)>,
    /// Room taken in the staging budget for this fill (see `evict`).
    pub(super) reserved: AtomicBool,
    /// A read waits for this fill's bytes: if staging has no room for the
    /// block, the fetch reads it through (answers from memory, stages
    /// nothing) instead of failing the read (see `fetch`).
    pub(super) read_waits: AtomicBool,
    /// A write waits for this fill to stage the block: it never reads
    /// through (see `Volume::start_write_fill`).
    pub(super) write_waits: AtomicBool,
    /// A fetch's verified plain bytes, set before its staging write and
    /// `finish`: its readers answer from them at once (they live as long
    /// as the slot's last waiter, or the last reply that borrows them).
    pub(super) data: OnceLock<Bytes>,
    /// Readers that hold no thread (`Volume::read_later`): run by whoever
    /// sets `data` or ends the fill, whichever comes first; `None` once
    /// they ran (later ones run at once). Locked before `done` where both
    /// are (`when_data`); `finish` never nests them.
    then: Mutex<Option<Vec<Reader>>>,
}

/// A reader waiting for a fill without a thread (see `Slot::when_data`).
type Reader = Box<dyn FnOnce() + Send>;

/// Who waits for a fill (see `Slot::read_waits`, `Slot::write_waits`).
#[derive(Clone, Copy)]
pub(super) enum Waiter {
    Read,
    Write,
}

impl Slot {
    pub(super) fn new(class: Class) -> Arc<Slot> {
        Arc::new(Slot {
            done: Mutex::new(None),
            cv: Condvar::new(),
            job: Mutex::new((None, class)),
            reserved: AtomicBool::new(false),
            read_waits: AtomicBool::new(false),
            write_waits: AtomicBool::new(false),
            data: OnceLock::new(),
            then: Mutex::new(Some(Vec::new())),
        })
    }

    /// Records who waits (never cleared: the fill is theirs too).
    fn mark(&self, waiter: Option<Waiter>) {
        match waiter {
            Some(Waiter::Read) => self.read_waits.store(true, Ordering::Release),
            Some(Waiter::Write) => self.write_waits.store(true, Ordering::Release),
            None => {}
        }
    }

    /// A waiter of class `class` wants this fill sooner.
    pub(super) fn promote(&self, sched: &Scheduler, class: Class) {
        let mut j = self.job.lock();
        match &j.0 {
            Some(job) => sched.promote(job, class),
            None => j.1 = j.1.min(class),
        }
    }

    pub(super) fn finish(&self, r: Result<()>) {
        *self.done.lock() = Some(r);
        self.cv.notify_all();
        self.run_readers();
    }

    /// A fetch's verified bytes, before they are staged: readers answer
    /// from them now; writers still wait for `finish` (the staging write
    /// and the presence bit come first).
    pub(super) fn set_data(&self, data: Bytes) {
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
    pub(super) fn when_data(&self, f: Reader) {
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
    pub(super) fn outcome(&self) -> Option<Result<()>> {
        self.done.lock().clone()
    }

    pub(super) fn wait(&self) -> Result<()> {
        let mut g = self.done.lock();
        while g.is_none() {
            self.cv.wait(&mut g);
        }
        g.as_ref().expect("set").clone()
    }

    /// Waits until the fetched bytes are there (they may not be staged
    /// yet) or the fill has ended; the bytes, or the fill's outcome.
    pub(super) fn wait_data(&self) -> Result<Option<&Bytes>> {
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
pub(super) enum Claim {
    Present,
    /// Someone else is filling it: wait.
    Wait(Arc<Slot>),
    /// We fill it and must end it (`complete`; a write: `complete_claim`).
    Owner(Arc<Slot>),
}

impl Volume {
    pub(super) fn claim(&self, b: u64, class: Class) -> Claim {
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
    pub(super) fn complete(&self, b: u64, slot: &Slot, r: Result<()>) {
        self.release_fill(b, slot, r.is_ok());
        slot.finish(r);
    }

    /// Ends a guest write's claim on `b`: the block is present if the
    /// write's data landed. Its waiters (readers, the copier, other
    /// writers) are told `Ok` either way: a failed write's error is its
    /// own caller's, and the block is then as the claim found it (not
    /// staged, the backup's bytes), so a waiter plans again (reads staging
    /// or fetches) instead of failing for a write it did not make.
    pub(super) fn complete_claim(&self, b: u64, slot: &Slot, landed: bool) {
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
    pub(super) fn complete_unstaged(&self, b: u64, slot: &Slot, r: Result<()>) {
        self.settle(slot, false);
        self.inflight.lock().remove(&b);
        slot.finish(r);
    }

    /// Starts filling block `b` from the backup unless it is present, at
    /// priority `class`, for a prefetch (nobody waits yet). Returns a slot
    /// to wait on, or `None` when the block is already local.
    pub(super) fn start_fill(&self, b: u64, class: Class) -> Option<Arc<Slot>> {
        self.start_fill_for(b, class, None)
    }

    /// [`Volume::start_fill`] for a read that waits for the block's bytes:
    /// the fill reads through when staging is full (see `Slot::read_waits`).
    /// A read that joins a fill already refused room gets `NoSpace` from
    /// it and starts again here (see `read::is_room_refusal`).
    pub(super) fn start_read_fill(&self, b: u64, class: Class) -> Option<Arc<Slot>> {
        self.start_fill_for(b, class, Some(Waiter::Read))
    }

    /// [`Volume::start_fill`] for a write that needs the block staged (it
    /// covers part of it): the fill never reads through, or the write
    /// would start it again for each read that joined it.
    pub(super) fn start_write_fill(&self, b: u64) -> Option<Arc<Slot>> {
        self.start_fill_for(b, Class::OnDemand, Some(Waiter::Write))
    }

    fn start_fill_for(&self, b: u64, class: Class, waiter: Option<Waiter>) -> Option<Arc<Slot>> {
        match self.claim(b, class) {
            Claim::Present => None,
            Claim::Wait(s) => {
                s.mark(waiter);
                s.promote(&self.sched, class);
                Some(s)
            }
            Claim::Owner(s) => {
                // Before the fetch is queued: its prepare may run at once.
                // (Only ever set: a reader may have joined since the claim.)
                s.mark(waiter);
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

    /// Waits for each fill to end: the first error of a fill that left no
    /// bytes. A fetch whose staging write failed after its bytes were
    /// verified still answers readers from them.
    pub(super) fn wait_fills<'a>(slots: impl IntoIterator<Item = &'a Arc<Slot>>) -> Result<()> {
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

    /// Waits for in-flight fills to settle (used before release/shutdown).
    pub fn quiesce(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.inflight.lock().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
