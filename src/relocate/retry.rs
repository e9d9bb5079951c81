//! Retrying a failed relocation in the running daemon (`relocate VM
//! --resume` of one in state `failed`: a target write or sync failed, the
//! target filled up, the cutover could not commit).
//!
//! A failed relocation that has not cut over keeps its record
//! (`relocation.json`), copied maps and target files, and a restarted
//! daemon resumes it (`open`). Restarting the daemon to retry would
//! interrupt every VM it serves over FUSE, so `retry` does in the running
//! daemon what the restart does, once the administrator fixed the cause:
//! the failed relocation's copier is joined (it ended when it failed), the
//! record is read again and reopened by `reopen_recorded` with every check
//! and rule of a restart (the target pinned and its owner mark checked,
//! each file checked against its copied map, the restart rule applied
//! after the maps are installed), and a new copier starts from the copied
//! maps: blocks already copied (and not changed by the guest since) are
//! not copied again. If the cause persists, the new copier fails as the
//! first did, with the reason of now.
//!
//! * The failed relocation's target files stay open throughout: where the
//!   reopen finds the very file (same inode) the new relocation takes the
//!   open file over, with the lock it has held since it was opened (see
//!   `open_in`). Closing them first would let another relocation's
//!   `--force` take them in between; opening them again beside it would
//!   conflict with its own lock.
//! * Not reopened (the target unreachable or replaced, a file refused, the
//!   record unreadable): the failed relocation stays as it was, `failed`
//!   with the reason the reopen gave, its copied maps tracked by the disks
//!   again; a later `--resume` tries again.
//! * Never after the cutover began to commit: a failed relocation has not
//!   (every failure before the commit leaves `switched` false, see
//!   `cutover`; after it the state is `Done`, with an error if the commit
//!   is not durable, and stays so). A record that says `switched` is not
//!   reopened here.
//! * Concurrency: the caller (the session) holds the VM's operation lock,
//!   as for every pause, resume, cancel, `--to` and release, so none of
//!   them runs between the state check here and the new relocation
//!   replacing this one in the session; the copier of this one has ended
//!   (joined), so nothing else changes its state or writes its record.
//! * `status` goes on counting: the new relocation starts from this one's
//!   `bytes_copied` and copy time (both "by this daemon").

use super::*;

impl Relocation {
    /// Reopens this failed relocation from its record, as a restarted daemon
    /// would, and starts its copier: the relocation that now copies, which
    /// replaces this one in the session (whose VM operation lock the caller
    /// holds). `Err`: not reopened; this one stays `failed`, with the reason
    /// of now, and the error says what to do.
    pub fn retry(self: &Arc<Self>, src: Source) -> Result<Arc<Relocation>> {
        if self.state() != State::Failed {
            return Err(Error::invalid(format!(
                "the relocation of VM {} has not failed: nothing to retry",
                self.vm
            )));
        }
        // It ended when it failed (or a cancel that could not commit
        // stopped it): joined, nothing of it runs from here on.
        self.stop();
        // The administrator cancelled it: never resumed, however the
        // cancel failed (its state's error says what, and to cancel again).
        if self.meta.lock().cancelling {
            let why = self.state.lock().1.clone();
            return Err(Error::busy(why.unwrap_or_else(|| {
                super::cancel::not_removed(&self.vm, &self.target_dir, &"unknown")
            })));
        }
        let meta = match Self::read_meta(&src) {
            Ok(Some(meta)) => meta,
            Ok(None) => {
                // A cancel removed it but could not make that durable, or
                // someone removed it: nothing to reopen, and a restart might
                // not resume it either.
                let why = format!(
                    "its record {} is gone (a cancel that did not complete?), so it cannot be \
                     resumed: cancel it (`recoverfs relocate {vm} --cancel`)",
                    self.meta_path.display(),
                    vm = self.vm
                );
                self.state.lock().2 = Some(why.clone());
                return Err(Error::busy(format!(
                    "the relocation of VM {} to {}: {why}",
                    self.vm,
                    self.target_dir.display()
                )));
            }
            Err(e) => return Err(self.still_failed(e.to_string(), None)),
        };
        if meta.cancelling {
            return Err(Error::busy(super::cancel::not_removed(
                &self.vm,
                &self.target_dir,
                &"a cancel did not finish",
            )));
        }
        if meta.switched || self.meta.lock().switched {
            // Not a failure before the commit: never reopened here.
            return Err(self.failed_error());
        }
        let reopened = Self::reopen_recorded(src, meta, &self.targets);
        let r = match reopened {
            Ok(Reopened::Live(r)) => r,
            Ok(Reopened::NotResumed(h)) => {
                self.track_again();
                return Err(self.still_failed(h.error.to_string(), Some(h.then)));
            }
            Ok(Reopened::None) => {
                self.track_again();
                return Err(self.still_failed("no relocation recorded".into(), None));
            }
            Err(e) => {
                self.track_again();
                return Err(self.still_failed(e.to_string(), None));
            }
        };
        r.bytes_copied
            .store(self.bytes_copied.load(Ordering::Relaxed), Ordering::Relaxed);
        r.clock.lock().carry(self.clock.lock().active());
        tracing::info!(vm = %self.vm, target = %self.target_dir.display(),
            "failed relocation reopened in the running daemon, resuming it");
        r.spawn();
        Ok(r)
    }

    /// Not reopened (`why`, and what to do if the reopen said): still
    /// failed, now for that reason; the answer to the resume.
    fn still_failed(&self, why: String, then: Option<String>) -> Error {
        tracing::warn!(vm = %self.vm, "failed relocation not reopened: {why}");
        *self.state.lock() = (State::Failed, Some(why), then);
        self.failed_error()
    }

    /// A reopen that failed may have left disks tracking none (see
    /// `open_in`): they track this relocation's copied maps again, as
    /// before it (a passthrough open since keeps a disk untracked).
    fn track_again(&self) {
        for (d, m) in self.disks.iter().zip(&self.copied) {
            let _ = d.track_copies(m.clone());
        }
    }
}
