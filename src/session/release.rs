//! Releasing a session: its staging made durable (or discarded, with a
//! relocation that had not cut over cancelled), its pin and hooks, under
//! the VM's lock like every other change to the session.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{holders, upload, Datastore, Session};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::relocate::{Meta, Relocation, RelocationStatus, State};
use crate::repo::limits::MAX_META_BYTES;
use crate::staging::io;
use crate::util::validate_name;

/// A session's relocation record (`relocate`'s `relocation.json`).
const RECORD: &str = "relocation.json";

/// What a release did: the session's backup, and what became of its
/// relocation (explore10 L3: the client said nothing of it).
#[derive(Debug, Clone)]
pub struct Released {
    pub backup: String,
    pub relocation: Option<ReleasedRelocation>,
}

/// A released session's relocation (`relocation` in the release API's
/// answer).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReleasedRelocation {
    pub target: PathBuf,
    /// Its state when the session was released.
    pub state: State,
    /// `stopped`: not cut over, its copy stopped with the session, and the
    /// next `recover` resumes it (paused, if it was: then `relocate
    /// --resume`); `cut-over`: the VM's disks are the target files, kept;
    /// `cancelled` (with `--discard`): its target files removed, those
    /// there before it kept; `cancel-unfinished`: a cancel that could not
    /// finish, which `relocate --cancel` finishes after the next
    /// `recover`; `cancel-not-recorded`: a cancel whose `cancelling` mark
    /// could not be written, not even by the release (review30 M1):
    /// nothing durable says cancel, so the next `recover` resumes the copy
    /// (which may cut over), and `release --discard` cancels it with the
    /// staging.
    pub outcome: &'static str,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// `cancelled`: what it removed (files, then the directory) and kept.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<PathBuf>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<PathBuf>,
}

impl ReleasedRelocation {
    fn of(st: &RelocationStatus) -> Self {
        let outcome = match st.state {
            _ if st.cancel_unfinished.is_some() && st.cancel_unmarked => "cancel-not-recorded",
            _ if st.cancel_unfinished.is_some() => "cancel-unfinished",
            State::Done => "cut-over",
            _ => "stopped",
        };
        ReleasedRelocation {
            target: st.target.clone(),
            state: st.state,
            outcome,
            bytes_done: st.bytes_done,
            bytes_total: st.bytes_total,
            removed: vec![],
            kept: vec![],
        }
    }
}

/// Writes the `cancelling` mark a cancel of `s`'s relocation could not
/// (see `relocate::cancel`, step 3): the record, as it is on disk, marked,
/// replaces it atomically and durably. Its copier must be stopped. Whether
/// the record is now marked (or gone: nothing to resume).
fn mark_cancel(s: &Session, vm: &str) -> bool {
    let path = s.dir.join(RECORD);
    let storage = s.staging.storage().as_ref();
    let marked = storage
        .read(&path, MAX_META_BYTES)
        .ctx(|| format!("read {}", path.display()))
        .and_then(|bytes| {
            let Some(bytes) = bytes else {
                return Ok(());
            };
            let mut meta: Meta = serde_json::from_slice(&bytes)
                .map_err(|e| Error::corrupt(format!("{} is damaged ({e})", path.display())))?;
            if meta.cancelling || meta.switched {
                return Ok(());
            }
            meta.cancelling = true;
            let bytes = serde_json::to_vec_pretty(&meta).expect("json");
            io::replace(storage, &path, &bytes)
        });
    match marked {
        Ok(()) => {
            tracing::info!(vm, "the cancel of its relocation is recorded at release");
            true
        }
        Err(e) => {
            tracing::warn!(vm, "the cancel of its relocation could not be recorded at release either (the next recover resumes the copy; release --discard cancels it): {e}");
            false
        }
    }
}

impl Datastore {
    /// Ends a session after making its staging durable. Refused while any
    /// disk file is open. With `discard`, the staging data is deleted. Once
    /// this returns, nothing of the session writes to staging any more. A
    /// disk whose staging could not be made durable, or an `active` marker
    /// (or discarded staging) that could not be removed durably, is
    /// reported as an error after the session is released in full.
    pub fn release(&self, vm: &str, discard: bool) -> Result<String> {
        self.release_report(vm, discard).map(|r| r.backup)
    }

