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
//! 3. **The intent:** `relocation.json` is rewritten with `cancelling`
//!    (atomically, synced). From then on the relocation is never resumed:
//!    a restarted daemon holds it as not resumed, and `relocate --resume`
//!    refuses it, both saying "was cancelled; its record could not be
//!    removed: …; run relocate --cancel again", which finishes it. If this
//!    write fails the relocation is not cancelled: it stays recorded as it
//!    was, `failed` (its copier is stopped), a restart resumes it, and a
//!    cancel may be asked again (`--resume` in this daemon refuses it).
//! 4. **The commit:** `relocation.json` is removed and the session
//!    directory synced. Before it the relocation is recorded whole (record,
//!    copied maps, targets); after it nothing is recorded. If this step
//!    fails the record stays, marked: the cancel is not finished, and is
//!    finished by the next one (fixmisc 2: a relocation whose record could
//!    not be removed was resumed as if it had failed on its own).
//! 5. The disks stop tracking copies (eviction no longer waits for copied
//!    bits, passthrough may be granted again); the copied maps are removed.
//! 6. The target files this relocation created are removed (not with
//!    `keep_target`), with its owner mark (`.recoverfs-relocation`, also
//!    when every file was there before it), then its directory if this
//!    relocation created it and it is empty. A file that was there before (`--force` emptied it) is
//!    kept: recoverfs removes only what it made (a record written before
//!    `created` existed names nothing, so everything is kept). Nothing is
//!    removed in a directory that is not the one the relocation began in,
//!    or through a link (see `pin_target`): the files are then left, and
//!    said to be wherever that directory went (never named by the paths
//!    that now lead to another directory's files). A target that cannot be
//!    reached (primary storage not mounted) has its files left and named.
//!    One gone from a reachable parent (removed by an administrator) left
//!    nothing: the cancel succeeds, naming nothing (see `find_target`).
//!
//! A failure in 5 or 6 leaves the relocation cancelled and is reported,
//! naming what is left. A crash in them leaves files no record refers to:
//! a partial copy without `vm.json`, which never passes for a complete one
//! (remove it by hand, or relocate over it with `--force`).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Serialize;

