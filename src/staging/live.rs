//! The same-boot mirror of a presence map, `diskN.live`, and the disk's
//! *epoch*: what makes a daemon crash lose nothing a guest was told.
//!
//! **Why.** A presence bit reaches `diskN.present` only after the data it
//! describes has been synced (at the next flush), so a power cut can never
//! leave a bit claiming bytes that are not on disk. But a daemon killed
//! before that flush leaves blocks whose bytes are already in the staging
//! file — fetched, or written by a guest that has not flushed yet — without
//! a bit. The restarted daemon would fetch those blocks again and overwrite
//! the guest's unflushed writes with the backup's bytes: a guest that saw
//! no crash at all (QEMU's NBD client reconnects) would read old data.
//!
//! `kill -9` keeps the page cache: every write that completed before the
//! kill is still there. So each bit is also written here (a `pwrite`, never
//! synced) as soon as its block's bytes are written, and a daemon restarted
//! *in the same boot* adds these bits to the synced ones. After a reboot or
//! power cut (the boot id differs) the file is ignored; so it is after a
//! failed staging sync (the file is *poisoned*), because the kernel may
//! then have dropped pages the mirror describes.
//!
//! **Epoch.** Whenever the mirror is not trusted, writes acknowledged but
//! not flushed may have been lost, and the disk gets a new random epoch;
//! otherwise it keeps the one in the file. NFS uses it as the write
//! verifier, so clients resend uncommitted writes exactly when needed.
//!
//! File: a 64-byte header (magic `RFSLIVE1`, block size u32, block count
//! u64, the first 16 bytes of BLAKE3 of the boot id, epoch u64, poisoned
//! u8), then one bit per block, as in `diskN.present`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::io::{replace, BlockFile, Open, Storage};
use crate::error::{IoContext, Result};

const MAGIC: &[u8; 8] = b"RFSLIVE1";
const HEADER_LEN: u64 = 64;
const POISON_AT: u64 = 48;

/// The mirror of one presence map, open for writing.
pub struct LiveMirror {
    file: Arc<dyn BlockFile>,
    path: PathBuf,
    epoch: u64,
    /// What the file holds, under the lock: each write of a word carries
    /// every bit recorded before it.
    words: Mutex<Vec<u64>>,
    /// Set once the mirror cannot be trusted for this run.
    poisoned: AtomicBool,
}

/// What opening a mirror found.
pub struct Opened {
    pub mirror: LiveMirror,
    /// Bits to add to the synced map: blocks whose bytes a daemon of this
    /// boot wrote. `None` when the previous mirror was not trusted.
    pub trusted: Option<Vec<u64>>,
}

fn boot_hash(boot_id: &str) -> [u8; 16] {
    let mut h = [0u8; 16];
    h.copy_from_slice(&blake3::hash(boot_id.as_bytes()).as_bytes()[..16]);
    h
}

fn header(block_size: u32, nblocks: u64, boot: &[u8; 16], epoch: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&block_size.to_le_bytes());
    h[16..24].copy_from_slice(&nblocks.to_le_bytes());
    h[24..40].copy_from_slice(boot);
    h[40..48].copy_from_slice(&epoch.to_le_bytes());
    h
}

/// The words of a previous mirror, and its epoch, if it may be trusted
/// now: same geometry, same boot, not poisoned, not truncated.
fn read_trusted(
    storage: &dyn Storage,
    path: &Path,
    block_size: u32,
    nblocks: u64,
    boot: &[u8; 16],
) -> Option<(Vec<u64>, u64)> {
    let words_len = nblocks.div_ceil(64) * 8;
    let buf = storage.read(path, HEADER_LEN + words_len).ok().flatten()?;
    if buf.len() as u64 != HEADER_LEN + words_len {
        return None;
    }
    let epoch = u64::from_le_bytes(buf[40..48].try_into().ok()?);
    if buf[..HEADER_LEN as usize] != header(block_size, nblocks, boot, epoch)[..] {
        return None; // other geometry, other boot, or poisoned
    }
    let words = buf[HEADER_LEN as usize..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Some((words, epoch))
}

/// Whether the old mirror's own pages reached the disk. The mirror is
/// never synced; a writeback error on it (reported to the first sync of a
/// new descriptor) means the kernel may have dropped words this file still
/// seems to hold, so it must not be trusted, and the epoch changes, as
/// for the data file (`data_reached_disk`). A missing file is no error.
fn reached_disk(storage: &dyn Storage, path: &Path) -> bool {
    let synced = storage
        .open(path, super::io::Open::Existing)
        .and_then(|f| f.sync_data());
    match synced {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::error!(
                "fsync {}: {e}; the same-boot presence mirror is not trusted: blocks first written but not flushed before the restart read as the backup's, and the disk's epoch changes (NFS clients resend unstable writes)",
                path.display()
            );
            false
        }
    }
}

