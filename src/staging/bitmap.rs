//! Block bitmaps: a lock-free in-memory bitmap and its persistent form, a
//! file with a fixed header followed by the bits (the nydus model).
//!
//! Bits only ever go from 0 to 1 while a session runs, and the file is
//! written from a snapshot taken *before* the data it describes was synced,
//! so a torn or stale bitmap write can only under-report, never claim data
//! that is not on disk.
//!
//! **Durable sets are group-committed** (the changed and dirty maps, whose
//! bits must be on disk before the data they describe). A setter sets its
//! bits in memory, notes their words as pending and takes a ticket (the
//! number of the last batch that dirtied a word). If no sync runs, it
//! becomes the leader: it takes every pending word, writes them from memory
//! and syncs once, then marks every ticket up to its batch synced. Setters
//! that arrived meanwhile wait; whoever finds its ticket covered returns
//! without syncing, and the first one not covered leads the next round. So
//! a write of many blocks costs one write and one sync, and concurrent
//! first writes share syncs. A bit found already set but not yet known
//! synced waits for the round that covers the batch that set it;
//! `test_durable` says whether a set would return at once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::io::{replace, BlockFile, Open, Storage};
use super::live::LiveMirror;
use crate::error::{Error, IoContext, Result};

pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    nbits: u64,
}

impl AtomicBitmap {
    pub fn new(nbits: u64) -> Self {
        let words = (0..nbits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        AtomicBitmap { words, nbits }
    }

    pub fn len(&self) -> u64 {
        self.nbits
    }

    pub fn is_empty(&self) -> bool {
        self.nbits == 0
    }

    pub fn test(&self, bit: u64) -> bool {
        debug_assert!(bit < self.nbits);
        self.words[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }

    /// Sets a bit; returns true if it was newly set.
    pub fn set(&self, bit: u64) -> bool {
        let mask = 1 << (bit % 64);
        self.words[(bit / 64) as usize].fetch_or(mask, Ordering::AcqRel) & mask == 0
    }

    /// Clears a bit; returns true if it was set.
    pub fn clear(&self, bit: u64) -> bool {
        let mask = 1 << (bit % 64);
        self.words[(bit / 64) as usize].fetch_and(!mask, Ordering::AcqRel) & mask != 0
    }

    /// Clears every bit set in `other` (of the same length), a word at a
    /// time; returns how many were set here.
    pub fn clear_each_of(&self, other: &AtomicBitmap) -> u64 {
        debug_assert_eq!(self.nbits, other.nbits);
        self.words
            .iter()
            .zip(&other.words)
            .map(|(w, o)| {
                let o = o.load(Ordering::Acquire);
                (w.fetch_and(!o, Ordering::AcqRel) & o).count_ones() as u64
            })
            .sum()
    }

    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    pub fn snapshot(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    fn load(&self, words: &[u64]) {
        for (w, v) in self.words.iter().zip(words) {
            w.store(*v, Ordering::Release);
        }
    }

    /// Runs of set bits as half-open `[start, end)` block ranges, found
    /// word by word: a sparse 10 TiB map is scanned in milliseconds.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.runs(0, self.nbits).collect()
    }

    /// The runs of set bits within `[from, to)`, lazily, word by word.
    pub fn runs(&self, from: u64, to: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let to = to.min(self.nbits);
        let mut at = from;
        std::iter::from_fn(move || {
            let s = self.next_set(at, to);
            if s >= to {
                return None;
            }
            let e = self.next_clear(s, to);
            at = e;
            Some((s, e))
        })
    }

    /// The first set bit in `[from, to)`, or `to` if none: all-zero words
    /// are skipped whole.
    pub fn next_set(&self, from: u64, to: u64) -> u64 {
        self.next_with(from, to, false)
    }

    /// The first clear bit in `[from, to)`, or `to` if none: all-one words
    /// are skipped whole.
    pub fn next_clear(&self, from: u64, to: u64) -> u64 {
        self.next_with(from, to, true)
    }

    /// The first bit in `[from, to)` that differs from `skip_ones`'s value.
    fn next_with(&self, from: u64, to: u64, skip_ones: bool) -> u64 {
        let to = to.min(self.nbits);
        let mut at = from;
        while at < to {
            let mut w = self.words[(at / 64) as usize].load(Ordering::Acquire);
            if skip_ones {
                w = !w;
            }
            // Bits below `at` in this word do not count.
            w &= u64::MAX << (at % 64);
            if w != 0 {
                return ((at / 64) * 64 + w.trailing_zeros() as u64).min(to);
            }
            at = (at / 64 + 1) * 64;
        }
        to
    }
}

const MAGIC: &[u8; 8] = b"RFSBMAP1";
const HEADER_LEN: u64 = 64;

/// Which map a file holds; stored in the header so files cannot be swapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    Present = 1,
    Changed = 2,
    /// Blocks the relocation has copied to the target and synced.
    Copied = 3,
    /// Blocks the guest wrote since the session's last live backup (one
    /// generation of them; see `session::backup`).
    Dirty = 4,
}

/// Durable sets waiting for, or in, a group commit.
#[derive(Default)]
struct Commit {
    /// Words dirtied by durable sets and not yet taken by a leader.
    pending: std::collections::BTreeSet<u64>,
    /// A leader is writing and syncing.
    leading: bool,
    /// The last failed round: its batches (up to `.0`) get its error.
    failed: Option<(u64, Error)>,
}

/// A bitmap backed by a file: `[header 64 B][u64 words, little endian]`.
/// Header: magic, kind (u32), block size (u32), block count (u64).
pub struct PersistentBitmap {
    bits: AtomicBitmap,
    file: Arc<dyn BlockFile>,
    path: PathBuf,
    /// Set when a bit changed after the last persist.
    dirty: AtomicBool,
    /// Serialises writers of the file.
    write_lock: Mutex<()>,
    /// Group commit of durable sets (see the module doc).
    commit: Mutex<Commit>,
    committed: Condvar,
    /// Number of the last batch of durable sets that dirtied a word.
    recorded: AtomicU64,
    /// Every batch up to this number is in the file, synced.
    synced: AtomicU64,
    /// Bits known to be in the file, synced: those it held when opened
    /// and those a group commit wrote.
    durable: AtomicBitmap,
    block_size: u32,
    /// Presence maps only: the same-boot mirror of every bit set.
    mirror: Option<LiveMirror>,
}

impl PersistentBitmap {
    /// Opens the map at `path`, creating it (atomically, all zero) if absent.
    /// A header that does not match the disk geometry is corruption.
    pub fn open(
        storage: &dyn Storage,
        path: &Path,
        kind: MapKind,
        block_size: u32,
        nblocks: u64,
    ) -> Result<Self> {
        let existed = storage
            .exists(path)
            .ctx(|| format!("stat {}", path.display()))?;
        if !existed {
            Self::write_zeroed(storage, path, kind, block_size, nblocks)?;
        }
        Self::load(storage, path, kind, block_size, nblocks, existed)
    }

