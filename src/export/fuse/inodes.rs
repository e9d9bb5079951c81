//! The FUSE frontend's inode numbers. They are carved per session: `base`
//! is the VM's directory, `base + 1` its vm.json, `base + 2 + i` disk i.
//! A base belongs to one session (by its staging directory) until that
//! session is released, and is never given again, so an inode of a
//! released session never reaches a later session of the same VM, and the
//! bounded number of disks keeps two sessions' inodes apart.
//!
//! The table is kept in the staging directory (`fuse-inodes.json`,
//! written atomically when a base is given or forgotten): a daemon that
//! adopts the connection of a crashed one (see `keeper`) must answer the
//! inode numbers the kernel already holds (open disks, cached entries)
//! with the same sessions, which it resumes with new serials.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::handles::Handles;
use crate::error::{Error, Result};
use crate::repo::limits::MAX_DISKS;
use crate::session::{Datastore, Session};

pub const STRIDE: u64 = 4096;
const _: () = assert!(MAX_DISKS as u64 + 2 <= STRIDE);
const FILE: &str = "fuse-inodes.json";

#[derive(Default)]
pub struct Inodes {
    table: RwLock<Table>,
    /// Where the table is kept; None keeps it in memory only.
    file: Option<PathBuf>,
    /// The open handles kept beside it (see `handles`), until the
    /// frontend takes them.
    handles: Mutex<Option<Handles>>,
}

#[derive(Default, Serialize, Deserialize)]
struct Table {
    /// Base of each session, by its staging directory.
    by_dir: HashMap<PathBuf, u64>,
    /// The session (VM, staging directory) of each base.
    by_base: HashMap<u64, (String, PathBuf)>,
    /// Bases handed out so far; inode 1 is the root.
    issued: u64,
}

impl Inodes {
    /// The table kept in staging `root`, with the open handles kept beside
    /// it. When `adopting` a crashed daemon's connection: what is recorded
    /// there, or an error if it cannot be read, and the adoption must then
    /// be refused (the kernel holds numbers this daemon could not answer
    /// alike, and handles it could not count). A fresh mount starts
    /// afresh, but never below the recorded count.
    pub fn load(root: &Path, adopting: bool) -> Result<Inodes> {
        let file = root.join(FILE);
        let read = std::fs::read(&file)
            .map_err(|e| Error::io(format!("reading {}", file.display()), e))
            .and_then(|b| {
                serde_json::from_slice::<Table>(&b)
                    .map_err(|e| Error::corrupt(format!("{}: {e}", file.display())))
            });
        let mut table = match read {
            Ok(t) => t,
            Err(e) if adopting => return Err(e),
            Err(_) => Table::default(),
        };
        if !adopting {
            table.by_dir.clear();
            table.by_base.clear();
        }
        let handles = Handles::kept_in(root, adopting)?;
        Ok(Inodes {
            table: RwLock::new(table),
            file: Some(file),
            handles: Mutex::new(Some(handles)),
        })
    }

