//! A relocation recorded in a session that a restarted daemon could not
//! reopen: its target unreachable (primary storage not mounted yet),
//! another directory in its place, or a file in it refused.
//!
//! Before the cutover staging holds the whole disk, so the VM is served
//! from staging and the record stays. The session keeps a [`NotResumed`]
//! so that `status` shows the relocation (state `not-resumed`, with the
//! reason and what to do) instead of nothing, and so that `relocate
//! --resume` can try again in the running daemon: restarting the daemon to
//! retry would interrupt every VM it serves over FUSE. A relocation that
//! had cut over is never held here: its target is the VM's live disk, and
//! a session that cannot open it is not served (see `Relocation::reopen`).

use std::path::PathBuf;
use std::sync::Arc;

use super::{copied_bytes, Meta, Relocation, RelocationStatus, Source, State};
use crate::error::{Error, ErrorKind};
use crate::staging::{MapKind, PersistentBitmap};

/// What a (re)start finds recorded in a session.
pub enum Reopened {
    /// No relocation recorded.
    None,
    /// Reopened: serving from the target if it had switched, else ready to
    /// copy (`resume` started its copier).
    Live(Arc<Relocation>),
    /// Recorded, not reopened: the VM is served from staging.
    NotResumed(NotResumed),
}

/// A recorded relocation that could not be reopened, and why.
#[derive(Debug, Clone)]
pub struct NotResumed {
    pub target: PathBuf,
    pass: u32,
    paused: bool,
    /// Bytes the copied maps recorded as copied when it was found.
    bytes_done: u64,
    bytes_total: u64,
    pub error: Error,
    /// What the administrator can do about it, one sentence.
    pub then: String,
    /// Held because a cancel of it did not finish (see `cancelled`).
    vm: String,
    cancelling: bool,
}

impl NotResumed {
    /// `meta`, recorded in `src`, whose target could not be opened (`error`;
    /// `replaced`: another directory is at its path).
    pub(super) fn new(src: &Source, meta: &Meta, error: Error, replaced: bool) -> NotResumed {
        let vm = src.vm;
        let then = if replaced {
            format!(
                "cancel it (`recoverfs relocate {vm} --cancel`) and relocate again, or put the \
                 directory it began in back at {} and run `recoverfs relocate {vm} --resume`",
                meta.target.display()
            )
        } else if error.kind() == ErrorKind::Busy {
            // Not the target: the disk is held (a passthrough open).
            format!(
                "run `recoverfs relocate {vm} --resume` once that is done, or cancel it \
                 (`recoverfs relocate {vm} --cancel`)"
            )
        } else {
            format!(
                "run `recoverfs relocate {vm} --resume` once the target is reachable (a \
                 restarted daemon tries again too), or cancel it (`recoverfs relocate {vm} \
                 --cancel`)"
            )
        };
        NotResumed {
            target: meta.target.clone(),
            pass: meta.pass,
            paused: meta.paused,
            bytes_done: recorded_copied_bytes(src),
            bytes_total: src.disks.iter().map(|d| d.size).sum(),
            error,
            then,
            vm: vm.to_string(),
            cancelling: false,
        }
    }

    /// `meta`, marked `cancelling` by a cancel whose removal of the record
    /// failed: never reopened; a cancel again finishes it.
    pub(super) fn cancelled(src: &Source, meta: &Meta) -> NotResumed {
        let e = Error::busy(super::cancel::not_removed(
            src.vm,
            &meta.target,
            &"a cancel did not finish",
        ));
        NotResumed {
            then: format!(
                "it is not resumed: run `recoverfs relocate {} --cancel` again",
                src.vm
            ),
            // `--resume` refuses it: no advice to resume a paused one.
            paused: false,
            cancelling: true,
            ..NotResumed::new(src, meta, e, false)
        }
    }

    /// What a session holds after a cancel of its relocation not resumed
    /// (`cancel_recorded`) failed: the relocation as a restart would find
    /// it (marked `cancelling`: held as a cancel to finish), or `None` if
    /// the record is not marked (the mark could not be written: it is as
    /// it was) or cannot be read.
    pub fn after_failed_cancel(src: Source) -> Option<NotResumed> {
        let meta = Relocation::read_meta(&src).ok()??;
        (meta.cancelling && !meta.switched).then(|| NotResumed::cancelled(&src, &meta))
    }

    /// The session's relocation as `status` shows it: not copying (the VM
    /// is served from staging), with the reason (`error`) and what to do
    /// (`note`).
    pub fn status(&self) -> RelocationStatus {
        let paused = if self.paused {
            " It was paused before the restart; `--resume` also lets it copy."
        } else {
            ""
        };
        RelocationStatus {
            state: State::NotResumed,
            target: self.target.clone(),
            pass: self.pass,
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
            bytes_copied: 0,
            rate_mbps: 0.0,
            copy_seconds: 0.0,
            rate_limit_mbps: None,
            eta_s: None,
            dirty_blocks: 0,
            cutover_pause_ms: None,
            error: Some(self.error.to_string()),
            note: Some(format!("{}{paused}", self.then)),
            cancel_unfinished: self.cancelling.then(|| super::finish_cancel(&self.vm)),
            // Read from its durable record: the mark was written.
            cancel_unmarked: false,
        }
    }
}

/// Bytes the session's copied maps hold as copied (before the guest's
/// changes since are forgotten, which only a reopen does). A map that
/// cannot be read counts nothing: this is a progress figure, not a
/// promise.
fn recorded_copied_bytes(src: &Source) -> u64 {
    src.disks
        .iter()
        .filter_map(|d| {
            let m = PersistentBitmap::open_existing(
                src.storage.as_ref(),
                &Relocation::copied_path(src.session_dir, d),
                MapKind::Copied,
                d.block_size() as u32,
                d.nblocks(),
            )
            .ok()?;
            Some(copied_bytes(d, &m))
        })
        .sum()
}