    /// Creates the map at `path` all zero, replacing (atomically) whatever
    /// file was there: a new session trusts nothing it finds.
    pub fn create(
        storage: &dyn Storage,
        path: &Path,
        kind: MapKind,
        block_size: u32,
        nblocks: u64,
    ) -> Result<Self> {
        Self::write_zeroed(storage, path, kind, block_size, nblocks)?;
        Self::load(storage, path, kind, block_size, nblocks, false)
    }

    /// Opens the map at `path`, which must exist: a resumed session whose
    /// map is gone would silently forget blocks (refetch guest data over,
    /// or leave written blocks out of the next backup).
    pub fn open_existing(
        storage: &dyn Storage,
        path: &Path,
        kind: MapKind,
        block_size: u32,
        nblocks: u64,
    ) -> Result<Self> {
        if !storage
            .exists(path)
            .ctx(|| format!("stat {}", path.display()))?
        {
            return Err(Error::corrupt(format!(
                "staging map {} is missing",
                path.display()
            )));
        }
        Self::load(storage, path, kind, block_size, nblocks, true)
    }

    fn write_zeroed(
        storage: &dyn Storage,
        path: &Path,
        kind: MapKind,
        block_size: u32,
        nblocks: u64,
    ) -> Result<()> {
        let mut init = Self::header(kind, block_size, nblocks).to_vec();
        init.resize((HEADER_LEN + nblocks.div_ceil(64) * 8) as usize, 0);
        replace(storage, path, &init)
    }

