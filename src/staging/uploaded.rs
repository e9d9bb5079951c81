//! `diskN.uploaded-G`: which of a disk's dirty blocks (generation `G`)
//! the session uploader has stored in the repository, and as which chunk
//! (see `session::upload` for who writes and clears entries, and when).
//!
//! ```text
//! header, 64 B: magic RFSUPLD1, block size u32, 0 u32, block count u64,
//!               generation u64, nonce 16 B (random per file), zeros
//! entry b, 64 B at 64 + 64*b: kind u8 (1 chunk, 2 zeros), 7 zero bytes,
//!               digest 32 B, check 16 B, 8 zero bytes
//! ```
//! An all-zero entry is "not uploaded" (a fresh file is sparse: nothing
//! uploaded). `check` is BLAKE3(nonce ‖ generation ‖ b ‖ kind ‖ digest)
//! truncated: an entry from another file, another block or another
//! generation, or a torn or garbled one, never passes for a valid entry.
//! Entries are 64-byte aligned, so one never straddles a sector.
//!
//! An entry is written (not synced) only after its chunk is durable in the
//! repository; the uploader syncs the file at checkpoints, so a crash loses
//! at most the entries since (those blocks are uploaded again). A guest
//! write zeroes the entry and syncs before its data lands. A file whose
//! header or any entry does not check is damaged: `open` says so and the
//! caller drops the whole record (every dirty block is read again).
//!
//! **A failed sync sticks.** The uploader's checkpoint and a guest write's
//! clear sync the same descriptor, and the kernel reports a writeback
//! error to one sync only: a clear whose page was lost could otherwise
//! sync "fine" after the checkpoint took the error, and the stale entry
//! would come back after a restart. So syncs run one at a time, and once
//! one failed, every later sync, write and clear fails too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::io::{replace, BlockFile, Open, Storage};
use crate::error::{Error, IoContext, Result};
use crate::repo::Digest;

const MAGIC: &[u8; 8] = b"RFSUPLD1";
const HEADER: u64 = 64;
const ENTRY: u64 = 64;
/// Entries read per call when loading.
const LOAD_ENTRIES: u64 = 16384;

/// `diskN.uploaded-G`.
pub fn uploaded_path(dir: &Path, index: usize, generation: u64) -> PathBuf {
    dir.join(format!("disk{index}.uploaded-{generation}"))
}

/// One disk's uploaded record for one generation.
pub struct UploadRecord {
    file: Arc<dyn BlockFile>,
    path: PathBuf,
    nonce: [u8; 16],
    generation: u64,
    /// Held across each sync; the first failed sync's error, for good.
    failed: Mutex<Option<Error>>,
}

/// The record's entries: block → chunk (`None`: zeros).
pub type Entries = HashMap<u64, Option<Digest>>;

impl UploadRecord {
    fn header(block_size: u32, nblocks: u64, generation: u64, nonce: &[u8; 16]) -> [u8; 64] {
        let mut h = [0u8; HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&block_size.to_le_bytes());
        h[16..24].copy_from_slice(&nblocks.to_le_bytes());
        h[24..32].copy_from_slice(&generation.to_le_bytes());
        h[32..48].copy_from_slice(nonce);
        h
    }

    /// Creates an empty record durably (header by rename, then its size),
    /// replacing any file at `path`.
    pub fn create(
        storage: &dyn Storage,
        path: &Path,
        block_size: u32,
        nblocks: u64,
        generation: u64,
    ) -> Result<UploadRecord> {
        let nonce: [u8; 16] = rand::random();
        replace(
            storage,
            path,
            &Self::header(block_size, nblocks, generation, &nonce),
        )?;
        let file = storage
            .open(path, Open::Existing)
            .ctx(|| format!("open {}", path.display()))?;
        file.set_len(HEADER + nblocks * ENTRY)
            .ctx(|| format!("size {}", path.display()))?;
        Ok(UploadRecord {
            file,
            path: path.to_path_buf(),
            nonce,
            generation,
            failed: Mutex::new(None),
        })
    }