use super::target::{is_replaced, TargetId};
use super::{pin_target, target_file_of, Meta, Relocation, Source, State};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::staging::io::{self, PinnedDir, Storage};
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
        // Marked in memory too: `retry` refuses it even if the mark
        // cannot be written.
        let meta = {
            let mut m = self.meta.lock();
            m.cancelling = true;
            m.clone()
        };
        let forgotten = {
            let _io = self.meta_io.lock();
            let marked = mark_cancelling(self.storage.as_ref(), &self.meta_path, &meta);
            self.cancel_unmarked
                .store(marked.is_err(), Ordering::Release);
            marked.map(|()| forget_record(self.storage.as_ref(), &self.meta_path))
        };
        let e = match forgotten {
            Ok(Ok(())) => None,
            // Nothing durable says cancel: a restart resumes it.
            Err(e) => Some(e.context(format!(
                "the relocation of VM {} was not cancelled (its copier is stopped; a restarted \
                 daemon may resume it): cancel again",
                self.vm
            ))),
            Ok(Err(e)) => Some(Error::new(
                e.kind(),
                not_removed(&self.vm, &self.target_dir, &e),
            )),
        };
        if let Some(e) = e {
            *self.state.lock() = (State::Failed, Some(e.to_string()), None);
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
        let Some(meta) = Self::read_meta(&src)? else {
            return Ok(None);
        };
        let p = Self::meta_path(src.session_dir);
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
        let marked = Meta {
            cancelling: true,
            ..meta.clone()
        };
        mark_cancelling(src.storage.as_ref(), &p, &marked)
            .map_err(|e| e.context(format!("the relocation of VM {} was not cancelled", src.vm)))?;
        forget_record(src.storage.as_ref(), &p)
            .map_err(|e| Error::new(e.kind(), not_removed(src.vm, &meta.target, &e)))?;
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

/// The intent of a cancel, durably: `meta`, marked `cancelling`, replaces
/// the record.
fn mark_cancelling(storage: &dyn Storage, meta_path: &Path, meta: &Meta) -> Result<()> {
    debug_assert!(meta.cancelling);
    let bytes = serde_json::to_vec_pretty(meta).expect("json");
    io::replace(storage, meta_path, &bytes)
}

/// The line of a cancel whose record, marked, could not be removed (`e`);
/// also what a resume or a restart then says (see `NotResumed::cancelled`).
pub(super) fn not_removed(vm: &str, target: &Path, e: &dyn std::fmt::Display) -> String {
    format!(
        "the relocation of VM {vm} to {} was cancelled; its record could not be removed: {e}; \
         run `recoverfs relocate {vm} --cancel` again",
        target.display()
    )
}

/// The commit of a cancel: the record gone, durably.
fn forget_record(storage: &dyn Storage, meta_path: &Path) -> Result<()> {
    storage
        .remove_file(meta_path)
        .ctx(|| format!("remove {}", meta_path.display()))?;
    io::sync_parent(storage, meta_path)
}

/// Removes disks `remove`'s files from `dir`, the pinned target, and
/// lists them as `removed` under their recorded names.
fn remove_files(
    storage: &dyn Storage,
    meta: &Meta,
    dir: &PinnedDir,
    remove: &[&Arc<Volume>],
    removed: &mut Vec<PathBuf>,
    problems: &mut Vec<String>,
) {
    let before = removed.len();
    for d in remove {
        let (p, shown) = (
            target_file_of(dir.path(), d),
            target_file_of(&meta.target, d),
        );
        // Not listed when missing (a target unreachable since the start).
        match storage.exists(&p).and_then(|there| match there {
            true => storage.remove_file(&p).map(|()| true),
            false => Ok(false),
        }) {
            Ok(true) => removed.push(shown),
            Ok(false) => {}
            Err(e) => problems.push(format!("remove {}: {e}", shown.display())),
        }
    }
    if removed.len() > before {
        if let Err(e) = storage.sync_dir(dir.path()) {
            problems.push(format!("fsync directory {}: {e}", meta.target.display()));
        }
    }
}

/// Removes the target directory if empty and still the one the relocation
/// began in. It is on the real filesystem (`check_target` made it); its
/// parent is pinned, so the entry looked at is the one removed (an empty
/// directory swapped in between the two steps would be the only loss).
fn remove_target_dir(
    storage: &dyn Storage,
    meta: &Meta,
    removed: &mut Vec<PathBuf>,
    problems: &mut Vec<String>,
) {
    use std::os::unix::fs::MetadataExt;
    let (Some(parent), Some(name)) = (meta.target.parent(), meta.target.file_name()) else {
        return;
    };
    let up = match storage.pin_dir(parent) {
        Ok(up) => up,
        Err(e) => {
            problems.push(format!("remove {}: {e}", meta.target.display()));
            return;
        }
    };
    let p = up.path().join(name);
    let same = match std::fs::symlink_metadata(&p) {
        Ok(m) => {
            let now = TargetId {
                dev: m.dev(),
                ino: m.ino(),
                uid: Some(m.uid()),
                boot: storage.boot_id(),
                // Only an empty directory is removed, and a mount point
                // cannot be: its type does not matter here.
                fs_type: meta.target_id.as_ref().and_then(|id| id.fs_type),
                root_only: super::only_root_can_change(&meta.target),
            };
            m.is_dir() && meta.target_id.as_ref().is_none_or(|id| id.admits(&now))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            problems.push(format!("remove {}: {e}", meta.target.display()));
            return;
        }
    };
    if !same {
        problems.push(format!(
            "{} was replaced since the relocation began: left",
            meta.target.display()
        ));
        return;
    }
    // Removed only if empty, so nothing kept or added since goes with it.
    match std::fs::remove_dir(&p) {
        Ok(()) => {
            removed.push(meta.target.clone());
            if let Err(e) = storage.sync_dir(up.path()) {
                problems.push(format!("fsync directory {}: {e}", parent.display()));
            }
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
        Err(e) => problems.push(format!("remove {}: {e}", meta.target.display())),
    }
}

/// What is at the recorded target, which `pin_target` refused with `e`.
enum Found {
    Gone,
    Replaced,
    Unreachable,
}

/// Tells a target removed already from one replaced and one unreachable.
/// Absent from a directory above it that can be reached is gone, unless
/// that directory is on another filesystem than the target was (within one
/// boot: device numbers may change at a reboot), as when primary storage is
/// not mounted over it (after a reboot that case passes for gone).
fn find_target(storage: &dyn Storage, meta: &Meta, e: &Error) -> Found {
    if is_replaced(e) {
        return Found::Replaced;
    }
    let (Some(parent), Some(name)) = (meta.target.parent(), meta.target.file_name()) else {
        return Found::Unreachable;
    };
    let Ok(up) = storage.pin_dir(parent) else {
        return Found::Unreachable;
    };
    match std::fs::symlink_metadata(up.path().join(name)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let elsewhere = match (&meta.target_id, up.id()) {
                (Some(id), Some(up)) => {
                    !id.boot.is_empty() && id.boot == storage.boot_id() && up.dev != id.dev
                }
                _ => false,
            };
            if elsewhere {
                Found::Unreachable
            } else {
                Found::Gone
            }
        }
        // A link in its place (another directory is refused as `is_replaced`).
        Ok(m) if m.file_type().is_symlink() => Found::Replaced,
        _ => Found::Unreachable,
    }
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
    let mut remove = vec![];
    for d in disks {
        if keep_target || !meta.created.contains(&d.index) {
            kept.push(target_file_of(&meta.target, d));
        } else {
            remove.push(d);
        }
    }
    let remove_dir = meta.created_dir && !keep_target;
    // The mark names a relocation no record refers to once cancelled; left,
    // it alone keeps a directory of files that were all there before
    // (`--force`) from being empty again.
    let remove_mark = meta.owner_mark.is_some() && !keep_target;
    let files_or_dir = !remove.is_empty() || remove_dir;
    // Only reached when there is something to remove in it.
    if files_or_dir || remove_mark {
        let owned = pin_target(storage, meta)
            .and_then(|dir| super::target::check_owner(storage, meta, &dir).map(|o| (dir, o)));
        match owned {
            // Another relocation's files now (a `--force` over them), or
            // a directory made again since: never removed as this one's.
            // The mark there is then not this one's either.
            Err(e) if e.kind() == ErrorKind::Busy && pin_target(storage, meta).is_ok() => {
                if files_or_dir {
                    kept.extend(remove.iter().map(|d| target_file_of(&meta.target, d)));
                    problems.push(format!("{e}; left"));
                }
            }
            Ok((dir, super::target::Owned::Unmarked)) => {
                let there = |d: &&&Arc<Volume>| {
                    (storage.exists(&target_file_of(dir.path(), d))).unwrap_or(true)
                };
                let left: Vec<_> = (remove.iter().filter(there))
                    .map(|d| target_file_of(&meta.target, d))
                    .collect();
                if !left.is_empty() {
                    problems.push(format!(
                        "{} has no {}: made again since, its files are not this relocation's; left",
                        meta.target.display(),
                        super::target::OWNER_MARK
                    ));
                }
                kept.extend(left);
            }
            Ok((dir, super::target::Owned::Ours)) => {
                remove_files(storage, meta, &dir, &remove, &mut removed, &mut problems);
                if remove_mark {
                    // Nothing of this relocation's is left to claim.
                    let mark = dir.path().join(super::target::OWNER_MARK);
                    if let Err(e) = storage.remove_file(&mark) {
                        problems.push(format!("remove {}: {e}", mark.display()));
                    }
                }
                drop(dir);
                if remove_dir {
                    remove_target_dir(storage, meta, &mut removed, &mut problems);
                }
            }
            // Gone, replaced or unreachable: nothing in it is touched.
            Err(e) => match find_target(storage, meta, &e) {
                // Removed already (say, by an administrator): nothing is left.
                Found::Gone => {}
                // Its names now lead to another directory's files: never
                // named as this relocation's.
                Found::Replaced => problems.push(format!(
                    "{e}: not reached: the files this relocation made are wherever that \
                     directory went, not those now at {}",
                    meta.target.display()
                )),
                // Primary storage not mounted, say: what is left there is named.
                Found::Unreachable => {
                    let mut left: Vec<String> = remove
                        .iter()
                        .map(|d| target_file_of(&meta.target, d).display().to_string())
                        .collect();
                    if remove_mark {
                        let mark = meta.target.join(super::target::OWNER_MARK);
                        left.push(mark.display().to_string());
                    }
                    if remove_dir {
                        left.push(meta.target.display().to_string());
                    }
                    problems.push(format!("{e}: left {}", left.join(", ")));
                }
            },
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