    /// Reads the map at `path` (`existed`: not just written by us).
    fn load(
        storage: &dyn Storage,
        path: &Path,
        kind: MapKind,
        block_size: u32,
        nblocks: u64,
        existed: bool,
    ) -> Result<Self> {
        let header = Self::header(kind, block_size, nblocks);
        let words_len = nblocks.div_ceil(64) * 8;
        let file = storage
            .open(path, Open::Existing)
            .ctx(|| format!("open {}", path.display()))?;
        if existed {
            // After a `kill -9` the words read below come from the page
            // cache: a group commit may have written them and died before
            // its sync. They count as durable from here on (a later durable
            // set of such a bit returns at once, a flush finds nothing
            // dirty), so make them so first.
            file.sync_data()
                .ctx(|| format!("fsync {}", path.display()))?;
        }
        let mut buf = vec![0u8; (HEADER_LEN + words_len) as usize];
        file.read_exact_at(&mut buf, 0)
            .map_err(|_| Error::corrupt(format!("staging map {} is truncated", path.display())))?;
        if buf[..HEADER_LEN as usize] != header {
            return Err(Error::corrupt(format!(
                "staging map {} does not match its disk (damaged or from another backup)",
                path.display()
            )));
        }
        let words: Vec<u64> = buf[HEADER_LEN as usize..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let bits = AtomicBitmap::new(nblocks);
        bits.load(&words);
        // Bits past the end would be garbage from a damaged file.
        if nblocks % 64 != 0 {
            if let Some(last) = words.last() {
                if last >> (nblocks % 64) != 0 {
                    return Err(Error::corrupt(format!(
                        "staging map {} has bits past its end",
                        path.display()
                    )));
                }
            }
        }
        Ok(PersistentBitmap {
            bits,
            file,
            path: path.to_path_buf(),
            dirty: AtomicBool::new(false),
            write_lock: Mutex::new(()),
            commit: Mutex::new(Commit::default()),
            committed: Condvar::new(),
            recorded: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            durable: {
                let d = AtomicBitmap::new(nblocks);
                d.load(&words);
                d
            },
            block_size,
            mirror: None,
        })
    }

    /// Starts mirroring every bit set into `path` (see [`super::live`]),
    /// first adding the bits a daemon of this boot recorded there, if
    /// `trust`: their bytes are in the staging file, synced or not. Those
    /// bits are persisted here at the next flush, after a data sync, like
    /// any other.
    pub fn attach_mirror(
        &mut self,
        storage: &dyn Storage,
        path: &Path,
        trust: bool,
    ) -> Result<u64> {
        let synced = self.bits.snapshot();
        let opened = LiveMirror::open(
            storage,
            path,
            self.block_size,
            self.bits.len(),
            &synced,
            trust,
        )?;
        let mut added = 0;
        if let Some(words) = opened.trusted {
            for (i, (w, t)) in synced.iter().zip(&words).enumerate() {
                let extra = t & !w;
                if extra != 0 {
                    added += extra.count_ones() as u64;
                    self.bits.words[i].fetch_or(extra, Ordering::AcqRel);
                }
            }
            // Bits past the end would be garbage from a damaged file.
            let n = self.bits.len();
            if n % 64 != 0 {
                if let Some(last) = self.bits.words.last() {
                    last.fetch_and((1u64 << (n % 64)) - 1, Ordering::AcqRel);
                }
            }
            if added > 0 {
                self.dirty.store(true, Ordering::Release);
            }
        }
        self.mirror = Some(opened.mirror);
        Ok(added)
    }

    /// The epoch of the mirror (see [`super::live`]); 0 without one.
    pub fn epoch(&self) -> u64 {
        self.mirror.as_ref().map_or(0, |m| m.epoch())
    }

    /// After a failed sync: the next daemon must not trust the mirror.
    pub fn poison_mirror(&self) {
        if let Some(m) = &self.mirror {
            m.poison();
        }
    }

    fn header(kind: MapKind, block_size: u32, nblocks: u64) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&(kind as u32).to_le_bytes());
        h[12..16].copy_from_slice(&block_size.to_le_bytes());
        h[16..24].copy_from_slice(&nblocks.to_le_bytes());
        h
    }

    pub fn bits(&self) -> &AtomicBitmap {
        &self.bits
    }