    /// Opens an existing record and loads its entries; a header or an
    /// entry that does not check is corruption (the caller drops it).
    pub fn open(
        storage: &dyn Storage,
        path: &Path,
        block_size: u32,
        nblocks: u64,
        generation: u64,
    ) -> Result<(UploadRecord, Entries)> {
        let file = storage
            .open(path, Open::Existing)
            .ctx(|| format!("open {}", path.display()))?;
        // After a `kill -9` what is read below comes from the page cache,
        // maybe from writes the killed daemon never synced (an entry
        // cleared for a new write): trusted from here on, so durable first.
        file.sync_data()
            .ctx(|| format!("fsync {}", path.display()))?;
        let mut h = [0u8; HEADER as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| Error::corrupt(format!("{} is truncated", path.display())))?;
        let nonce: [u8; 16] = h[32..48].try_into().expect("16 bytes");
        if h != Self::header(block_size, nblocks, generation, &nonce) {
            return Err(Error::corrupt(format!(
                "{} does not match its disk and generation {generation}",
                path.display()
            )));
        }
        let rec = UploadRecord {
            file,
            path: path.to_path_buf(),
            nonce,
            generation,
            failed: Mutex::new(None),
        };
        // A crash between the header and the size leaves a short file:
        // the entries past its end are empty.
        let len = rec.file.len().ctx(|| format!("stat {}", path.display()))?;
        let full = HEADER + nblocks * ENTRY;
        if len < full {
            rec.file
                .set_len(full)
                .ctx(|| format!("size {}", path.display()))?;
        }
        let entries = rec.load(nblocks)?;
        Ok((rec, entries))
    }

    fn load(&self, nblocks: u64) -> Result<Entries> {
        let mut out = Entries::new();
        let mut buf = vec![];
        let mut first = 0;
        while first < nblocks {
            let n = LOAD_ENTRIES.min(nblocks - first);
            buf.resize((n * ENTRY) as usize, 0);
            self.file
                .read_exact_at(&mut buf, HEADER + first * ENTRY)
                .ctx(|| format!("read {}", self.path.display()))?;
            for (i, e) in buf.chunks_exact(ENTRY as usize).enumerate() {
                let b = first + i as u64;
                if e.iter().all(|&x| x == 0) {
                    continue;
                }
                let d = self.decode(b, e).ok_or_else(|| {
                    Error::corrupt(format!(
                        "{} has a damaged entry for block {b}",
                        self.path.display()
                    ))
                })?;
                out.insert(b, d);
            }
            first += n;
        }
        Ok(out)
    }

    fn check(&self, b: u64, kind: u8, digest: &[u8; 32]) -> [u8; 16] {
        let mut h = blake3::Hasher::new();
        h.update(&self.nonce);
        h.update(&self.generation.to_le_bytes());
        h.update(&b.to_le_bytes());
        h.update(&[kind]);
        h.update(digest);
        h.finalize().as_bytes()[..16].try_into().expect("16 bytes")
    }

    fn encode(&self, b: u64, d: Option<Digest>) -> [u8; ENTRY as usize] {
        let (kind, digest) = match d {
            Some(d) => (1u8, d.0),
            None => (2u8, [0u8; 32]),
        };
        let mut e = [0u8; ENTRY as usize];
        e[0] = kind;
        e[8..40].copy_from_slice(&digest);
        e[40..56].copy_from_slice(&self.check(b, kind, &digest));
        e
    }

    /// `Some(entry)` if `e` is a valid entry for block `b`.
    fn decode(&self, b: u64, e: &[u8]) -> Option<Option<Digest>> {
        let kind = e[0];
        let digest: [u8; 32] = e[8..40].try_into().ok()?;
        let ok = matches!(kind, 1 | 2)
            && e[1..8].iter().chain(&e[56..]).all(|&x| x == 0)
            && e[40..56] == self.check(b, kind, &digest)
            && (kind == 1 || digest == [0u8; 32]);
        ok.then_some((kind == 1).then_some(Digest(digest)))
    }

