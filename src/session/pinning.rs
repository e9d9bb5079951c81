//! A session's pin in the repository (`repo::pins`), kept in step with
//! the session: written at recover, release and each live backup,
//! removed with its staging. And the other direction: a daemon checks
//! that its sessions' backups still exist, so a session whose backup was
//! forgotten with `forget --force` says so in `status`.

use std::path::Path;

use super::{Datastore, Session};
use crate::repo::pins::{self, Pin};

/// How often a daemon checks that its sessions' backups still exist.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Datastore {
    /// The pin of session `s` (`serving` unless released).
    pub(crate) fn pin_of(&self, s: &Session, serving: bool) -> Pin {
        let mut backups = vec![s.backup.clone()];
        let base = s.backup_base.lock().base.id.clone();
        if base != s.backup {
            backups.push(base);
        }
        Pin::new(&s.vm, backups, &s.dir, serving)
    }

    pub(crate) fn pin(&self, s: &Session, serving: bool) {
        pins::put_logged(&self.repo, &self.pin_of(s, serving));
    }

    /// Removes the pin of discarded staging at `dir`.
    pub(crate) fn unpin(&self, vm: &str, backup: &str, dir: &Path) {
        pins::remove_logged(&self.repo, &Pin::new(vm, vec![backup.into()], dir, false));
    }

    /// Looks for every served session's backups in the repository and
    /// records a warning for each that is gone. A repository that does
    /// not answer changes nothing.
    pub fn check_backups(&self) {
        for s in self.sessions() {
            let pin = self.pin_of(&s, true);
            let mut gone = vec![];
            for b in &pin.backups {
                if let Ok(false) = self.repo.has_manifest(&s.vm, b) {
                    gone.push(b.clone());
                }
            }
            let warning = (!gone.is_empty()).then(|| {
                format!(
                    "backup {} of VM {} was removed from the repository (forget --force): blocks not yet staged cannot be read once gc runs, and live backups need a full read; relocate the VM or back it up from its disks",
                    gone.join(", "),
                    s.vm
                )
            });
            let mut w = s.backup_gone.lock();
            if warning.is_some() && *w != warning {
                tracing::error!(vm = %s.vm, "{}", warning.as_deref().unwrap_or(""));
            }
            *w = warning;
        }
    }
}
