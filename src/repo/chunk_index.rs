//! A disk's chunk list in memory: which chunk holds data, and its digest.
//!
//! A 10 TiB disk of 1 MiB chunks has 10 million chunks; as a
//! `Vec<Option<Digest>>` that is 330 MB, even when almost every chunk is
//! zeros. [`ChunkIndex`] keeps only what is there:
//!
//! * `digests`: the digests of the chunks with data, in chunk order (32
//!   bytes each);
//! * `runs`: one entry per run of consecutive chunks with data, its first
//!   chunk and the position of its first digest in `digests` (16 bytes a
//!   run). A run's length is the next run's rank minus its own.
//!
//! Memory is proportional to the data and the number of data extents,
//! never to the disk size: a sparse 10 TiB disk with a few data extents
//! costs a few hundred bytes. Looking chunk `i` up is a binary search over
//! the runs (O(log runs)); walking all chunks or all chunks with data needs
//! no search. Runs are kept maximal (adjacent ones merged), so two equal
//! chunk lists are equal indexes.
//!
//! **On disk** (inside the manifest's JSON) the list is an array in chunk
//! order: a chunk with data is its 64-hex digest; a run of `n` zero chunks
//! is the number `n` (manifest format 2). Format 1 manifests, written
//! before, have `null` for each zero chunk; both read the same way, and
//! [`ChunkIndex`] is deserialized straight from either form, never through
//! a per-chunk vector. So a sparse 10 TiB disk is a few bytes of JSON, not
//! 50 MB of `null`s. A list longer than [`MAX_CHUNKS`] is refused while it
//! is read.

use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::chunk::{Digest, MIN_CHUNK_SIZE};
use super::limits::MAX_DISK_BYTES;

/// Most chunks a disk can have: the largest disk in the smallest chunks.
pub const MAX_CHUNKS: u64 = MAX_DISK_BYTES / MIN_CHUNK_SIZE;

/// A run of consecutive chunks with data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    /// Its first chunk.
    start: u64,
    /// Position of that chunk's digest in `digests`.
    rank: u64,
}

/// The chunks of one disk: a digest per chunk with data, `None` for an
/// all-zero chunk (see the module doc).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ChunkIndex {
    len: u64,
    runs: Vec<Run>,
    digests: Vec<Digest>,
}

impl ChunkIndex {
    /// `len` zero chunks.
    pub fn zeros(len: u64) -> ChunkIndex {
        ChunkIndex {
            len,
            ..ChunkIndex::default()
        }
    }

    /// Number of chunks (with data or not).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunks with data.
    pub fn data_chunks(&self) -> u64 {
        self.digests.len() as u64
    }

    /// All-zero chunks.
    pub fn zero_chunks(&self) -> u64 {
        self.len - self.data_chunks()
    }

    /// Chunk `i`'s digest, `None` for a zero chunk (or past the end).
    pub fn get(&self, i: u64) -> Option<Digest> {
        let k = self.runs.partition_point(|r| r.start <= i).checked_sub(1)?;
        let off = i - self.runs[k].start;
        (off < self.run_len(k)).then(|| self.digests[(self.runs[k].rank + off) as usize])
    }

    /// True if chunk `i` has data.
    pub fn has_data(&self, i: u64) -> bool {
        self.get(i).is_some()
    }

    /// The first chunk with data at or after `i`, if any: a binary search
    /// over the runs, so walking the data of a sparse disk skips its zero
    /// stretches whole.
    pub fn next_data(&self, i: u64) -> Option<u64> {
        let k = self.runs.partition_point(|r| r.start <= i);
        // The run starting at or before `i` may still cover it.
        if let Some(p) = k.checked_sub(1) {
            if i < self.runs[p].start + self.run_len(p) {
                return Some(i);
            }
        }
        self.runs.get(k).map(|r| r.start)
    }

    /// One past the last chunk of the run of chunks with data that holds
    /// `i`; `i` itself for a zero chunk.
    pub fn data_end(&self, i: u64) -> u64 {
        match self.runs.partition_point(|r| r.start <= i).checked_sub(1) {
            Some(k) => (self.runs[k].start + self.run_len(k)).max(i),
            None => i,
        }
    }

