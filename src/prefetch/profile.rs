//! Operational profiles: what a VM read when it booted, stored in the
//! repository at `profiles/<vm>.json` (sealed with a checksum), so its next
//! recovery — from any of its backups — can stage those blocks first.
//!
//! A profile keeps the last few recordings, one per session. Using it
//! merges them: blocks read in every boot come first, ordered by their
//! median time; blocks seen in fewer boots follow. Blocks map by position;
//! a block whose chunk differs in the recovered backup is skipped, since
//! the recorded read says nothing about new content.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::repo::limits::MAX_DISKS;
use crate::repo::{ChunkIndex, Digest, Repository};
use crate::util::validate_name;

pub const PROFILE_FORMAT: &str = "recoverfs-profile-1";
/// Recordings kept per VM; older ones age out.
pub const MAX_RECORDINGS: usize = 5;
/// First reads a disk's recording keeps (16 GiB of 64 KiB blocks: a boot
/// reads far less), and a profile document holds in all: loading one
/// costs about 200 bytes per access.
pub const MAX_TRACE_ACCESSES: usize = 1 << 18;
pub const MAX_PROFILE_ACCESSES: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProfileDoc {
    pub format: String,
    pub vm: String,
    /// Oldest first.
    pub recordings: Vec<Recording>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Recording {
    pub recorded: String,
    pub backup: String,
    /// `session`, `verify-boot` or `import`.
    pub source: String,
    pub disks: Vec<DiskTrace>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskTrace {
    pub index: usize,
    pub block_size: u64,
    /// First guest reads in order.
    pub accesses: Vec<Access>,
}

/// One first read: block, milliseconds since the session started, and the
/// block's chunk in the backup it was read from (`null` for a zero chunk).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Access(pub u64, pub u32, pub Option<Digest>);

/// A block of the merged profile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Planned {
    pub block: u64,
    /// Median first-read time over the recordings that saw it.
    pub t_ms: u32,
    /// How many recordings read it.
    pub seen: u32,
    pub chunk: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MergedDisk {
    pub index: usize,
    pub block_size: u64,
    pub recordings: u32,
    /// Most-seen first, then by time.
    pub blocks: Vec<Planned>,
}

fn key(vm: &str) -> String {
    format!("profiles/{vm}.json")
}

impl ProfileDoc {
    pub fn new(vm: &str) -> ProfileDoc {
        ProfileDoc {
            format: PROFILE_FORMAT.into(),
            vm: vm.into(),
            recordings: vec![],
        }
    }

    /// Checks what a reader relies on (an imported file is user input).
    pub fn check(&self, what: &str) -> Result<()> {
        if self.format != PROFILE_FORMAT {
            return Err(Error::invalid(format!(
                "{what} has format {:?}, expected {PROFILE_FORMAT:?}",
                self.format
            )));
        }
        // Bounds what merging costs: a few recordings of at most a backup's
        // disks each, every disk once.
        if self.recordings.len() > MAX_RECORDINGS {
            return Err(Error::invalid(format!(
                "{what} has {} recordings, more than {MAX_RECORDINGS}",
                self.recordings.len()
            )));
        }
        let mut total = 0usize;
        for r in &self.recordings {
            if r.disks.len() > MAX_DISKS {
                return Err(Error::invalid(format!(
                    "{what}: a recording has {} disk traces, more than the {MAX_DISKS} disks a backup may have",
                    r.disks.len()
                )));
            }
            let mut indexes = HashSet::new();
            for d in &r.disks {
                if d.index >= MAX_DISKS {
                    return Err(Error::invalid(format!(
                        "{what}: disk index {} is out of range (a backup has at most {MAX_DISKS} disks)",
                        d.index
                    )));
                }
                if !indexes.insert(d.index) {
                    return Err(Error::invalid(format!(
                        "{what}: a recording lists disk{} twice",
                        d.index
                    )));
                }
                // A backup's chunk size: anything else is forged, and
                // would overflow block-to-byte arithmetic.
                crate::repo::chunk::validate_chunk_size(d.block_size).map_err(|e| {
                    Error::invalid(format!("{what}: disk{} has block size {e}", d.index))
                })?;
                if d.accesses.len() > MAX_TRACE_ACCESSES {
                    return Err(Error::invalid(format!(
                        "{what}: disk{} has {} recorded reads, more than {MAX_TRACE_ACCESSES}",
                        d.index,
                        d.accesses.len()
                    )));
                }
                total += d.accesses.len();
            }
        }
        if total > MAX_PROFILE_ACCESSES {
            return Err(Error::invalid(format!(
                "{what} has {total} recorded reads, more than {MAX_PROFILE_ACCESSES}"
            )));
        }
        Ok(())
    }

    /// Adds a recording, dropping the oldest beyond [`MAX_RECORDINGS`].
    pub fn push(&mut self, r: Recording) {
        self.recordings.push(r);
        let excess = self.recordings.len().saturating_sub(MAX_RECORDINGS);
        self.recordings.drain(..excess);
    }

    /// The merged profile of every disk, by disk index.
    pub fn merge(&self) -> Vec<MergedDisk> {
        // Each disk's traces, newest first, in one pass (linear in the
        // document, whatever its indexes).
        let mut by_index: BTreeMap<usize, Vec<&DiskTrace>> = BTreeMap::new();
        for r in self.recordings.iter().rev() {
            for d in &r.disks {
                by_index.entry(d.index).or_default().push(d);
            }
        }
        by_index
            .into_iter()
            .filter_map(|(i, traces)| Self::merge_disk(i, traces))
            .collect()
    }

    fn merge_disk(index: usize, traces: Vec<&DiskTrace>) -> Option<MergedDisk> {
        // Recordings from a backup with another chunk size do not line up
        // block for block; the newest geometry wins.
        let block_size = traces.first()?.block_size;
        let traces: Vec<_> = traces
            .into_iter()
            .filter(|t| t.block_size == block_size)
            .collect();
        let mut seen: HashMap<u64, (Vec<u32>, Option<Digest>)> = HashMap::new();
        for t in &traces {
            for a in &t.accesses {
                // Newest first, so the first chunk kept is the newest.
                seen.entry(a.0).or_insert_with(|| (vec![], a.2)).0.push(a.1);
            }
        }
        let mut blocks: Vec<Planned> = seen
            .into_iter()
            .map(|(block, (mut ts, chunk))| {
                ts.sort_unstable();
                Planned {
                    block,
                    t_ms: ts[ts.len() / 2],
                    seen: ts.len() as u32,
                    chunk,
                }
            })
            .collect();
        blocks.sort_by_key(|p| (std::cmp::Reverse(p.seen), p.t_ms, p.block));
        Some(MergedDisk {
            index,
            block_size,
            recordings: traces.len() as u32,
            blocks,
        })
    }
}

impl MergedDisk {
    /// The blocks worth fetching for a disk of `block_size` whose chunks
    /// are `chunks`: same chunk as recorded, not a zero chunk. With another
    /// block size, blocks map by byte position and chunks cannot be compared.
    pub fn plan_for(&self, block_size: u64, chunks: &ChunkIndex) -> Vec<Planned> {
        let nblocks = chunks.len();
        if block_size == self.block_size {
            return self
                .blocks
                .iter()
                .filter(|p| p.block < nblocks && p.chunk.is_some())
                .filter(|p| chunks.get(p.block) == p.chunk)
                .copied()
                .collect();
        }
        let mut done = std::collections::HashSet::new();
        let mut out = vec![];
        for p in &self.blocks {
            // Checked: a block past the byte range maps to nothing.
            let Some(s) = p.block.checked_mul(self.block_size) else {
                continue;
            };
            let e = s.saturating_add(self.block_size);
            for b in s / block_size..e.div_ceil(block_size).min(nblocks) {
                if chunks.has_data(b) && done.insert(b) {
                    out.push(Planned { block: b, ..*p });
                }
            }
        }
        out
    }
}

/// The stored profile of `vm`, if any.
pub fn load(repo: &Repository, vm: &str) -> Result<Option<ProfileDoc>> {
    validate_name("VM name", vm)?;
    let Some(bytes) = repo
        .backend()
        .get(&key(vm), crate::repo::limits::MAX_PROFILE_BYTES)?
    else {
        return Ok(None);
    };
    let what = format!("profile of VM {vm} in {}", repo.location());
    let doc: ProfileDoc = repo.unseal(&bytes, "profile", &what)?;
    doc.check(&what)
        .map_err(|e| Error::corrupt(e.to_string()))?;
    // The seal covers the body, not the object's name: another VM's
    // profile copied here would otherwise steer this VM's recoveries.
    if doc.vm != vm {
        return Err(Error::corrupt(format!(
            "{what} is the profile of VM {:?}, not of {vm:?} (copied or moved from another VM)",
            doc.vm
        )));
    }
    Ok(Some(doc))
}

/// The VMs with a stored profile (objects named as no VM can be are
/// passed over: nothing loads them).
pub fn vms(repo: &Repository) -> Result<Vec<String>> {
    let mut out: Vec<String> = repo
        .backend()
        .list_all("profiles")?
        .into_iter()
        .filter_map(|o| {
            Some(
                o.key
                    .strip_prefix("profiles/")?
                    .strip_suffix(".json")?
                    .to_string(),
            )
        })
        .filter(|vm| validate_name("VM name", vm).is_ok())
        .collect();
    out.sort();
    Ok(out)
}

/// For `verify`: why the stored profile of `vm` cannot be used (`None`:
/// none stored, or it is good); a store that does not answer is an error.
/// A damaged profile is never used (recoveries pass over it, the next
/// recording replaces it), but `gc` stops at it, so it is reported.
pub fn damage(repo: &Repository, vm: &str) -> Result<Option<String>> {
    match load(repo, vm) {
        Ok(_) => Ok(None),
        Err(e) if e.kind() == ErrorKind::Corrupt => Ok(Some(format!(
            "DAMAGED profile of VM {vm} ({}): {e}; a profile is derived data: `recoverfs profile clear --repo {} {vm}` removes it, and `gc` stops at it until then",
            key(vm),
            repo.location()
        ))),
        Err(e) => Err(e),
    }
}

/// Profiles as referrers of chunks, for garbage collection: each first
/// read names its block's chunk. Rewritten at each recording (mutable).
pub const REFERRER: crate::repo::gc::Referrer = crate::repo::gc::Referrer {
    prefix: "profiles",
    immutable: false,
    limit: crate::repo::limits::MAX_PROFILE_BYTES,
    refs: chunk_refs,
};

fn chunk_refs(repo: &Repository, key: &str, bytes: &[u8]) -> Result<Vec<Digest>> {
    let doc: ProfileDoc = repo.unseal(bytes, "profile", key)?;
    Ok(doc
        .recordings
        .iter()
        .flat_map(|r| r.disks.iter())
        .flat_map(|d| d.accesses.iter().filter_map(|a| a.2))
        .collect())
}

/// Stores `doc` as the profile of its VM, replacing the old one atomically.
pub fn store(repo: &Repository, doc: &ProfileDoc) -> Result<()> {
    validate_name("VM name", &doc.vm)?;
    let bytes = repo.seal("profile", doc)?;
    repo.backend().put(&key(&doc.vm), &bytes)
}

/// Adds one recording to the VM's stored profile. A damaged stored
/// profile is replaced: it is derived data, and the new recording is good.
pub fn append(repo: &Repository, vm: &str, rec: Recording) -> Result<()> {
    let mut doc = match load(repo, vm) {
        Ok(d) => d.unwrap_or_else(|| ProfileDoc::new(vm)),
        Err(e) if e.kind() == crate::error::ErrorKind::Corrupt => {
            tracing::warn!(vm, "replacing a damaged profile: {e}");
            ProfileDoc::new(vm)
        }
        Err(e) => return Err(e),
    };
    doc.push(rec);
    store(repo, &doc)
}

/// Deletes the VM's profile; `false` if it had none.
pub fn clear(repo: &Repository, vm: &str) -> Result<bool> {
    validate_name("VM name", vm)?;
    if !repo.backend().exists(&key(vm))? {
        return Ok(false);
    }
    repo.backend().delete(&key(vm))?;
    Ok(true)
}

/// Parses an exported profile for import as `vm`'s.
pub fn parse_export(bytes: &[u8], what: &str) -> Result<ProfileDoc> {
    let doc: ProfileDoc = serde_json::from_slice(bytes)
        .map_err(|e| Error::invalid(format!("{what} is not a recoverfs profile ({e})")))?;
    doc.check(what)?;
    Ok(doc)
}

/// Stores an exported profile (see [`parse_export`]) as `vm`'s, replacing
/// its profile; returns what was stored. One recorded for another VM (a
/// clone of the same template) is taken only if the disks of the backup
/// its newest recording was made from, in this repository, have the count
/// and sizes of `vm`'s newest backup, or with `other_vm`: recorded on other
/// disks, its blocks would be staged by position into unrelated data.
pub fn import(
    repo: &Repository,
    mut doc: ProfileDoc,
    vm: &str,
    other_vm: bool,
) -> Result<ProfileDoc> {
    validate_name("VM name", vm)?;
    if doc.vm != vm && !other_vm {
        same_disks(repo, &doc, vm).map_err(|why| {
            Error::invalid(format!(
                "the profile was recorded for VM {} and {why}; --other-vm imports it anyway",
                doc.vm
            ))
        })?;
    }
    doc.vm = vm.into();
    store(repo, &doc)?;
    Ok(doc)
}

/// Why the newest recording of `doc` (of another VM) cannot be shown to be
/// of disks like `vm`'s newest backup's.
fn same_disks(repo: &Repository, doc: &ProfileDoc, vm: &str) -> std::result::Result<(), String> {
    let Some(rec) = doc.recordings.last() else {
        return Ok(()); // Nothing to stage.
    };
    let sizes = |m: &crate::repo::manifest::Manifest| -> Vec<u64> {
        m.disks.iter().map(|d| d.size).collect()
    };
    let shown = |s: &[u64]| -> String {
        let each: Vec<String> = s.iter().map(|&b| crate::util::human_bytes(b)).collect();
        format!("{} disk(s): {}", s.len(), each.join(", "))
    };
    let from = repo
        .manifest(&doc.vm, &rec.backup)
        .map_err(|e| format!("its disks cannot be compared with VM {vm}'s ({e})"))?;
    let to = repo
        .resolve(vm, None)
        .map_err(|e| format!("its disks cannot be compared with VM {vm}'s ({e})"))?;
    let (from, to) = (sizes(&from), sizes(&to));
    if from != to {
        return Err(format!(
            "VM {} had {} where VM {vm} has {}",
            doc.vm,
            shown(&from),
            shown(&to)
        ));
    }
    Ok(())
}

/// Cumulative blocks first read by each time mark: the timeline `show` prints.
pub fn timeline(blocks: &[Planned]) -> Vec<(u32, usize)> {
    const MARKS_MS: [u32; 12] = [
        500,
        1_000,
        2_000,
        5_000,
        10_000,
        20_000,
        30_000,
        60_000,
        120_000,
        300_000,
        600_000,
        u32::MAX,
    ];
    let mut by_t: BTreeMap<u32, usize> = BTreeMap::new();
    for p in blocks {
        *by_t.entry(p.t_ms).or_default() += 1;
    }
    let last = by_t.keys().next_back().copied().unwrap_or(0);
    let mut out = vec![];
    for m in MARKS_MS {
        let n = by_t.range(..=m).map(|(_, n)| n).sum();
        out.push((m, n));
        if m >= last {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Option<Digest> {
        Some(Digest::of(&[n]))
    }

    fn rec(accesses: Vec<Access>) -> Recording {
        Recording {
            recorded: "2026-11-22T00:00:00Z".into(),
            backup: "b".into(),
            source: "session".into(),
            disks: vec![DiskTrace {
                index: 0,
                block_size: 65536,
                accesses,
            }],
        }
    }

    #[test]
    fn merging_puts_blocks_read_in_every_boot_first_by_median_time() {
        let mut doc = ProfileDoc::new("vm");
        doc.push(rec(vec![
            Access(1, 100, d(1)),
            Access(2, 200, d(2)),
            Access(9, 5, d(9)),
        ]));
        doc.push(rec(vec![Access(2, 100, d(2)), Access(1, 300, d(1))]));
        doc.push(rec(vec![
            Access(1, 200, d(1)),
            Access(2, 400, d(2)),
            Access(7, 1, d(7)),
        ]));
        let m = &doc.merge()[0];
        let order: Vec<(u64, u32, u32)> =
            m.blocks.iter().map(|p| (p.block, p.t_ms, p.seen)).collect();
        assert_eq!(order, vec![(1, 200, 3), (2, 200, 3), (7, 1, 1), (9, 5, 1)]);
        assert_eq!(m.recordings, 3);
    }

    #[test]
    fn only_the_newest_recordings_are_kept() {
        let mut doc = ProfileDoc::new("vm");
        for i in 0..MAX_RECORDINGS as u64 + 3 {
            doc.push(rec(vec![Access(i, 0, d(0))]));
        }
        assert_eq!(doc.recordings.len(), MAX_RECORDINGS);
        assert_eq!(doc.recordings[0].disks[0].accesses[0].0, 3);
    }

    #[test]
    fn planning_skips_changed_and_zero_chunks_and_maps_other_block_sizes() {
        let mut doc = ProfileDoc::new("vm");
        doc.push(rec(vec![
            Access(0, 0, d(0)),
            Access(1, 1, d(1)),
            Access(2, 2, d(2)),
            Access(3, 3, None),
        ]));
        let m = &doc.merge()[0];
        let now: ChunkIndex = [d(0), d(42), d(2), None].into_iter().collect();
        let same: Vec<u64> = m.plan_for(65536, &now).iter().map(|p| p.block).collect();
        assert_eq!(same, vec![0, 2], "block 1 changed, block 3 is zero");
        // 128 KiB blocks: recorded blocks 0..3 cover new blocks 0 and 1.
        let big: Vec<u64> = m
            .plan_for(131072, &[d(5), d(6)].into_iter().collect())
            .iter()
            .map(|p| p.block)
            .collect();
        assert_eq!(big, vec![0, 1]);
    }

    #[test]
    fn a_forged_block_size_or_read_count_is_refused_and_planning_never_overflows() {
        let mut doc = ProfileDoc::new("vm");
        doc.push(rec(vec![Access(0, 0, d(0)), Access(4, 1, d(4))]));
        doc.recordings[0].disks[0].block_size = 1 << 62;
        let e = doc.check("profile").unwrap_err().to_string();
        assert!(e.contains("block size"), "{e}");
        // Even unchecked, block 4 of 2^62 bytes lies past any disk.
        let m = &doc.merge()[0];
        let index: ChunkIndex = (0..16u8).map(d).collect();
        assert_eq!(m.plan_for(65536, &index).len(), 16);
        let mut doc = ProfileDoc::new("vm");
        doc.push(rec(vec![Access(0, 0, d(0)); MAX_TRACE_ACCESSES + 1]));
        let e = doc.check("profile").unwrap_err().to_string();
        assert!(e.contains("recorded reads"), "{e}");
    }

    #[test]
    fn a_profile_with_more_disk_traces_than_a_backup_has_disks_is_refused() {
        use crate::repo::limits::MAX_DISKS;
        let trace = |index| DiskTrace {
            index,
            block_size: 65536,
            accesses: vec![Access(0, 0, d(0))],
        };
        let with_disks = |disks: Vec<DiskTrace>| {
            let mut doc = ProfileDoc::new("vm");
            doc.push(Recording {
                disks,
                ..rec(vec![])
            });
            doc
        };
        assert!(with_disks((0..MAX_DISKS).map(trace).collect())
            .check("profile")
            .is_ok());
        let e = with_disks((0..=MAX_DISKS).map(trace).collect())
            .check("profile")
            .unwrap_err()
            .to_string();
        assert!(e.contains("disk traces, more than"), "{e}");
        let e = with_disks(vec![trace(MAX_DISKS)])
            .check("profile")
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of range"), "{e}");
        let e = with_disks(vec![trace(1), trace(0), trace(1)])
            .check("profile")
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        // push trims to MAX_RECORDINGS; a stored or imported file may not.
        let mut doc = with_disks(vec![trace(0)]);
        doc.recordings = vec![doc.recordings[0].clone(); MAX_RECORDINGS + 1];
        let e = doc.check("profile").unwrap_err().to_string();
        assert!(e.contains("recordings, more than"), "{e}");
    }

    #[test]
    fn merging_many_disks_keeps_each_disks_traces_newest_first() {
        let mut doc = ProfileDoc::new("vm");
        for r in 0..3u32 {
            doc.push(Recording {
                disks: (0..200usize)
                    .rev()
                    .map(|i| DiskTrace {
                        index: i,
                        // Disk 7 changed geometry in the newest recording.
                        block_size: if i == 7 && r == 2 { 131072 } else { 65536 },
                        accesses: vec![Access(i as u64, r * 10, d(r as u8))],
                    })
                    .collect(),
                ..rec(vec![])
            });
        }
        let m = doc.merge();
        assert_eq!(
            m.iter().map(|d| d.index).collect::<Vec<_>>(),
            (0..200).collect::<Vec<_>>()
        );
        assert_eq!(m[5].recordings, 3);
        assert_eq!(m[5].blocks[0].chunk, d(2), "the newest chunk is kept");
        assert_eq!(m[5].blocks[0].t_ms, 10);
        assert_eq!((m[7].block_size, m[7].recordings), (131072, 1));
    }

    #[test]
    fn an_exported_profile_parses_back_as_written_and_another_format_is_refused() {
        let mut doc = ProfileDoc::new("a");
        doc.push(rec(vec![Access(4, 10, d(4))]));
        let text = serde_json::to_vec_pretty(&doc).unwrap();
        assert_eq!(parse_export(&text, "file").unwrap(), doc);
        let e =
            parse_export(b"{\"format\":\"x\",\"vm\":\"a\",\"recordings\":[]}", "file").unwrap_err();
        assert!(e.to_string().contains("expected"), "{e}");
    }

    /// A repository with VMs `a` and `c` (two disks of 4 and 2 blocks) and
    /// `b` (one disk of 4 blocks); the id of `a`'s backup.
    fn three_vms(dir: &std::path::Path) -> (std::sync::Arc<Repository>, String) {
        let (repo, _) = Repository::open_or_create(dir.join("repo").to_str().unwrap()).unwrap();
        let img = |name: &str, blocks: usize| {
            let p = dir.join(name);
            std::fs::write(&p, vec![1u8; blocks * 65536]).unwrap();
            p
        };
        let (big, small) = (img("big.raw", 4), img("small.raw", 2));
        let backup = |vm: &str, images: Vec<std::path::PathBuf>| {
            let req = crate::repo::writer::BackupRequest {
                vm: vm.into(),
                config: None,
                chunk_size: 65536,
                images,
                progress: false,
            };
            crate::repo::writer::run_backup(&repo, req)
                .unwrap()
                .manifest
                .id
        };
        let id = backup("a", vec![big.clone(), small.clone()]);
        backup("b", vec![big.clone()]);
        backup("c", vec![big, small]);
        (repo, id)
    }

    #[test]
    fn a_profile_of_another_vm_is_imported_only_onto_the_same_disks_or_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, id) = three_vms(dir.path());
        let mut doc = ProfileDoc::new("a");
        let mut r = rec(vec![Access(3, 10, d(4))]);
        r.backup = id;
        doc.push(r);
        // Same disks (a clone of the same template): imported as c's.
        let c = import(&repo, doc.clone(), "c", false).unwrap();
        assert_eq!((c.vm.as_str(), &c.recordings), ("c", &doc.recordings));
        assert_eq!(load(&repo, "c").unwrap(), Some(c));
        // b has one disk: refused, nothing stored, unless told.
        let e = import(&repo, doc.clone(), "b", false).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidInput, "{e}");
        let m = e.to_string();
        assert!(
            m.contains("VM a") && m.contains("VM b") && m.contains("--other-vm"),
            "{m}"
        );
        assert!(load(&repo, "b").unwrap().is_none());
        assert_eq!(import(&repo, doc.clone(), "b", true).unwrap().vm, "b");
        // Disks that cannot be compared: no backup of the target, or the
        // recorded backup not in this repository.
        let e = import(&repo, doc.clone(), "new", false).unwrap_err();
        assert!(e.to_string().contains("--other-vm"), "{e}");
        let mut elsewhere = doc.clone();
        elsewhere.recordings[0].backup = "20200101-000000".into();
        let e = import(&repo, elsewhere, "c", false).unwrap_err();
        assert!(e.to_string().contains("--other-vm"), "{e}");
        // Its own VM's profile needs no comparison.
        assert_eq!(import(&repo, doc.clone(), "a", false).unwrap(), doc);
    }

    #[test]
    fn a_profile_stored_under_another_vm_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("repo");
        let (repo, _) = Repository::open_or_create_keyed(spec.to_str().unwrap(), None).unwrap();
        let mut b = ProfileDoc::new("b");
        b.push(rec(vec![Access(4, 10, d(4))]));
        store(&repo, &b).unwrap();
        assert_eq!(load(&repo, "b").unwrap(), Some(b));
        // Its MAC or checksum covers the body, not the object's name: a
        // copy under A's name must not steer A's recovery.
        std::fs::copy(spec.join("profiles/b.json"), spec.join("profiles/a.json")).unwrap();
        let e = load(&repo, "a").unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
        let m = e.to_string();
        assert!(m.contains("\"a\"") && m.contains("\"b\""), "{m}");
    }

    #[test]
    fn the_timeline_counts_blocks_cumulatively_up_to_the_last_read() {
        let blocks: Vec<Planned> = [10u32, 600, 700, 4_000]
            .iter()
            .enumerate()
            .map(|(i, &t)| Planned {
                block: i as u64,
                t_ms: t,
                seen: 1,
                chunk: None,
            })
            .collect();
        assert_eq!(
            timeline(&blocks),
            vec![(500, 1), (1_000, 3), (2_000, 3), (5_000, 4)]
        );
    }
}
