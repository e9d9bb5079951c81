//! Pins a discard could not remove from the repository (read-only, full,
//! or not answering): owed removals, kept in the staging directory the
//! session was in, since its own directory is gone. The daemon's check
//! retries them (explore11 M1: a discarded session's pin stayed, saying
//! `serving`, for good, and `forget` kept its backup for ever).
//!
//! One file per session, `unpins-owed/<vm>+<backup>.json` (`+` is in no
//! name), holding the pin to remove, written atomically; removed once the
//! pin is.

use std::path::PathBuf;

use super::{io, StagingDir};
use crate::error::{IoContext, Result};

const DIR: &str = "unpins-owed";

impl StagingDir {
    fn unpin_path(&self, vm: &str, backup: &str) -> PathBuf {
        self.root().join(DIR).join(format!("{vm}+{backup}.json"))
    }

    /// Records that the pin `pin` (JSON) of the discarded session of `vm`
    /// from `backup` is still to be removed.
    pub fn owe_unpin(&self, vm: &str, backup: &str, pin: &[u8]) -> Result<()> {
        let p = self.unpin_path(vm, backup);
        let dir = self.root().join(DIR);
        self.storage()
            .create_dir_all(&dir)
            .ctx(|| format!("create {}", dir.display()))?;
        io::replace(self.storage().as_ref(), &p, pin)
    }

    /// The file holding the owed removal of `vm`'s pin from `backup`.
    pub fn owed_unpin_file(&self, vm: &str, backup: &str) -> PathBuf {
        self.unpin_path(vm, backup)
    }

    /// The owed removals: (VM, backup, the pin's JSON). One that cannot
    /// be read is passed over (and stays, to be looked at); one read that
    /// does not parse stays too, and each check warns of it (review30 L2).
    pub fn owed_unpins(&self) -> Vec<(String, String, Vec<u8>)> {
        let dir = self.root().join(DIR);
        std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".json")?.to_string();
                let (vm, backup) = name.split_once('+')?;
                let ok = crate::util::validate_name("VM name", vm).is_ok()
                    && crate::util::validate_name("backup id", backup).is_ok();
                let pin = std::fs::read(e.path()).ok()?;
                ok.then(|| (vm.to_string(), backup.to_string(), pin))
            })
            .collect()
    }

    /// The owed removal of `vm`'s pin from `backup` is done (or no longer
    /// wanted: the session is back).
    pub fn unpin_paid(&self, vm: &str, backup: &str) -> Result<()> {
        let p = self.unpin_path(vm, backup);
        match self.storage().remove_file(&p) {
            Ok(()) => io::sync_parent(self.storage().as_ref(), &p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(crate::error::Error::io(
                format!("remove {}", p.display()),
                e,
            )),
        }
    }
}
