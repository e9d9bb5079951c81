//! Cancelling a relocation (`POST /sessions/{vm}/relocate/cancel`,
//! `recoverfs relocate VM --cancel [--keep-target]`): a wrong target, one
//! filling up or too slow is dropped, and `relocate VM --to OTHER` may
//! start again elsewhere. The VM goes on from staging throughout: a cancel
//! never pauses guest I/O and never touches staged data.
//!
//! In this order (a crash may stop it between any two steps):
//! 1. **Refused once the cutover began** (`Switching`) or committed
//!    (`Done`): the target is then the VM's live disk. Decided under the
//!    state lock, where the copier's `begin_switching` checks the stop flag
//!    this sets: a cancel either comes first and holds the cutover off for
//!    good, or finds it under way.
//! 2. The copier stops (reads in flight abandoned, written blocks
//!    committed: every copied bit stays true).
//! 3. **The commit:** `relocation.json` is removed and the session
//!    directory synced. Before it the relocation is recorded whole (record,
//!    copied maps, targets), and a restarted daemon resumes it; after it no
//!    daemon does. If this step fails the relocation is not cancelled: it
//!    stays recorded, `failed` (its copier is stopped), a restart resumes
//!    it, and a cancel may be asked again.
//! 4. The disks stop tracking copies (eviction no longer waits for copied
//!    bits, passthrough may be granted again); the copied maps are removed.
//! 5. The target files this relocation created are removed (not with
//!    `keep_target`), then its directory if this relocation created it and
//!    it is empty. A file that was there before (`--force` emptied it) is
//!    kept: recoverfs removes only what it made (a record written before
//!    `created` existed names nothing, so everything is kept).
//!
//! A failure in 4 or 5 leaves the relocation cancelled and is reported,
//! naming what is left. A crash in them leaves files no record refers to:
//! a partial copy without `vm.json`, which never passes for a complete one
//! (remove it by hand, or relocate over it with `--force`).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Serialize;

use super::{target_file_of, Meta, Relocation, Source, State};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::repo::limits::MAX_META_BYTES;
use crate::staging::io::{self, Storage};
use crate::volume::Volume;

/// What a cancel did.
#[derive(Debug, Clone, Serialize)]
pub struct Cancelled {
    pub target: PathBuf,
    /// Target files (and the directory) removed.
    pub removed: Vec<PathBuf>,
    /// Target files left in place: there before the relocation, or asked
    /// to be kept.
    pub kept: Vec<PathBuf>,
    /// What could not be cleaned up after the cancel was committed.
    #[serde(skip)]
    pub leftover: Option<Error>,
}

impl Relocation {
    /// Cancels the relocation for good (see the module doc); `Err` means
    /// it was not cancelled (refused, or its record could not be removed).
    pub fn cancel(&self, keep_target: bool) -> Result<Cancelled> {
        {
            let st = self.state.lock();
            match st.0 {
                State::Switching => {
                    return Err(Error::busy(format!(
                        "the relocation of VM {} is cutting over and cannot be cancelled: \
                         once it commits, {} is the VM's live disk",
                        self.vm,
                        self.target_dir.display()
                    )))
                }
                State::Done => {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "VM {} was already relocated: {} is its live disk now, there is \
                             nothing to cancel",
                            self.vm,
                            self.target_dir.display()
                        ),
                    ))
                }
                _ => {}
            }
            self.cancel.store(true, Ordering::Release);
        }
        self.stop();
        let meta = self.meta.lock().clone();
        let forgotten = {
            let _io = self.meta_io.lock();
            forget_record(self.storage.as_ref(), &self.meta_path)
        };
        if let Err(e) = forgotten {
            let e = e.context(format!(
                "the relocation of VM {} was not cancelled",
                self.vm
            ));
            *self.state.lock() = (
                State::Failed,
                Some(format!(
                    "{e}; its copier is stopped, a restarted daemon may resume it: cancel again"
                )),
                None,
            );
            return Err(e);
        }
        tracing::info!(vm = %self.vm, target = %self.target_dir.display(), "relocation cancelled");
        Ok(clean_up(
            self.storage.as_ref(),
            &self.meta_path,
            &meta,
            &self.disks,
            keep_target,
        ))
    }

    /// Cancels a relocation that is recorded in the session but was not
    /// opened (its target was unreachable when the daemon restarted, so the
    /// VM is served from staging); `Ok(None)` if none is recorded.
    pub fn cancel_recorded(src: Source, keep_target: bool) -> Result<Option<Cancelled>> {
        let p = Self::meta_path(src.session_dir);
        let Some(bytes) = src
            .storage
            .read(&p, MAX_META_BYTES)
            .ctx(|| format!("read {}", p.display()))?
        else {
            return Ok(None);
        };
        let meta: Meta = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(format!("{} is damaged ({e})", p.display())))?;
        if meta.switched {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "VM {} was already relocated: {} is its live disk now, there is nothing to cancel",
                    src.vm,
                    meta.target.display()
                ),
            ));
        }
        forget_record(src.storage.as_ref(), &p)
            .map_err(|e| e.context(format!("the relocation of VM {} was not cancelled", src.vm)))?;
        tracing::info!(vm = src.vm, target = %meta.target.display(), "relocation (not resumed) cancelled");
        Ok(Some(clean_up(
            src.storage.as_ref(),
            &p,
            &meta,
            src.disks,
            keep_target,
        )))
    }
}