    /// [`Self::load`], never failing: a table that cannot be read when
    /// adopting is replaced by one that answers none of the kernel's old
    /// numbers (ENOENT) and gives new ones from a range no earlier daemon
    /// used, so an inode the kernel holds never reaches another session.
    /// Prefer `load` and refusing the adoption on error.
    pub fn kept_in(root: &Path, adopting: bool) -> Inodes {
        match Self::load(root, adopting) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("the FUSE inode numbers or open handles of the crashed daemon are lost ({e}): the disks it had open are answered with ENOENT");
                let fresh = Self::load(root, false).unwrap_or_else(|_| Inodes {
                    file: Some(root.join(FILE)),
                    ..Inodes::default()
                });
                fresh.table.write().issued = unused_range();
                fresh
            }
        }
    }

    /// The open handles kept with the table, once.
    pub fn take_handles(&self) -> Option<Handles> {
        self.handles.lock().take()
    }

    /// The base inode number of a session, given out on first use; `None`
    /// if it could not be recorded (never handed out unrecorded: a daemon
    /// adopting this connection would give it to another session).
    pub fn base_of(&self, s: &Session) -> Option<u64> {
        if let Some(b) = self.table.read().by_dir.get(&s.dir) {
            return Some(*b);
        }
        let mut t = self.table.write();
        if let Some(b) = t.by_dir.get(&s.dir) {
            return Some(*b);
        }
        t.issued += 1;
        let base = t.issued * STRIDE;
        t.by_dir.insert(s.dir.clone(), base);
        t.by_base.insert(base, (s.vm.clone(), s.dir.clone()));
        if let Err(e) = self.save(&t) {
            // The count stays up: never given twice.
            t.by_dir.remove(&s.dir);
            t.by_base.remove(&base);
            tracing::warn!(vm = %s.vm, "could not record the FUSE inode numbers ({e}): the VM's files are not answered (EIO) until they can be");
            return None;
        }
        Some(base)
    }

    /// The live session an inode number belongs to.
    pub fn session_of(&self, ds: &Datastore, ino: u64) -> Option<(Arc<Session>, u64)> {
        let base = ino - ino % STRIDE;
        let t = self.table.read();
        let (vm, dir) = t.by_base.get(&base)?;
        ds.session(vm)
            .filter(|s| &s.dir == dir)
            .map(|s| (s, ino - base))
    }

    /// Drops a released session's numbers (never reused).
    pub fn forget(&self, dir: &Path) {
        let mut t = self.table.write();
        if let Some(base) = t.by_dir.remove(dir) {
            t.by_base.remove(&base);
            if let Err(e) = self.save(&t) {
                // Left recorded: an adopting daemon answers them with
                // ENOENT (the session is gone), never another session.
                tracing::warn!("could not record the FUSE inode numbers: {e}");
            }
        }
    }

    fn save(&self, t: &Table) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let body = serde_json::to_vec(t).expect("json");
        crate::util::write_atomic(file, &body, 0o600, true)
    }
}

/// A count of bases no daemon of this staging gave out before: from the
/// clock, 2^20 bases a second (one never hands out that many).
fn unused_range() -> u64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    secs << 20
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adopting_table_keeps_the_recorded_bases_and_a_fresh_one_never_reuses_them() {
        let dir = tempfile::tempdir().unwrap();
        let t = Inodes::kept_in(dir.path(), false);
        {
            let mut w = t.table.write();
            w.issued = 2;
            w.by_dir.insert("/s/a".into(), 2 * STRIDE);
            w.by_base.insert(2 * STRIDE, ("a".into(), "/s/a".into()));
            t.save(&w).unwrap();
        }
        let adopted = Inodes::kept_in(dir.path(), true);
        assert_eq!(
            adopted.table.read().by_dir.get(Path::new("/s/a")),
            Some(&(2 * STRIDE))
        );
        let fresh = Inodes::kept_in(dir.path(), false);
        assert!(fresh.table.read().by_dir.is_empty());
        assert_eq!(
            fresh.table.read().issued,
            2,
            "numbers given before are not given again"
        );
        adopted.forget(Path::new("/s/a"));
        assert!(Inodes::kept_in(dir.path(), true)
            .table
            .read()
            .by_base
            .is_empty());
    }

    #[test]
    fn a_lost_table_refuses_the_adoption_and_never_reuses_a_number() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Inodes::load(dir.path(), true).is_err(), "nothing recorded");
        Inodes::load(dir.path(), false).unwrap();
        std::fs::write(dir.path().join(FILE), b"{").unwrap();
        assert!(Inodes::load(dir.path(), true).is_err(), "damaged");
        assert!(Inodes::load(dir.path(), false).is_ok(), "a fresh mount");
        // Without the refusal: numbers from a range never given.
        let t = Inodes::kept_in(dir.path(), true);
        assert!(t.table.read().by_base.is_empty());
        assert!(t.table.read().issued > 1 << 40);
    }
}
