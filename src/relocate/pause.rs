//! Pausing and resuming a relocation (`POST /sessions/{vm}/relocate/pause`
//! and `/resume`, `recoverfs relocate VM --pause|--resume`).
//!
//! * `pause` sets a flag the copier checks before every block it starts
//!   and while it waits for the rate limit: it abandons the reads in flight
//!   (nothing was written for them), commits the blocks it wrote (target
//!   sync, then their copied bits: nothing half-done is recorded) and
//!   waits. `pause` persists `paused: true` in `relocation.json` first (a
//!   restarted daemon resumes the session with its relocation paused), and
//!   returns once the copier is parked, so what it reports is settled.
//! * The flag is set under the state lock and the copier moves to
//!   `Switching` under the same lock only if no pause is asked
//!   (`begin_switching`): a pause either comes before the cutover starts
//!   and holds it off, or is refused because the cutover is under way.
//! * Guest writes go on while paused (to staging) and clear copied bits as
//!   always; `resume_copy` clears the flag durably and the copier starts
//!   its pass again from the copied map.
//! * Paused time is not copy time: the status' rate and `copy_seconds`
//!   count only time spent copying ([`Clock`]).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Relocation, RelocationStatus, State};
use crate::error::{Error, ErrorKind, Result};

/// How long `pause` and `resume_copy` wait for the copier to act on them.
const SETTLE: Duration = Duration::from_secs(30);

/// Time spent copying: the sum of the stretches between `start` and `stop`.
#[derive(Default)]
pub(super) struct Clock {
    past: Duration,
    since: Option<Instant>,
}

impl Clock {
    pub(super) fn start(&mut self) {
        self.since.get_or_insert_with(Instant::now);
    }

    pub(super) fn stop(&mut self) {
        if let Some(t) = self.since.take() {
            self.past += t.elapsed();
        }
    }

    pub(super) fn active(&self) -> Duration {
        self.past + self.since.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Counts `earlier` too: the time copying of the failed relocation a
    /// `retry` reopened in the same daemon.
    pub(super) fn carry(&mut self, earlier: Duration) {
        self.past += earlier;
    }
}

impl Relocation {
    pub(super) fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    pub(super) fn wake_copier(&self) {
        let _g = self.state.lock();
        self.wake.notify_all();
    }

    /// Moves to `Switching` unless a pause or a stop (cancel) was asked
    /// (then false): either comes before the cutover starts and holds it
    /// off, or finds it under way.
    pub(super) fn begin_switching(&self) -> bool {
        let mut st = self.state.lock();
        if self.pause.load(Ordering::Acquire) || self.cancel.load(Ordering::Acquire) {
            return false;
        }
        *st = (State::Switching, None, None);
        true
    }

    /// On the copier thread, between passes: parks it while paused (state
    /// `Paused`), then restores the state it had.
    pub(super) fn stay_paused(&self) {
        self.clock.lock().stop();
        let mut st = self.state.lock();
        let before = (st.0, st.2.take());
        st.0 = State::Paused;
        tracing::info!(vm = %self.vm, "relocation paused");
        while self.pause.load(Ordering::Acquire) && !self.cancel.load(Ordering::Acquire) {
            self.wake.wait(&mut st);
        }
        if st.0 == State::Paused {
            (st.0, st.2) = before;
        }
        drop(st);
        // A fresh start for the convergence sample and the rate limit: the
        // guest's writes while paused are not a race lost.
        self.restart_pacing();
        self.clock.lock().start();
        // A stop (shutdown, cancel) wakes it too: that is no resume.
        if !self.cancel.load(Ordering::Acquire) {
            tracing::info!(vm = %self.vm, "relocation resumed");
        }
    }

    /// Stops the copier until `resume_copy`: durably recorded first, then
    /// the copier parks (returns once it has, with the status).
    pub fn pause(&self) -> Result<RelocationStatus> {
        {
            let st = self.state.lock();
            let state = st.0;
            match state {
                State::Copying | State::Converging | State::NotConverging | State::Paused => {}
                State::Switching => {
                    return Err(Error::busy(format!(
                        "the relocation of VM {} is cutting over and cannot be paused",
                        self.vm
                    )))
                }
                State::Done => {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("VM {} was already relocated", self.vm),
                    ))
                }
                State::Failed => {
                    drop(st);
                    return Err(self.failed_error());
                }
                // Never a copier's state (see `not_resumed`).
                State::NotResumed => {
                    return Err(Error::invalid(format!(
                        "the relocation of VM {} is not running",
                        self.vm
                    )))
                }
            }
            self.pause.store(true, Ordering::Release);
        }
        self.set_meta_paused(true)?;
        self.settle(|s| s != State::Paused && s.is_running())?;
        Ok(self.status())
    }

    /// Lets a paused copier go on (durably recorded first). A failed
    /// relocation has no copier to go on: refused, saying what to do (the
    /// session's `--resume` reopens it instead, see `retry`).
    pub fn resume_copy(&self) -> Result<RelocationStatus> {
        if self.state() == State::Failed {
            return Err(self.failed_error());
        }
        if !self.pause_requested() {
            return Ok(self.status());
        }
        self.set_meta_paused(false)?;
        self.pause.store(false, Ordering::Release);
        self.wake_copier();
        self.settle(|s| s == State::Paused)?;
        Ok(self.status())
    }

    /// Why a failed relocation goes no further and what to do: the answer
    /// to a pause of it, to a resume that could not reopen it (see
    /// `retry`), and to a new one into its directory (whose partial files
    /// it left there).
    pub fn failed_error(&self) -> Error {
        let st = self.status();
        // A cancel that could not finish: its error says to cancel again,
        // and `--resume` refuses it (review27 L4).
        if self.meta.lock().cancelling {
            return Error::busy(st.error.unwrap_or_else(|| {
                super::cancel::not_removed(&self.vm, &st.target, &"a cancel did not finish")
            }));
        }
        let dir = st.target.parent().unwrap_or(&st.target).display();
        Error::busy(format!(
            "the relocation of VM {vm} to {} failed ({}): fix the cause (free space on the \
             target, say) and run `recoverfs relocate {vm} --resume`, which retries it where \
             it stopped (the blocks already copied are kept); or cancel it (`recoverfs \
             relocate {vm} --cancel`, which removes its partial files) and start another \
             with --to; or start again from scratch into the same directory with \
             `recoverfs relocate {vm} --to {dir} --force`",
            st.target.display(),
            st.error.as_deref().unwrap_or("no reason recorded"),
            vm = self.vm,
        ))
    }

    /// Records `paused` in `relocation.json`; on failure the flag goes
    /// back to what the file says.
    fn set_meta_paused(&self, paused: bool) -> Result<()> {
        self.meta.lock().paused = paused;
        if let Err(e) = self.store_meta() {
            self.meta.lock().paused = !paused;
            self.pause.store(!paused, Ordering::Release);
            self.wake_copier();
            return Err(e);
        }
        Ok(())
    }

    /// Waits while `pending(state)` holds (the copier has not acted yet).
    fn settle(&self, pending: impl Fn(State) -> bool) -> Result<()> {
        let deadline = Instant::now() + SETTLE;
        while pending(self.state()) {
            if Instant::now() >= deadline {
                return Err(Error::busy(format!(
                    "the relocation of VM {} did not settle within {} s",
                    self.vm,
                    SETTLE.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}