    /// [`Datastore::release`], saying what became of the relocation.
    pub fn release_report(&self, vm: &str, discard: bool) -> Result<Released> {
        validate_name("VM name", vm)?;
        let op = self.vm_op(vm);
        let _op = self.lock_op(vm, &op)?;
        self.release_locked(vm, discard)
    }

    /// `release VM [--discard] --backup ID`: the session served from
    /// backup ID is released, or, with `discard`, the staging kept from it
    /// dropped; decided under the VM's lock, so that a release or recover
    /// meanwhile never makes it touch another backup's staging (review25
    /// M1). What was released or discarded: (released, backup ids, what
    /// became of a released session's relocation).
    pub fn release_backup(
        &self,
        vm: &str,
        backup: &str,
        discard: bool,
    ) -> Result<(bool, Vec<String>, Option<ReleasedRelocation>)> {
        validate_name("VM name", vm)?;
        validate_name("backup id", backup)?;
        let op = self.vm_op(vm);
        let _op = self.lock_op(vm, &op)?;
        if self.session(vm).is_some_and(|s| s.backup == backup) {
            let r = self.release_locked(vm, discard)?;
            let discarded = if discard { vec![r.backup] } else { vec![] };
            return Ok((true, discarded, r.relocation));
        }
        if !discard {
            return Err(Error::not_found(format!(
                "VM {vm} is not served from backup {backup} (only --discard drops a kept staging)"
            )));
        }
        Ok((false, self.discard_kept_backup_locked(vm, backup)?, None))
    }