/// The commit of a cancel: the record gone, durably.
fn forget_record(storage: &dyn Storage, meta_path: &Path) -> Result<()> {
    storage
        .remove_file(meta_path)
        .ctx(|| format!("remove {}", meta_path.display()))?;
    io::sync_parent(storage, meta_path)
}

/// Steps 4 and 5, after the commit: nothing here can undo the cancel, so
/// every failure is collected into `leftover` and the rest goes on.
fn clean_up(
    storage: &dyn Storage,
    meta_path: &Path,
    meta: &Meta,
    disks: &[Arc<Volume>],
    keep_target: bool,
) -> Cancelled {
    let mut problems = vec![];
    let session_dir = meta_path.parent().unwrap_or(Path::new("/"));
    for d in disks {
        d.untrack_copies();
        let p = Relocation::copied_path(session_dir, d);
        if let Err(e) = storage.remove_file(&p) {
            problems.push(format!("remove {}: {e}", p.display()));
        }
    }
    if let Err(e) = storage.sync_dir(session_dir) {
        problems.push(format!("fsync directory {}: {e}", session_dir.display()));
    }
    let (mut removed, mut kept) = (vec![], vec![]);
    for d in disks {
        let p = target_file_of(&meta.target, d);
        if keep_target || !meta.created.contains(&d.index) {
            kept.push(p);
            continue;
        }
        // Not listed when missing (a target unreachable since the start).
        match storage.exists(&p).and_then(|there| match there {
            true => storage.remove_file(&p).map(|()| true),
            false => Ok(false),
        }) {
            Ok(true) => removed.push(p),
            Ok(false) => {}
            Err(e) => problems.push(format!("remove {}: {e}", p.display())),
        }
    }
    if !removed.is_empty() {
        if let Err(e) = storage.sync_dir(&meta.target) {
            problems.push(format!("fsync directory {}: {e}", meta.target.display()));
        }
    }
    // The directory is on the real filesystem (`check_target` made it):
    // removed only if empty, so nothing kept or added since goes with it.
    if meta.created_dir && !keep_target {
        match std::fs::remove_dir(&meta.target) {
            Ok(()) => {
                removed.push(meta.target.clone());
                if let Some(parent) = meta.target.parent() {
                    if let Err(e) = storage.sync_dir(parent) {
                        problems.push(format!("fsync directory {}: {e}", parent.display()));
                    }
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
            Err(e) => problems.push(format!("remove {}: {e}", meta.target.display())),
        }
    }
    let leftover = (!problems.is_empty()).then(|| {
        Error::new(
            ErrorKind::Io,
            format!(
                "its leftovers could not all be removed ({})",
                problems.join("; ")
            ),
        )
    });
    Cancelled {
        target: meta.target.clone(),
        removed,
        kept,
        leftover,
    }
}