    pub fn test(&self, bit: u64) -> bool {
        self.bits.test(bit)
    }

    /// Sets a bit in memory, and in the mirror if there is one (so call it
    /// after the bytes the bit describes were written); `persist` makes it
    /// durable.
    pub fn set(&self, bit: u64) -> bool {
        if self.bits.test(bit) {
            return false;
        }
        // Mirror first: once the bit is set in memory a guest may write
        // over the block, and a restart must not refetch it then.
        if let Some(m) = &self.mirror {
            m.record(bit);
        }
        let new = self.bits.set(bit);
        if new {
            self.dirty.store(true, Ordering::Release);
        }
        new
    }

    /// Takes a snapshot to persist later, or `None` if nothing changed.
    /// Take it *before* syncing the data the bits describe.
    pub fn snapshot_if_dirty(&self) -> Option<Vec<u64>> {
        if self.dirty.swap(false, Ordering::AcqRel) {
            Some(self.bits.snapshot())
        } else {
            None
        }
    }

    /// Re-arms a persist after a snapshot could not be written.
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// Writes a snapshot and syncs it. On failure the map is marked dirty
    /// again so a later persist retries.
    pub fn write_snapshot(&self, words: &[u64]) -> Result<()> {
        let _g = self.write_lock.lock();
        self.write_words_locked(0, words)
    }

