//! Pausing, resuming (see `relocate::pause`) and cancelling (see
//! `relocate::cancel`) a session's relocation, under the VM's lock like
//! every other change to the session.

use super::Datastore;
use crate::error::{Error, Result};
use crate::relocate::{Cancelled, Relocation, RelocationStatus};
use crate::util::validate_name;

impl Datastore {
    /// Pauses (`pause`) or resumes VM `vm`'s relocation; returns its status
    /// once the copier has parked or gone on.
    pub fn pause_relocation(&self, vm: &str, pause: bool) -> Result<RelocationStatus> {
        validate_name("VM name", vm)?;
        let op = self.vm_op(vm);
        let _op = self.lock_op(vm, &op)?;
        let s = self.served(vm)?;
        let r = s
            .relocation
            .lock()
            .clone()
            .ok_or_else(|| Error::not_found(format!("VM {vm} is not being relocated")))?;
        if pause {
            r.pause()
        } else {
            r.resume_copy()
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
            None => Relocation::cancel_recorded(
                crate::relocate::Source {
                    storage: s.staging.storage(),
                    vm,
                    disks: &s.disks,
                    config_json: &s.config_json,
                    session_dir: &s.dir,
                },
                keep_target,
            )?
            .ok_or_else(|| Error::not_found(format!("VM {vm} has no relocation to cancel")))?,
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
