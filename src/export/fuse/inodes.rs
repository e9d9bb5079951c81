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

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

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
    /// A table kept in staging `root`, starting from what is recorded
    /// there when `adopting` (a fresh mount starts afresh, but never
    /// below the recorded count, so numbers are not reused).
    pub fn kept_in(root: &Path, adopting: bool) -> Inodes {
        let file = root.join(FILE);
        let mut table = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Table>(&b).ok())
            .unwrap_or_default();
        if !adopting {
            table.by_dir.clear();
            table.by_base.clear();
        }
        Inodes {
            table: RwLock::new(table),
            file: Some(file),
        }
    }

    /// The base inode number of a session, given out on first use.
    pub fn base_of(&self, s: &Session) -> u64 {
        if let Some(b) = self.table.read().by_dir.get(&s.dir) {
            return *b;
        }
        let mut t = self.table.write();
        if let Some(b) = t.by_dir.get(&s.dir) {
            return *b;
        }
        t.issued += 1;
        let base = t.issued * STRIDE;
        t.by_dir.insert(s.dir.clone(), base);
        t.by_base.insert(base, (s.vm.clone(), s.dir.clone()));
        self.save(&t);
        base
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
            self.save(&t);
        }
    }

    /// A table not written means a daemon adopting this connection after
    /// a crash answers this session's inodes with ENOENT: worth a line,
    /// not a failure of the lookup that gave the number.
    fn save(&self, t: &Table) {
        let Some(file) = &self.file else { return };
        let body = serde_json::to_vec(t).expect("json");
        if let Err(e) = crate::util::write_atomic(file, &body, 0o600, true) {
            tracing::warn!("could not record the FUSE inode numbers ({e}): after a crash, a new daemon cannot answer the open disks of this mount");
        }
    }
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
            t.save(&w);
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
}
