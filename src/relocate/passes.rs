//! The copier's thread: passes over every disk until few blocks remain,
//! convergence checks against the guest's writes, the rate limit and its
//! raise, yielding to guest I/O; then the cutover.

use super::*;

impl Relocation {
    pub(super) fn run(self: &Arc<Self>) -> Result<()> {
        let total: u64 = self.disks.iter().map(|d| d.nblocks()).sum();
        self.clock.lock().start();
        // Since when the repository has not answered, and the next wait.
        let mut outage: Option<(Instant, Duration)> = None;
        'passes: loop {
            if self.cancel.load(Ordering::Acquire) {
                return Ok(());
            }
            if self.pause_requested() {
                self.stay_paused();
                continue;
            }
            for i in 0..self.disks.len() {
                self.source_unreachable.store(false, Ordering::Release);
                match self.copy_pass(i, false) {
                    Ok(true) => {}
                    // Cancelled, or paused: the pass starts over (from
                    // the copied map) once resumed.
                    Ok(false) => continue 'passes,
                    Err(e) if self.source_unreachable.load(Ordering::Acquire) => {
                        self.wait_for_source(&e, &mut outage);
                        continue 'passes;
                    }
                    Err(e) => return Err(e),
                }
            }
            outage = None;
            if self.remaining() <= (total / 16).clamp(1, CUTOVER_BLOCKS) {
                if !self.begin_switching() {
                    continue; // paused or stopped just now
                }
                return self.cutover();
            }
            // Passes after the first re-copy what the guest dirtied. A
            // not-converging verdict stands until a pass really gains.
            let gaining = self.remaining() <= total / 2;
            if self.state() == State::Copying || (self.state() == State::NotConverging && gaining) {
                self.set_state(State::Converging, None);
            }
            self.meta.lock().pass += 1;
            self.store_meta()?;
            if self.state() == State::NotConverging {
                // Do not spin: give the guest's write burst time to end.
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }

    /// The repository did not answer for a block (an outage, `e`): the
    /// copier waits, 1 s and then twice as long each time up to 30 s, and
    /// starts the pass over from its copied map; `status` says why in the
    /// meantime. A pause or a cancel ends the wait at once. A relocation
    /// used to fail for good on an outage of seconds (explore4 M2).
    fn wait_for_source(&self, e: &Error, outage: &mut Option<(Instant, Duration)>) {
        let (since, wait) = outage.get_or_insert((Instant::now(), Duration::from_secs(1)));
        let note = format!(
            "waiting for the repository, which has not answered for {} s ({e}); the copy goes on when it does",
            since.elapsed().as_secs()
        );
        tracing::warn!(vm = %self.vm, "{note}");
        self.set_state(self.state(), Some(note));
        self.outage_shown.store(true, Ordering::Release);
        let deadline = Instant::now() + *wait;
        let mut st = self.state.lock();
        while Instant::now() < deadline
            && !self.pause_requested()
            && !self.cancel.load(Ordering::Acquire)
        {
            self.wake.wait_until(&mut st, deadline);
        }
        drop(st);
        *wait = (*wait * 2).min(Duration::from_secs(30));
    }

    /// A block was copied: a wait for the repository shown is over.
    pub(super) fn outage_over(&self) {
        // A load first: this runs for every block copied.
        if !self.outage_shown.load(Ordering::Acquire)
            || !self.outage_shown.swap(false, Ordering::AcqRel)
        {
            return;
        }
        tracing::info!(vm = %self.vm, "the repository answers again: the copy goes on");
        let mut st = self.state.lock();
        if st
            .2
            .as_deref()
            .is_some_and(|n| n.starts_with("waiting for the repository"))
        {
            st.2 = None;
        }
    }

    /// Forgets the pacing history (after a pause).
    pub(super) fn restart_pacing(&self) {
        let revoked: u64 = self.disks.iter().map(|d| d.copies_revoked()).sum::<u64>()
            + self.copies_lost.load(Ordering::Relaxed);
        *self.progress.lock() = Progress {
            at: Instant::now(),
            marked: self.blocks_marked.load(Ordering::Relaxed),
            revoked,
            stalled: 0,
        };
        *self.next_slot.lock() = Instant::now();
    }

    /// Once a second: is the copy gaining on the guest's writes?
    pub(super) fn check_progress(&self) {
        let mut p = self.progress.lock();
        if p.at.elapsed() < Duration::from_secs(1) {
            return;
        }
        let marked = self.blocks_marked.load(Ordering::Relaxed);
        let revoked: u64 = self.disks.iter().map(|d| d.copies_revoked()).sum::<u64>()
            + self.copies_lost.load(Ordering::Relaxed);
        let (dm, dr) = (marked - p.marked, revoked - p.revoked);
        *p = Progress {
            at: Instant::now(),
            marked,
            revoked,
            stalled: p.stalled,
        };
        // A brief lull in the guest's writes is not convergence: decay the
        // count instead of resetting it.
        if dr > 0 && dr >= dm {
            p.stalled += 1;
        } else if dm > 2 * dr {
            p.stalled = p.stalled.saturating_sub(1);
        }
        if p.stalled >= STALL_SECONDS {
            p.stalled = 0;
            drop(p);
            self.escalate(self.remaining());
        }
    }

    /// The guest dirties blocks as fast as we copy: raise the rate within
    /// 4× of what was asked, else say so with the figures.
    pub(super) fn escalate(&self, remaining: u64) {
        let mut rl = self.rate_limit.lock();
        if let (Some(r), Some(init)) = (*rl, self.initial_rate) {
            if r < init * 4.0 {
                *rl = Some((r * 2.0).min(init * 4.0));
                tracing::warn!(vm = %self.vm, "relocation not gaining on the guest: raising copy rate to {:.1} MB/s", rl.unwrap());
                return;
            }
        }
        let note = format!(
            "the guest re-dirties blocks as fast as they are copied: {remaining} blocks dirty, for {STALL_SECONDS} s at {}",
            match *rl {
                Some(r) => format!("the {r:.1} MB/s limit"),
                None => "full speed".into(),
            }
        );
        tracing::warn!(vm = %self.vm, "relocation not converging: {note}");
        self.set_state(State::NotConverging, Some(note));
    }

    /// Waits (briefly) while the guest has I/O in flight.
    pub(super) fn yield_to_guest(&self, d: &Volume) {
        let start = Instant::now();
        while d.guest_busy() && start.elapsed() < Duration::from_millis(20) {
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Token bucket: each copied block books `len / rate` of time; at most
    /// 100 ms of unused time carries over, so a copier slowed by the guest
    /// never bursts past its limit afterwards. The wait ends early for a
    /// pause or cancel (a slow limit may book seconds per block).
    pub(super) fn throttle(&self, len: u64) {
        let Some(rate) = *self.rate_limit.lock() else {
            return;
        };
        let now = Instant::now();
        let mut next = self.next_slot.lock();
        let start = (*next).max(now - Duration::from_millis(100));
        *next = start + Duration::from_secs_f64(len as f64 / (rate * 1e6));
        let until = *next;
        drop(next);
        loop {
            let wait = until.saturating_duration_since(Instant::now());
            if wait.is_zero() || self.interrupted(false) {
                return;
            }
            std::thread::sleep(wait.min(Duration::from_millis(20)));
        }
    }
}
