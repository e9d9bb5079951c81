//! Garbage collection: remove the chunks nothing references.
//!
//! Mark and sweep, in two phases so that backups wait only for the short
//! second one (see `repo::locks` for why a lock protocol and not a grace
//! period):
//!
//! 1. Unlocked: read every referring object (each [`Referrer`] kind) and
//!    mark its chunks; list every chunk object with its size.
//! 2. Holding the collector lock, taken only when no backup is being
//!    written: list the referring objects again and mark what phase 1 did
//!    not see (new objects of an immutable kind; every object of a
//!    mutable one), then delete each listed, unmarked chunk in batches,
//!    checking before each batch that the lock is still trusted.
//!
//! A chunk written after phase 1's listing is never a candidate; a backup
//! that finished before the lock is marked from its manifest in phase 2;
//! a backup running at the lock makes the collector wait or give up, and
//! one starting later waits for the collector. So every chunk a manifest
//! (or a manifest being written) needs stays.
//!
//! Kinds of referring objects are a table: manifests here, profiles from
//! `prefetch::profile`; another kind (a file-backup catalog) is one more
//! [`Referrer`]. An object of a kind that cannot be read or verified stops
//! the collection before anything is removed: what it references is
//! unknown.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::chunk::Digest;
use super::locks::GcLock;
use super::Repository;
use crate::error::Result;

/// Deletes per batch (S3 DeleteObjects takes at most 1000).
const BATCH: usize = 1000;

/// A kind of repository object that references chunks.
#[derive(Clone, Copy)]
pub struct Referrer {
    /// Key prefix of the kind's objects (`backups`, `profiles`).
    pub prefix: &'static str,
    /// Objects never change once written (phase 2 reads only new ones).
    pub immutable: bool,
    /// Largest such object.
    pub limit: u64,
    /// The chunks one stored object references; `key` names it in errors.
    pub refs: fn(repo: &Repository, key: &str, bytes: &[u8]) -> Result<Vec<Digest>>,
}

/// Backup manifests: `backups/<vm>/<id>.json`.
pub const MANIFESTS: Referrer = Referrer {
    prefix: "backups",
    immutable: true,
    limit: super::limits::MAX_MANIFEST_BYTES,
    refs: manifest_refs,
};

fn manifest_refs(repo: &Repository, key: &str, bytes: &[u8]) -> Result<Vec<Digest>> {
    let what = key
        .strip_prefix("backups/")
        .and_then(|k| k.strip_suffix(".json"))
        .unwrap_or(key);
    let m = repo.decode_manifest(bytes, what)?;
    Ok(m.disks
        .iter()
        .flat_map(|d| d.chunks.digests().copied())
        .collect())
}

#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    pub dry_run: bool,
    /// How long to wait for running backups before giving up.
    pub wait: Duration,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub repo: String,
    pub dry_run: bool,
    /// Referring objects read, per kind (prefix).
    pub referrers: BTreeMap<String, u64>,
    pub chunks: u64,
    pub referenced_chunks: u64,
    pub removed_chunks: u64,
    /// Stored bytes of the removed chunks (would be, with --dry-run).
    pub freed_bytes: u64,
    pub kept_bytes: u64,
    /// Objects under `chunks/` that are not chunk objects: left alone.
    pub foreign_objects: u64,
    /// Temp files of writes killed midway (local repositories), older
    /// than [`LEFTOVER_AGE`]: removed (would be, with --dry-run).
    pub leftover_files: u64,
    pub leftover_bytes: u64,
}

/// A write's temp file untouched this long belongs to a writer that is
/// gone: a live one renames it within seconds (and one that wakes after a
/// removal fails its rename, and so its backup, rather than losing data).
pub const LEFTOVER_AGE: Duration = Duration::from_secs(24 * 3600);

/// What has been marked, and which objects were read.
#[derive(Default)]
struct Marks {
    chunks: HashSet<Digest>,
    read: HashMap<&'static str, HashSet<String>>,
}

impl Marks {
    /// Reads every object of each kind (only unread ones of immutable kinds).
    fn mark(&mut self, repo: &Repository, referrers: &[Referrer]) -> Result<()> {
        for r in referrers {
            let read = self.read.entry(r.prefix).or_default();
            for o in repo.backend().list_all(r.prefix)? {
                if r.immutable && read.contains(&o.key) {
                    continue;
                }
                // Gone since the listing (forgotten): it marks nothing.
                let Some(bytes) = repo.backend().get(&o.key, r.limit)? else {
                    continue;
                };
                let refs = (r.refs)(repo, &o.key, &bytes).map_err(|e| {
                    let advice = in_use_advice(repo, &o.key)
                        .or_else(|| profile_advice(repo, &o.key))
                        .unwrap_or_else(|| {
                            "if that backup is lost, delete the object by hand".into()
                        });
                    e.context(format!(
                        "gc stopped before removing anything: {} cannot be read, so what it references is unknown ({advice})",
                        o.key
                    ))
                })?;
                self.chunks.extend(refs);
                read.insert(o.key);
            }
        }
        Ok(())
    }
}