    /// Every chunk in order, `None` for a zero chunk.
    pub fn iter(&self) -> impl Iterator<Item = Option<Digest>> + '_ {
        let mut data = self.iter_present().peekable();
        (0..self.len).map(move |i| data.next_if(|&(j, _)| j == i).map(|(_, d)| d))
    }

    /// The chunks with data, in order, with their indexes.
    pub fn iter_present(&self) -> impl Iterator<Item = (u64, Digest)> + '_ {
        (0..self.runs.len()).flat_map(move |k| {
            let r = self.runs[k];
            (0..self.run_len(k))
                .map(move |off| (r.start + off, self.digests[(r.rank + off) as usize]))
        })
    }

    /// The digests of the chunks with data, in chunk order (repeats kept).
    pub fn digests(&self) -> impl Iterator<Item = &Digest> + '_ {
        self.digests.iter()
    }

    /// This list with `changes` applied (`(index, digest)`, in any order;
    /// a later change of the same chunk wins). Costs the data chunks plus
    /// the changes, never the disk size. Panics on an index past the end.
    pub fn with_changes(
        &self,
        changes: impl IntoIterator<Item = (u64, Option<Digest>)>,
    ) -> ChunkIndex {
        let changes: std::collections::BTreeMap<u64, Option<Digest>> =
            changes.into_iter().collect();
        if let Some((&last, _)) = changes.last_key_value() {
            assert!(
                last < self.len,
                "chunk {last} is past the {} chunks",
                self.len
            );
        }
        let mut out = Builder::default();
        let mut changes = changes.into_iter().peekable();
        for (i, d) in self.iter_present() {
            let mut keep = true;
            while let Some((j, c)) = changes.next_if(|&(j, _)| j <= i) {
                if let Some(c) = c {
                    out.push_data(j, c);
                }
                // A change of chunk `i` replaces (or zeroes) its digest.
                keep &= j != i;
            }
            if keep {
                out.push_data(i, d);
            }
        }
        for (j, c) in changes {
            if let Some(c) = c {
                out.push_data(j, c);
            }
        }
        out.finish(self.len)
    }

    fn run_len(&self, k: usize) -> u64 {
        let next = match self.runs.get(k + 1) {
            Some(r) => r.rank,
            None => self.digests.len() as u64,
        };
        next - self.runs[k].rank
    }
}

/// Builds an index chunk by chunk, in ascending order.
#[derive(Default)]
struct Builder {
    runs: Vec<Run>,
    digests: Vec<Digest>,
    /// One past the last chunk with data pushed.
    end: u64,
}

impl Builder {
    /// Chunk `i` (after every chunk pushed so far) has data `d`.
    fn push_data(&mut self, i: u64, d: Digest) {
        debug_assert!(self.runs.is_empty() || i >= self.end, "chunks out of order");
        if self.runs.is_empty() || i != self.end {
            self.runs.push(Run {
                start: i,
                rank: self.digests.len() as u64,
            });
        }
        self.digests.push(d);
        self.end = i + 1;
    }

    fn finish(mut self, len: u64) -> ChunkIndex {
        self.runs.shrink_to_fit();
        self.digests.shrink_to_fit();
        ChunkIndex {
            len,
            runs: self.runs,
            digests: self.digests,
        }
    }
}

impl FromIterator<Option<Digest>> for ChunkIndex {
    fn from_iter<I: IntoIterator<Item = Option<Digest>>>(iter: I) -> ChunkIndex {
        let mut b = Builder::default();
        let mut len = 0;
        for c in iter {
            if let Some(d) = c {
                b.push_data(len, d);
            }
            len += 1;
        }
        b.finish(len)
    }
}

impl fmt::Debug for ChunkIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ChunkIndex({} chunks, {} with data in {} runs)",
            self.len,
            self.digests.len(),
            self.runs.len()
        )
    }
}

impl Serialize for ChunkIndex {
    /// Digests, and a count for each run of zero chunks (format 2).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(None)?;
        let mut next = 0;
        for k in 0..self.runs.len() {
            let r = self.runs[k];
            if r.start > next {
                seq.serialize_element(&(r.start - next))?;
            }
            let n = self.run_len(k);
            for d in &self.digests[r.rank as usize..(r.rank + n) as usize] {
                seq.serialize_element(d)?;
            }
            next = r.start + n;
        }
        if self.len > next {
            seq.serialize_element(&(self.len - next))?;
        }
        seq.end()
    }
}

/// One element of the stored list.
enum Entry {
    Data(Digest),
    Zeros(u64),
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Entry, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Entry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a chunk digest, null, or a count of zero chunks")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Entry, E> {
                Digest::from_hex(s).map(Entry::Data).map_err(E::custom)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Entry, E> {
                Ok(Entry::Zeros(1))
            }
            fn visit_none<E: de::Error>(self) -> Result<Entry, E> {
                Ok(Entry::Zeros(1))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Entry, E> {
                match n {
                    0 => Err(E::custom("a run of zero chunks cannot be empty")),
                    n => Ok(Entry::Zeros(n)),
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Entry, E> {
                u64::try_from(n)
                    .map_err(|_| E::custom(format!("invalid count of zero chunks {n}")))
                    .and_then(|n| self.visit_u64(n))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for ChunkIndex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ChunkIndex, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ChunkIndex;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of chunks")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ChunkIndex, A::Error> {
                let mut b = Builder::default();
                let mut len: u64 = 0;
                while let Some(e) = seq.next_element::<Entry>()? {
                    match e {
                        Entry::Data(d) => {
                            b.push_data(len, d);
                            len += 1;
                        }
                        Entry::Zeros(n) => len = len.saturating_add(n),
                    }
                    if len > MAX_CHUNKS {
                        return Err(de::Error::custom(format!(
                            "more than the {MAX_CHUNKS} chunks a disk may have"
                        )));
                    }
                }
                Ok(b.finish(len))
            }
        }
        d.deserialize_seq(V)
    }
}

#[cfg(test)]
mod tests;
