//! Pausing and resuming a session's relocation (see `relocate::pause`),
//! under the VM's lock like every other change to the session.

use super::Datastore;
use crate::error::{Error, Result};
use crate::relocate::RelocationStatus;
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
}