/// Rewrites the mirror at `path` with `body` in the blocks it already
/// has (no new space), if it is `body`'s size: poisoned first, so that a
/// kill in between leaves it untrusted rather than old words under a new
/// header; the header last. Never synced, as every mirror write.
fn rewrite_in_place(storage: &dyn Storage, path: &Path, body: &[u8]) -> Result<Arc<dyn BlockFile>> {
    let file = storage
        .open(path, Open::Existing)
        .ctx(|| format!("open {}", path.display()))?;
    let len = file.len().ctx(|| format!("stat {}", path.display()))?;
    if len != body.len() as u64 {
        return Err(crate::error::Error::new(
            crate::error::ErrorKind::NoSpace,
            format!("{} is not the mirror's size", path.display()),
        ));
    }
    let h = HEADER_LEN as usize;
    let write = |at: usize, b: &[u8]| {
        file.write_all_at(b, at as u64)
            .ctx(|| format!("write {}", path.display()))
    };
    write(0, &[0u8; 8])?;
    write(h, &body[h..])?;
    write(0, &body[..h])?;
    tracing::warn!(
        "{}: the staging filesystem is full; the presence mirror was rewritten in place",
        path.display()
    );
    Ok(file)
}

impl LiveMirror {
    /// Opens the mirror at `path` for a map whose synced words are
    /// `synced`, and starts a new one holding `synced` plus whatever is
    /// trusted of the old one (nothing unless `trust`: the caller knows the
    /// staging data may have lost pages). The new file replaces the old
    /// atomically, so a crash in between leaves either, both valid in this
    /// boot.
    pub fn open(
        storage: &dyn Storage,
        path: &Path,
        block_size: u32,
        nblocks: u64,
        synced: &[u64],
        trust: bool,
    ) -> Result<Opened> {
        let boot_id = storage.boot_id();
        let boot = boot_hash(&boot_id);
        let previous = if boot_id.is_empty() || !trust || !reached_disk(storage, path) {
            None
        } else {
            read_trusted(storage, path, block_size, nblocks, &boot)
        };
        let (trusted, epoch) = match previous {
            Some((words, epoch)) => (Some(words), epoch),
            None => (None, rand::random::<u64>() | 1),
        };
        let mut body = header(block_size, nblocks, &boot, epoch);
        let words: Vec<u64> = synced
            .iter()
            .enumerate()
            .map(|(i, w)| w | trusted.as_ref().map_or(0, |t| t[i]))
            .collect();
        for w in &words {
            body.extend(w.to_le_bytes());
        }
        let file = match replace(storage, path, &body) {
            Ok(()) => storage
                .open(path, Open::Existing)
                .ctx(|| format!("open {}", path.display()))?,
            // A full staging filesystem must not keep a session from
            // resuming: its old mirror's blocks are rewritten instead.
            Err(e) if e.kind() == crate::error::ErrorKind::NoSpace => {
                rewrite_in_place(storage, path, &body).map_err(|_| e)?
            }
            Err(e) => return Err(e),
        };
        Ok(Opened {
            mirror: LiveMirror {
                file,
                path: path.to_path_buf(),
                epoch,
                words: Mutex::new(words),
                poisoned: AtomicBool::new(boot_id.is_empty()),
            },
            trusted,
        })
    }

    /// Changes when writes acknowledged but not flushed may have been lost.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Records `bit`. Call after the bytes it describes were written and
    /// before anyone may rely on them (the bit is set in memory).
    pub fn record(&self, bit: u64) {
        if self.poisoned.load(Ordering::Acquire) {
            return;
        }
        let mut words = self.words.lock();
        let i = (bit / 64) as usize;
        words[i] |= 1 << (bit % 64);
        let r = self
            .file
            .write_all_at(&words[i].to_le_bytes(), HEADER_LEN + i as u64 * 8);
        if let Err(e) = r {
            tracing::error!(
                "cannot write {}: {e}; a daemon restarted before the next flush refetches its unflushed blocks",
                self.path.display()
            );
            let _ = self.poison_locked();
        }
    }

