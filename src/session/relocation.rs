//! Pausing, resuming (see `relocate::pause`; a failed relocation is
//! retried, see `relocate::retry`) and cancelling (see `relocate::cancel`)
//! a session's relocation, under the VM's lock like every other change to
//! the session: a resume, pause, cancel, `relocate --to` or release of one
//! VM runs whole before the next begins, so a resume racing any of them
//! ends in the state of one order or the other.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Datastore, Session};
use crate::error::{Error, Result};
use crate::relocate::{Cancelled, NotResumed, Relocation, RelocationStatus, Reopened, State};
use crate::util::validate_name;

impl Datastore {
    /// Pauses (`pause`) or resumes VM `vm`'s relocation; returns its status
    /// once the copier has parked or gone on.
    /// A relocation a restarted daemon did not reopen is reopened by a
    /// resume (see `retry_relocation`), and so is a failed one (see
    /// `retry_failed`).
    pub fn pause_relocation(&self, vm: &str, pause: bool) -> Result<RelocationStatus> {
        validate_name("VM name", vm)?;
        let op = self.vm_op(vm);
        let _op = self.lock_op(vm, &op)?;
        let s = self.served(vm)?;
        let running = s.relocation.lock().clone();
        let Some(r) = running else {
            let held = s.relocation_not_resumed.lock().clone();
            return match held {
                Some(_) if !pause => self.retry_relocation(&s, vm),
                Some(h) => Err(Error::busy(format!(
                    "the relocation of VM {vm} to {} is not running to pause (a restarted \
                     daemon could not reopen it): {}; {}",
                    h.target.display(),
                    h.error,
                    h.then
                ))),
                None => Err(Error::not_found(format!("VM {vm} is not being relocated"))),
            };
        };
        if pause {
            r.pause()
        } else if r.state() == State::Failed {
            self.retry_failed(&s, vm, r)
        } else {
            r.resume_copy()
        }
    }

    /// Retries `failed`, the failed relocation in `s` (see
    /// `relocate::retry`): reopened from its record as a restart would, it
    /// replaces the failed one in the slot (never empty meanwhile, so
    /// `status` always shows one) and copies. Not reopened: the failed one
    /// stays, with the reason of now, as an error. The caller holds the
    /// VM's operation lock.
    fn retry_failed(
        &self,
        s: &Session,
        vm: &str,
        failed: Arc<Relocation>,
    ) -> Result<RelocationStatus> {
        let r = failed.retry(s.relocation_source())?;
        *s.relocation.lock() = Some(r.clone());
        drop(failed);
        // `stop_background` may have run through the slots meanwhile.
        if self.stopping.load(Ordering::SeqCst) {
            r.stop();
        }
        tracing::info!(vm, target = %r.status().target.display(), "failed relocation resumed");
        // Also if it had been paused when it failed.
        r.resume_copy()
    }

    /// Reopens the relocation recorded in `s` that a restarted daemon could
    /// not (its target was unreachable, say), as the restart would have,
    /// and lets it copy (also if it had been paused). Still not reopenable:
    /// the reason, as an error. The caller holds the VM's operation lock.
    fn retry_relocation(&self, s: &Session, vm: &str) -> Result<RelocationStatus> {
        let src = s.relocation_source();
        match Relocation::reopen_or_hold(src)? {
            Reopened::Live(r) => {
                tracing::info!(vm, target = %r.status().target.display(), "relocation reopened, resuming it");
                r.spawn();
                // Installed before the entry goes: `status` never shows none.
                *s.relocation.lock() = Some(r.clone());
                *s.relocation_not_resumed.lock() = None;
                // `stop_background` may have run through the slots meanwhile.
                if self.stopping.load(Ordering::SeqCst) {
                    r.stop();
                }
                r.resume_copy()
            }
            Reopened::NotResumed(h) => {
                // 409 whatever the cause: the state is not ready yet (a
                // missing target's ENOENT is not "no such relocation").
                let e = Error::busy(format!(
                    "the relocation of VM {vm} to {} still cannot be resumed: {}; {}",
                    h.target.display(),
                    h.error,
                    h.then
                ));
                *s.relocation_not_resumed.lock() = Some(h);
                Err(e)
            }
            Reopened::None => {
                *s.relocation_not_resumed.lock() = None;
                Err(Error::not_found(format!(
                    "VM {vm} has no relocation recorded"
                )))
            }
        }
    }

    /// Cancels VM `vm`'s relocation (see `relocate::cancel`): afterwards
    /// the session has none, and `relocate` may start another. Refused
    /// after the cutover. A relocation recorded but not resumed (its
    /// target was unreachable at the restart) is cancelled too. Leftovers
    /// that could not be removed are an error after the cancel is done.
    pub fn cancel_relocation(&self, vm: &str, keep_target: bool) -> Result<Cancelled> {
        validate_name("VM name", vm)?;
        let op = self.vm_op(vm);
        let _op = self.lock_op(vm, &op)?;
        let s = self.served(vm)?;
        // The slot changes only under the VM's operation lock (held).
        let running = s.relocation.lock().clone();
        let c = match running {
            Some(r) => {
                let c = r.cancel(keep_target)?;
                *s.relocation.lock() = None;
                c
            }
            None => {
                let c = Relocation::cancel_recorded(s.relocation_source(), keep_target);
                let c = c.inspect_err(|_| {
                    // Marked `cancelling` before the removal failed: shown
                    // (and refused a resume) as the cancel to finish it is,
                    // not as the relocation not resumed it was.
                    let src = s.relocation_source();
                    if let Some(h) = NotResumed::after_failed_cancel(src) {
                        *s.relocation_not_resumed.lock() = Some(h);
                    }
                })?;
                // The record is gone (or was): nothing left to resume.
                *s.relocation_not_resumed.lock() = None;
                c.ok_or_else(|| Error::not_found(format!("VM {vm} has no relocation to cancel")))?
            }
        };
        if let Some(e) = &c.leftover {
            return Err(e.clone().context(format!(
                "the relocation of VM {vm} to {} was cancelled (no restart resumes it)",
                c.target.display()
            )));
        }
        Ok(c)
    }
}