    /// Writes block `b`'s entry (not synced: see [`Self::sync`]).
    pub fn write(&self, b: u64, d: Option<Digest>) -> Result<()> {
        self.not_failed()?;
        self.file
            .write_all_at(&self.encode(b, d), HEADER + b * ENTRY)
            .ctx(|| format!("write {}", self.path.display()))
    }

    /// Zeroes block `b`'s entry (not synced).
    pub fn clear(&self, b: u64) -> Result<()> {
        self.not_failed()?;
        self.file
            .write_all_at(&[0u8; ENTRY as usize], HEADER + b * ENTRY)
            .ctx(|| format!("write {}", self.path.display()))
    }

    /// Syncs every entry written so far; fails for good once a sync failed
    /// (see the module doc).
    pub fn sync(&self) -> Result<()> {
        let mut failed = self.failed.lock();
        if let Some(e) = &*failed {
            return Err(e.clone());
        }
        let r = self
            .file
            .sync_data()
            .ctx(|| format!("fsync {}", self.path.display()));
        if let Err(e) = &r {
            *failed = Some(e.clone());
        }
        r
    }

    /// The sticky error of an earlier failed sync, if any.
    fn not_failed(&self) -> Result<()> {
        match &*self.failed.lock() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::io::OsStorage;

    #[test]
    fn an_entry_a_killed_daemon_cleared_without_a_sync_stays_cleared_after_a_power_cut() {
        use crate::staging::io::mem::MemStorage;
        let mem = MemStorage::new();
        mem.create_dir_all(Path::new("/s")).unwrap();
        let p = uploaded_path(Path::new("/s"), 0, 3);
        let r = UploadRecord::create(&mem, &p, 65536, 100, 3).unwrap();
        r.write(1, Some(Digest::of(b"a"))).unwrap();
        r.sync().unwrap();
        // A guest write clears the entry; the daemon is killed before the
        // sync. The restarted daemon (same page cache) sees no entry, so
        // block 1 will be read again: that must stay so after a power cut.
        r.clear(1).unwrap();
        drop(r);
        let (_, e) = UploadRecord::open(&mem, &p, 65536, 100, 3).unwrap();
        assert!(e.is_empty());
        let mut rng = rand::rngs::mock::StepRng::new(0, 1);
        let cut = mem.crash_state(mem.position(), 0.0, &mut rng);
        let (_, e) = UploadRecord::open(&cut, &p, 65536, 100, 3).unwrap();
        assert!(
            e.is_empty(),
            "a stale upload entry came back: the block's new bytes would not be backed up"
        );
    }

    #[test]
    fn entries_survive_reopen_cleared_ones_do_not_and_a_garbled_one_is_damage() {
        let d = tempfile::tempdir().unwrap();
        let p = uploaded_path(d.path(), 0, 3);
        let r = UploadRecord::create(&OsStorage, &p, 65536, 100, 3).unwrap();
        let a = Digest::of(b"a");
        r.write(1, Some(a)).unwrap();
        r.write(7, None).unwrap();
        r.write(9, Some(a)).unwrap();
        r.clear(9).unwrap();
        r.sync().unwrap();
        let (_, e) = UploadRecord::open(&OsStorage, &p, 65536, 100, 3).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[&1], Some(a));
        assert_eq!(e[&7], None);
        // Another generation's or geometry's file is refused.
        assert!(UploadRecord::open(&OsStorage, &p, 65536, 100, 4).is_err());
        assert!(UploadRecord::open(&OsStorage, &p, 65536, 101, 3).is_err());
        // An entry copied to another block does not check.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let mut e1 = [0u8; 64];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut e1, HEADER + ENTRY).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &e1, HEADER + 2 * ENTRY).unwrap();
        let err = UploadRecord::open(&OsStorage, &p, 65536, 100, 3)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("damaged entry for block 2"),
            "{err}"
        );
    }
}