/// For a damaged manifest `backups/VM/ID.json` that recovery sessions
/// still use (pinned): never to be deleted, and where those sessions keep
/// the copy they serve from (explore4 M3: gc advised deleting it).
fn in_use_advice(repo: &Repository, key: &str) -> Option<String> {
    let rest = key.strip_prefix("backups/")?.strip_suffix(".json")?;
    let (vm, id) = rest.split_once('/')?;
    let pins = super::pins::of_vm_readable(repo, vm).ok()?;
    // A pin names its session's directory; the first backup is the one
    // the session was recovered from, whose manifest it copied there.
    let copies: Vec<String> = pins
        .iter()
        .filter(|p| p.backups.first().is_some_and(|b| b == id))
        .map(|p| format!("{}:{}/manifest.json", p.host, p.staging))
        .collect();
    if copies.is_empty() {
        let base = pins
            .iter()
            .any(|p| p.backups.iter().skip(1).any(|b| b == id));
        return base.then(|| {
            format!(
            "do not delete it: backup {vm}/{id} is the base of a recovery session's live backups"
        )
        });
    }
    Some(format!(
        "do not delete it: backup {vm}/{id} is in use by a recovery session, which serves from its own copy of the manifest ({}); in an unencrypted repository that copy is an equivalent object and can be put back in its place",
        copies.join(", ")
    ))
}

/// For a damaged profile `profiles/VM.json`: derived data, removed by
/// the command made for it (on S3 "by hand" needs another tool).
fn profile_advice(repo: &Repository, key: &str) -> Option<String> {
    let vm = key.strip_prefix("profiles/")?.strip_suffix(".json")?;
    Some(format!(
        "it is VM {vm}'s prefetch profile, derived data: `recoverfs profile clear --repo {} {vm}` removes it, and the VM's next recording makes a new one",
        repo.location()
    ))
}

/// The digest a key under `chunks/` names, if it is a chunk object's key.
fn chunk_of(key: &str) -> Option<Digest> {
    let d = Digest::from_hex(key.rsplit('/').next()?).ok()?;
    (d.key() == key).then_some(d)
}

/// Runs a collection (see the module docs).
pub fn collect(
    repo: &Arc<Repository>,
    referrers: &[Referrer],
    opts: GcOptions,
) -> Result<GcReport> {
    let mut report = GcReport {
        repo: repo.location(),
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let mut marks = Marks::default();
    marks.mark(repo, referrers)?;
    let mut chunks = vec![];
    for o in repo.backend().list_all("chunks")? {
        match chunk_of(&o.key) {
            Some(d) => chunks.push((d, o)),
            None => report.foreign_objects += 1,
        }
    }
    let lock = GcLock::acquire(repo, opts.wait)?;
    marks.mark(repo, referrers)?;
    let mut doomed = vec![];
    for (d, o) in &chunks {
        if marks.chunks.contains(d) {
            report.referenced_chunks += 1;
            report.kept_bytes += o.size;
        } else {
            report.removed_chunks += 1;
            report.freed_bytes += o.size;
            doomed.push(o.key.clone());
        }
    }
    report.chunks = chunks.len() as u64;
    report.referrers = marks
        .read
        .iter()
        .map(|(k, v)| (k.to_string(), v.len() as u64))
        .collect();
    if !opts.dry_run {
        for (i, batch) in doomed.chunks(BATCH).enumerate() {
            // Held across the batch: a signal's lock release waits for it.
            let _held = lock
                .hold()
                .map_err(|e| e.context("gc stopped part way (what it removed was unreferenced)"))?;
            repo.backend().delete_many(batch).map_err(|e| {
                e.context(format!(
                    "gc stopped part way: {} of {} unreferenced chunks removed before this batch (nothing referenced was touched); run gc again",
                    i * BATCH,
                    doomed.len()
                ))
            })?;
        }
    }
    (report.leftover_files, report.leftover_bytes) = repo
        .backend()
        .sweep_leftover_writes(LEFTOVER_AGE, opts.dry_run)
        .map_err(|e| e.context("removing temp files of killed writes"))?;
    drop(lock);
    tracing::info!(
        repo = %report.repo,
        removed = report.removed_chunks,
        freed = report.freed_bytes,
        dry_run = opts.dry_run,
        "gc done"
    );
    Ok(report)
}

#[cfg(test)]
mod tests;