    /// [`Datastore::release`] with the VM's lock held.
    fn release_locked(&self, vm: &str, discard: bool) -> Result<Released> {
        let session = self.served(vm)?;
        {
            let mut st = session.state.lock();
            if !st.open.is_empty() {
                // Who holds it, so the right VM or client is stopped.
                return Err(Error::busy(format!(
                    "a disk of VM {vm} is still open ({} handle(s)): {}; stop the VM first",
                    st.open.len(),
                    holders::describe(&st.open.list())
                )));
            }
            st.released = true;
        }
        self.sessions.write().remove(vm);
        // The copier stops here; the next recover resumes it.
        let mut relocation = session.relocation.lock().as_ref().map(|r| {
            let before = r.state();
            r.stop();
            let mut st = r.status();
            st.state = before;
            // A cancel whose mark could not be written: written now, with
            // the copier stopped, or the next recover resumes the copy
            // (review30 M1). A discard cancels it below anyway.
            if st.cancel_unmarked && !discard {
                st.cancel_unmarked = !mark_cancel(&session, vm);
            }
            ReleasedRelocation::of(&st)
        });
        if relocation.is_none() {
            // Recorded, not reopened after a restart: it stays recorded.
            relocation = (session.relocation_not_resumed.lock().as_ref())
                .map(|h| ReleasedRelocation::of(&h.status()));
        }
        session.stop_prefetch();
        // Its entries stay; the next recover resumes it.
        upload::halt(&session);
        session.save_profile_logged(&self.repo);
        for d in &session.disks {
            d.close();
        }
        let mut failed = vec![];
        for d in &session.disks {
            if let Err(e) = d.flush() {
                failed.push(format!("disk{}: {e}", d.index));
            }
        }
        // The session is closed for good: it is released fully (pin, hooks)
        // whatever fails below, and the failure is reported after.
        let relocation_left = match discard {
            true => self.cancel_relocation_of_discarded(&session, vm, &mut relocation),
            false => None,
        };
        let unmarked = if discard {
            let r = self.discard_unpinned(vm, &session.backup, &session.staging);
            if r.is_err() {
                // What is left of the staging stays protected.
                self.pin(&session, false);
            }
            r.map_err(|e| {
                e.context(format!(
                    "VM {vm} was released, but its staging could not be fully discarded \
                     (what is left stays, kept and pinned)"
                ))
            })
        } else {
            let r = session.staging.set_active(vm, &session.backup, false);
            self.pin(&session, false);
            // A restarted daemon that finds the marker serves it again,
            // pinned as served: never half released.
            r.map_err(|e| {
                let durable = match failed.is_empty() {
                    true => String::new(),
                    false => format!(
                        ", and it is not fully durable ({}): writes since the last good flush may be lost",
                        failed.join("; ")
                    ),
                };
                e.context(format!(
                    "VM {vm} was released, but its staging may still be marked active \
                     (a restarted daemon may serve it again){durable}"
                ))
            })
        };
        for f in self.on_release.read().iter() {
            f(&session);
        }
        tracing::info!(vm, backup = %session.backup, discard, "recovery session released");
        unmarked?;
        if let Some(e) = relocation_left {
            return Err(e.context(format!("VM {vm} was released and its staging discarded")));
        }
        if !failed.is_empty() && !discard {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "VM {vm} was released, but its staging is not fully durable ({}): writes since the last good flush may be lost",
                    failed.join("; ")
                ),
            ));
        }
        Ok(Released {
            backup: session.backup.clone(),
            relocation,
        })
    }

    /// `release --discard` of a VM whose relocation has not cut over: the
    /// relocation is cancelled as `relocate --cancel` does (the target
    /// files it created are removed; files there before it are kept), since
    /// nothing would name its partial files once the staging is gone. One
    /// that cut over keeps its target: that is the VM's disk now. What
    /// could not be removed, or a cancel refused, is the error returned.
    /// `shown`: what the release reports of it, made `cancelled` with what
    /// was removed and kept.
    fn cancel_relocation_of_discarded(
        &self,
        s: &Session,
        vm: &str,
        shown: &mut Option<ReleasedRelocation>,
    ) -> Option<Error> {
        let live = s.relocation.lock().clone();
        let cancelled = match live {
            Some(r) if r.state() == crate::relocate::State::Done => return None,
            Some(r) => r.cancel(false),
            None => {
                let src = s.relocation_source();
                match Relocation::cancel_recorded(src, false) {
                    Ok(None) => return None,
                    Ok(Some(c)) => Ok(c),
                    Err(e) => Err(e),
                }
            }
        };
        match cancelled {
            Ok(c) => {
                tracing::info!(vm, target = %c.target.display(), removed = ?c.removed, kept = ?c.kept,
                    "relocation cancelled with the discarded staging");
                let r = shown.get_or_insert_with(|| ReleasedRelocation {
                    target: c.target.clone(),
                    state: State::NotResumed,
                    outcome: "cancelled",
                    bytes_done: 0,
                    bytes_total: 0,
                    removed: vec![],
                    kept: vec![],
                });
                r.outcome = "cancelled";
                r.removed = c.removed.clone();
                r.kept = c.kept.clone();
                let paths = |v: &[PathBuf]| {
                    let v: Vec<String> = v.iter().map(|p| p.display().to_string()).collect();
                    match v.is_empty() {
                        true => "none".to_string(),
                        false => v.join(", "),
                    }
                };
                c.leftover.map(|e| {
                    e.context(format!(
                        "its relocation to {} was cancelled (removed: {}; kept: {}), but files are left",
                        c.target.display(),
                        paths(&c.removed),
                        paths(&c.kept)
                    ))
                })
            }
            Err(e) => Some(e.context(
                "its relocation could not be cancelled: its partial target files (without vm.json) stay",
            )),
        }
    }

    /// [`Self::release`] of a throwaway recovery whose reader (QEMU, a
    /// loop device) has just let go: the kernel sends the FUSE release of
    /// its handles in the background, after the process is gone or the
    /// device detached, so they may still count as open for a moment. A
    /// disk still open after `wait` is an error, never passed over: the
    /// session's repository pin would be left behind.
    pub fn release_when_closed(&self, vm: &str, discard: bool, wait: Duration) -> Result<String> {
        let deadline = Instant::now() + wait;
        loop {
            match self.release(vm, discard) {
                Err(e) if e.kind() == ErrorKind::Busy && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }
}
