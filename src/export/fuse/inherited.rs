//! Opens inherited from a crashed daemon whose connection this one
//! adopted (see `keeper`). The kernel still holds their file handles, which
//! this process never gave out (`passthrough::is_ours`). Each one recorded
//! in staging (`handles`) is counted as its session's open handle at the
//! adoption, before any request is served; its release uncounts it.
//! Every open is recorded before it is answered, and a connection whose
//! record cannot be read is not adopted (`Inodes::load`), so every
//! inherited open is counted at the adoption; one not recorded would still
//! be counted at its first read, write or flush, under that request's pid
//! (a safety net only: review32 L8 found no path that leaves one).

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::session::{Holder, Session};

/// (inode, file handle) of an inherited open -> its session handle.
#[derive(Default)]
pub struct Inherited {
    opens: Mutex<HashMap<(u64, u64), u64>>,
}

impl Inherited {
    /// Counts inherited open `fh` of disk `index` of `s` on first use.
    pub fn seen(&self, ino: u64, fh: u64, s: &Session, index: usize, pid: u32) {
        let mut opens = self.opens.lock();
        if opens.contains_key(&(ino, fh)) {
            return;
        }
        if let Some(id) = s.open_handle(Holder::fuse(index, pid)) {
            opens.insert((ino, fh), id);
        }
    }

    /// Counts recorded inherited open `fh` of disk `index` of `s` (by
    /// `pid`) at the adoption.
    pub fn adopt(&self, ino: u64, fh: u64, s: &Session, index: usize, pid: u32) -> bool {
        self.seen(ino, fh, s, index, pid);
        self.opens.lock().contains_key(&(ino, fh))
    }

    /// The kernel released inherited open `fh`.
    pub fn released(&self, ino: u64, fh: u64, s: &Session) {
        if let Some(id) = self.opens.lock().remove(&(ino, fh)) {
            s.close_handle(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::passthrough::{file_handle, is_ours};
    use fuser::FileHandle;

    #[test]
    fn handles_of_another_process_are_told_from_ours() {
        assert!(is_ours(file_handle(7, false)));
        assert!(is_ours(file_handle(7, true)));
        let theirs = FileHandle((file_handle(7, false).0 >> 32 ^ 0x8000_0000) << 32 | 7 << 1);
        assert!(!is_ours(theirs));
        assert!(
            !is_ours(FileHandle(7 << 1)),
            "a handle of an older binary (no epoch)"
        );
    }
}
