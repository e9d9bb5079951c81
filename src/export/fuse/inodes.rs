//! The FUSE frontend's inode numbers. They are carved per session: `base`
//! is the VM's directory, `base + 1` its vm.json, `base + 2 + i` disk i.
//! A base belongs to one session (by serial) for good, so an inode of a
//! released session never reaches a later session of the same VM, and the
//! bounded number of disks keeps two sessions' inodes apart.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::repo::limits::MAX_DISKS;
use crate::session::{Datastore, Session};

pub const STRIDE: u64 = 4096;
const _: () = assert!(MAX_DISKS as u64 + 2 <= STRIDE);

#[derive(Default)]
pub struct Inodes {
    table: RwLock<Table>,
}

#[derive(Default)]
struct Table {
    by_serial: HashMap<u64, u64>,
    by_base: HashMap<u64, (String, u64)>,
    /// Bases handed out so far; inode 1 is the root.
    issued: u64,
}

impl Inodes {
    /// The base inode number of a session, given out on first use.
    pub fn base_of(&self, s: &Session) -> u64 {
        if let Some(b) = self.table.read().by_serial.get(&s.serial) {
            return *b;
        }
        let mut t = self.table.write();
        if let Some(b) = t.by_serial.get(&s.serial) {
            return *b;
        }
        t.issued += 1;
        let base = t.issued * STRIDE;
        t.by_serial.insert(s.serial, base);
        t.by_base.insert(base, (s.vm.clone(), s.serial));
        base
    }

    /// The live session an inode number belongs to.
    pub fn session_of(&self, ds: &Datastore, ino: u64) -> Option<(Arc<Session>, u64)> {
        let base = ino - ino % STRIDE;
        let (vm, serial) = self.table.read().by_base.get(&base).cloned()?;
        ds.session(&vm)
            .filter(|s| s.serial == serial)
            .map(|s| (s, ino - base))
    }

    /// Drops a released session's numbers (never reused).
    pub fn forget(&self, serial: u64) {
        let mut t = self.table.write();
        if let Some(base) = t.by_serial.remove(&serial) {
            t.by_base.remove(&base);
        }
    }
}