    /// Forgets `bit` (eviction, before the block's hole is punched). Not
    /// synced: the mirror only counts in this boot, whose page cache holds
    /// this write; after a power cut the whole file is ignored.
    /// Fails only if the old bit may still be trusted by a restart.
    pub fn unrecord(&self, bit: u64) -> std::io::Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut words = self.words.lock();
        let i = (bit / 64) as usize;
        words[i] &= !(1 << (bit % 64));
        let r = self
            .file
            .write_all_at(&words[i].to_le_bytes(), HEADER_LEN + i as u64 * 8);
        if let Err(e) = r {
            tracing::error!(
                "cannot write {}: {e}; a restarted daemon will not trust it",
                self.path.display()
            );
            // A stale bit here would claim an evicted block: never trust it.
            if !self.poison_locked() {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Marks the mirror untrusted (after a failed staging sync): the next
    /// daemon ignores it and the disk's epoch changes.
    pub fn poison(&self) {
        let _g = self.words.lock();
        let _ = self.poison_locked();
    }

    /// True once the file is marked untrusted (or was already).
    fn poison_locked(&self) -> bool {
        if self.poisoned.swap(true, Ordering::AcqRel) {
            return true;
        }
        // No sync needed: the mirror only counts within this boot, where
        // the page cache holds this write. If it fails, destroy the header.
        self.file.write_all_at(&[1], POISON_AT).is_ok()
            || self.file.write_all_at(&[0u8; 8], 0).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::io::mem::MemStorage;

    const P: &str = "/s/disk0.live";

    fn storage() -> MemStorage {
        let m = MemStorage::new();
        m.create_dir_all(Path::new("/s")).unwrap();
        m
    }

    #[test]
    fn unsynced_bits_count_after_a_kill_and_keep_the_epoch() {
        let m = storage();
        let a = LiveMirror::open(&m, Path::new(P), 4096, 130, &[1, 0, 0], true).unwrap();
        assert!(a.trusted.is_none(), "a new mirror trusts nothing");
        a.mirror.record(64 + 5);
        let killed = m.kill_state(m.position());
        let b = LiveMirror::open(&killed, Path::new(P), 4096, 130, &[1, 0, 0], true).unwrap();
        assert_eq!(b.trusted, Some(vec![1, 1 << 5, 0]));
        assert_eq!(b.mirror.epoch(), a.mirror.epoch());
    }

    #[test]
    fn a_power_cut_or_a_poisoned_mirror_is_ignored_and_changes_the_epoch() {
        let m = storage();
        let a = LiveMirror::open(&m, Path::new(P), 4096, 64, &[0], true).unwrap();
        a.mirror.record(1);
        a.mirror.record(2);
        let mut rng = rand::rngs::mock::StepRng::new(0, 1);
        let cut = m.crash_state(m.position(), 1.0, &mut rng);
        let b = LiveMirror::open(&cut, Path::new(P), 4096, 64, &[0], true).unwrap();
        assert!(b.trusted.is_none(), "another boot trusts no unsynced bit");
        assert_ne!(b.mirror.epoch(), a.mirror.epoch());

        a.mirror.poison();
        a.mirror.record(0); // ignored once poisoned
        let killed = m.kill_state(m.position());
        let c = LiveMirror::open(&killed, Path::new(P), 4096, 64, &[0], true).unwrap();
        assert!(c.trusted.is_none(), "a poisoned mirror is not trusted");
        assert_ne!(c.mirror.epoch(), a.mirror.epoch());
    }

    #[test]
    fn a_mirror_whose_own_writeback_failed_is_not_trusted_and_changes_the_epoch() {
        use crate::staging::io::fault::{FaultyStorage, Op, Rule};
        let m = storage();
        let a = LiveMirror::open(&m, Path::new(P), 4096, 64, &[0], true).unwrap();
        a.mirror.record(3);
        let killed = std::sync::Arc::new(m.kill_state(m.position()));
        let faults = FaultyStorage::new(killed);
        faults.inject(Rule::fail(Op::Sync, "disk0.live", libc::EIO).times(1));
        let b = LiveMirror::open(&faults, Path::new(P), 4096, 64, &[0], true).unwrap();
        assert!(
            b.trusted.is_none(),
            "a mirror the kernel failed to write back was trusted"
        );
        assert_ne!(b.mirror.epoch(), a.mirror.epoch());
    }

    /// explore4 M1: a restart on a full staging filesystem cannot write a
    /// new mirror file; the old one is rewritten in place, keeping what
    /// it trusted, and stays a valid mirror for the next restart.
    #[test]
    fn on_a_full_filesystem_the_mirror_is_rewritten_in_place_and_keeps_its_bits_and_epoch() {
        use crate::staging::io::fault::{FaultyStorage, Op, Rule};
        let m = storage();
        let a = LiveMirror::open(&m, Path::new(P), 4096, 130, &[1, 0, 0], true).unwrap();
        a.mirror.record(64 + 5);
        let killed = m.kill_state(m.position());
        let faults = FaultyStorage::new(std::sync::Arc::new(killed.clone()));
        faults.inject(Rule::fail(Op::Rename, "disk0.live", libc::ENOSPC));
        let b = LiveMirror::open(&faults, Path::new(P), 4096, 130, &[1, 0, 0], true).unwrap();
        assert_eq!(b.trusted, Some(vec![1, 1 << 5, 0]));
        assert_eq!(b.mirror.epoch(), a.mirror.epoch());
        b.mirror.record(3);
        let again = killed.kill_state(killed.position());
        let c = LiveMirror::open(&again, Path::new(P), 4096, 130, &[0, 0, 0], true).unwrap();
        assert_eq!(c.trusted, Some(vec![1 | 1 << 3, 1 << 5, 0]));
        assert_eq!(c.mirror.epoch(), a.mirror.epoch());
    }

    #[test]
    fn a_mirror_of_other_geometry_is_ignored() {
        let m = storage();
        let a = LiveMirror::open(&m, Path::new(P), 4096, 64, &[0], true).unwrap();
        a.mirror.record(0);
        let b = LiveMirror::open(&m, Path::new(P), 8192, 64, &[0], true).unwrap();
        assert!(b.trusted.is_none());
    }
}