    /// Writes `words` starting at word `first` and syncs; the caller holds
    /// `write_lock`. A failure re-arms the next persist.
    fn write_words_locked(&self, first: u64, words: &[u64]) -> Result<()> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let r = self
            .file
            .write_all_at(&bytes, HEADER_LEN + first * 8)
            .and_then(|_| self.file.sync_data())
            .ctx(|| format!("write {}", self.path.display()));
        if r.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        r
    }

    /// Sets a bit and makes it durable before returning (write-ahead
    /// intent): used for the changed map, which must never miss a block
    /// whose data may have reached the disk.
    pub fn set_durable(&self, bit: u64) -> Result<()> {
        self.set_many_durable(bit..bit + 1)
    }

    /// True if `bit` is set and known synced: a durable set of it returns
    /// at once, without waiting for a sync.
    pub fn test_durable(&self, bit: u64) -> bool {
        self.bits.test(bit) && self.durable.test(bit)
    }

    /// Sets `bits` and makes them durable before returning, sharing one
    /// write and one sync with every concurrent caller (see the module doc).
    pub fn set_many_durable(&self, bits: std::ops::Range<u64>) -> Result<()> {
        if bits.clone().all(|b| self.test_durable(b)) {
            return Ok(());
        }
        let mut st = self.commit.lock();
        let mut ticket = None;
        for b in bits {
            if self.bits.test(b) {
                continue;
            }
            ticket.get_or_insert_with(|| self.recorded.fetch_add(1, Ordering::SeqCst) + 1);
            self.bits.set(b);
            st.pending.insert(b / 64);
        }
        // Bits already set (by a round maybe still running) belong to a
        // batch no later than this number.
        let ticket = ticket.unwrap_or_else(|| self.recorded.load(Ordering::SeqCst));
        loop {
            if self.synced.load(Ordering::SeqCst) >= ticket {
                return Ok(());
            }
            if let Some((upto, e)) = &st.failed {
                if *upto >= ticket {
                    return Err(e.clone());
                }
            }
            if st.leading {
                self.committed.wait(&mut st);
                continue;
            }
            // Lead a round: every word pending now, every batch so far.
            st.leading = true;
            let words = std::mem::take(&mut st.pending);
            let upto = self.recorded.load(Ordering::SeqCst);
            let r = parking_lot::MutexGuard::unlocked(&mut st, || self.write_words(&words));
            st.leading = false;
            match r {
                Ok(written) => {
                    for (w, v) in written {
                        self.durable.words[w as usize].fetch_or(v, Ordering::AcqRel);
                    }
                    self.synced.fetch_max(upto, Ordering::SeqCst);
                }
                Err(e) => {
                    // Retried by the next round; this round's setters fail.
                    st.pending.extend(words);
                    st.failed = Some((upto, e));
                }
            }
            self.committed.notify_all();
        }
    }

    /// Writes the words `words` from memory, each run of adjacent ones in
    /// one write, and syncs once; returns the words written.
    fn write_words(&self, words: &std::collections::BTreeSet<u64>) -> Result<Vec<(u64, u64)>> {
        let _g = self.write_lock.lock();
        let mut runs: Vec<(u64, Vec<u8>)> = vec![];
        let mut written = Vec::with_capacity(words.len());
        for &w in words {
            let v = self.bits.words[w as usize].load(Ordering::Acquire);
            written.push((w, v));
            let bytes = v.to_le_bytes();
            match runs.last_mut() {
                Some((first, buf)) if *first + (buf.len() / 8) as u64 == w => {
                    buf.extend_from_slice(&bytes)
                }
                _ => runs.push((w, bytes.to_vec())),
            }
        }
        runs.iter()
            .try_for_each(|(w, buf)| self.file.write_all_at(buf, HEADER_LEN + w * 8))
            .and_then(|()| self.file.sync_data())
            .ctx(|| format!("write {}", self.path.display()))?;
        Ok(written)
    }

    /// Eviction: clears `bits` in memory and
    /// in the same-boot mirror, then in the file, synced, before returning;
    /// only then may the caller punch the blocks' holes. The file words are read back and only the
    /// evicted bits cleared in them: bits set in memory since the last
    /// persist describe data not synced yet and must not reach the file
    /// here. The caller keeps a snapshot taken before this call from being
    /// written after it (`Volume::evict` holds the flush lock).
    pub fn clear_many_durable(&self, bits: &[u64]) -> Result<()> {
        let _g = self.write_lock.lock();
        let mut words: std::collections::BTreeMap<u64, u64> = Default::default();
        for &b in bits {
            self.bits.clear(b);
            *words.entry(b / 64).or_default() |= 1 << (b % 64);
        }
        let r = (|| -> std::io::Result<()> {
            if let Some(m) = &self.mirror {
                bits.iter().try_for_each(|&b| m.unrecord(b))?;
            }
            for (&w, &mask) in &words {
                let mut buf = [0u8; 8];
                self.file.read_exact_at(&mut buf, HEADER_LEN + w * 8)?;
                let word = u64::from_le_bytes(buf) & !mask;
                self.file
                    .write_all_at(&word.to_le_bytes(), HEADER_LEN + w * 8)?;
            }
            self.file.sync_data()
        })();
        r.ctx(|| format!("write {}", self.path.display()))
    }

    /// Snapshot and write under the writer lock, so a concurrent durable
    /// clear can never be overwritten by an older snapshot. For maps whose
    /// bits also go from 1 to 0.
    pub fn persist_exclusive(&self) -> Result<()> {
        let _g = self.write_lock.lock();
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.write_words_locked(0, &self.bits.snapshot())
    }

    /// [`Self::persist_exclusive`] for the words holding `bits` only (the
    /// ranges ascending): one write per range and one sync, so a commit
    /// costs the words it touched, never the whole map. The same rule
    /// holds: every bit set in memory in those words is one its setter may
    /// publish, and a concurrent durable clear is never overwritten.
    pub fn persist_bits(&self, bits: &[std::ops::Range<u64>]) -> Result<()> {
        let _g = self.write_lock.lock();
        let mut words: Vec<std::ops::Range<u64>> = vec![];
        for r in bits.iter().filter(|r| !r.is_empty()) {
            let w = r.start / 64..r.end.div_ceil(64);
            match words.last_mut() {
                Some(last) if w.start <= last.end => last.end = last.end.max(w.end),
                _ => words.push(w),
            }
        }
        if words.is_empty() {
            return Ok(());
        }
        let r = words
            .iter()
            .try_for_each(|w| {
                let bytes: Vec<u8> = self.bits.words[w.start as usize..w.end as usize]
                    .iter()
                    .flat_map(|v| v.load(Ordering::Acquire).to_le_bytes())
                    .collect();
                self.file.write_all_at(&bytes, HEADER_LEN + w.start * 8)
            })
            .and_then(|()| self.file.sync_data())
            .ctx(|| format!("write {}", self.path.display()));
        if r.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        r
    }

    /// Snapshot, write and sync in one step (for maps with no data to order).
    pub fn persist(&self) -> Result<()> {
        match self.snapshot_if_dirty() {
            Some(s) => self.write_snapshot(&s),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
