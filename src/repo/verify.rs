//! `verify`: every chunk the chosen backups need is read once and checked.
//!
//! Memory follows the distinct chunks, not the references to them. The
//! first walk over the manifests and catalogs keeps only each digest and
//! its length (about 40 bytes a chunk), so thirty backups of a 1 TiB disk
//! cost no more than the chunks they share; keeping every reference with
//! its VM, backup and disk names cost about 150 bytes *per reference*
//! (gigabytes for a repository of large disks). Where a damaged chunk is
//! used is found by a second walk, only when something is damaged.
//!
//! Damage (a chunk that fails its checks, or is missing) is told apart
//! from a chunk the store did not answer for (an I/O error: an outage is
//! not damage, and must never be repaired). `verify --repair` ([`repair`])
//! sets damaged chunk objects aside under `quarantine/`, holding the gc
//! lock (no backup runs meanwhile): a stored chunk is never read again by
//! a backup that deduplicates onto it, so a damaged one would otherwise be
//! reused by every later backup. With it gone, the next backup that reads
//! those bytes stores the chunk again, and every backup naming it reads
//! again (content addressing).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::locks::GcLock;
use super::{limits, Digest, Repository};
use crate::error::{ErrorKind, Result};

/// Uses of one damaged chunk named in its line; the rest are counted.
const PLACES_NAMED: usize = 5;

/// What `verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Manifests and catalogs read.
    pub backups: u64,
    /// Distinct chunks read and checked.
    pub chunks: u64,
    /// One line per damaged manifest, catalog or chunk, sorted.
    pub damaged: Vec<String>,
    /// Damaged chunks, with their plain length: what [`repair`] sets
    /// aside (those still stored).
    pub corrupt: Vec<(Digest, usize)>,
    /// One line for the chunks the store did not answer for (I/O errors):
    /// not checked, not damage.
    pub unreadable: Option<String>,
    /// Chunks read and checked (good or damaged): all of `chunks` unless
    /// the store stopped answering.
    pub checked: u64,
    /// Set when the chunk check stopped asking a store that stopped
    /// answering: later steps that need the store are not started.
    pub stopped: Option<Stopped>,
    /// One line per later step not done, or failed because the store
    /// did not answer ([`VerifyReport::then`]): not damage.
    pub not_done: Vec<String>,
}

impl VerifyReport {
    /// A later step of `verify` that needs the store (`what`, for its
    /// line): its damage lines are added; not started once the chunk check
    /// stopped for a store that stopped answering, and a failure of the
    /// store is one more line, after the chunk tally (explore9 M3: the
    /// profile check's error replaced the whole report). Damage found
    /// before is never lost to a later step's error.
    pub fn then(&mut self, what: &str, step: impl FnOnce() -> Result<Vec<String>>) {
        if self.stopped.is_some() {
            self.not_done.push(format!(
                "NOT CHECKED: {what}: verify stopped asking the store (see UNREADABLE above)"
            ));
            return;
        }
        match step() {
            Ok(lines) => {
                self.damaged.extend(lines);
                self.damaged.sort();
            }
            Err(e) => self
                .not_done
                .push(format!("NOT CHECKED: {what} could not be read: {e}")),
        }
    }
}

/// Chunk reads in a row the store does not answer (each already retried
/// by the backend) after which `verify` stops asking: the store is down,
/// and asking for every remaining chunk would take hours to say so.
const UNANSWERED_IN_A_ROW: usize = 8;

/// A read unanswered after at least this long, while the store answered
/// no read of any thread for at least half as long, also stops `verify`:
/// every thread's read is hanging, and waiting for
/// [`UNANSWERED_IN_A_ROW`] of them, a deadline (60 s on S3) per thread
/// each, cost minutes to say the store had stopped (explore9 M3). Only a
/// read that ended at its deadline with no answer counts
/// ([`crate::error::Error::is_unanswered`]): any other failure, however long it took
/// (one object's errors until its retries ran out, over a slow link whose
/// every read takes seconds), is that chunk's, and the rest are still
/// read (review28 M2).
const SILENT_FOR: Duration = Duration::from_secs(1);

/// Why the chunk check stopped before reading every chunk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stopped {
    /// [`UNANSWERED_IN_A_ROW`] reads in a row went unanswered.
    InARow,
    /// A read went unanswered for this long, and no read was answered
    /// for at least half of it.
    Silent(Duration),
}

/// Where a chunk is used.
struct Place<'a> {
    vm: &'a str,
    backup: &'a str,
    /// A disk name, or a file backup's guest path (any bytes).
    disk: &'a str,
    block: u64,
}

/// Reads and checks every chunk of `backup` (or of every backup) of each
/// VM in `vms`, each distinct chunk once, on `threads` threads.
pub fn verify(
    repo: &Repository,
    vms: &[String],
    backup: Option<&str>,
    threads: usize,
) -> Result<VerifyReport> {
    let mut damaged = vec![];
    let mut lens: HashMap<Digest, usize> = HashMap::new();
    let backups = walk(repo, vms, backup, Walk::First, &mut damaged, |d, len, _| {
        lens.entry(*d).or_insert(len);
    })?;
    let (failed, checked, not_read, stopped) = check_chunks(repo, &lens, threads.max(1));
    let (bad, unread): (HashMap<_, _>, HashMap<_, _>) = failed
        .into_iter()
        .partition(|(_, (kind, _))| is_damage(*kind));
    let corrupt = bad.keys().map(|d| (*d, lens[d])).collect();
    let chunks = lens.len() as u64;
    drop(lens);
    if !bad.is_empty() {
        let bad = bad.into_iter().map(|(d, (_, why))| (d, why)).collect();
        damaged.extend(name_places(repo, vms, backup, bad));
    }
    damaged.sort();
    Ok(VerifyReport {
        backups,
        chunks,
        damaged,
        corrupt,
        unreadable: unreadable_line(unread, not_read, stopped),
        checked,
        // Kept when it stopped at the last read too: later steps must not
        // ask a store that just went silent (review28 M2).
        stopped,
        not_done: vec![],
    })
}

/// Whether a chunk read's error says the chunk is damaged (fails its
/// checks, or is missing from a repository that answers as itself: both
/// `Corrupt`), not that the store could not be read.
fn is_damage(kind: ErrorKind) -> bool {
    kind == ErrorKind::Corrupt
}

/// One line for every chunk the store did not answer for: how many, and
/// the first few with why.
fn unreadable_line(
    unread: HashMap<Digest, (ErrorKind, String)>,
    not_read: u64,
    why: Option<Stopped>,
) -> Option<String> {
    if unread.is_empty() && not_read == 0 {
        return None;
    }
    let after = match why {
        Some(Stopped::Silent(d)) => format!(
            "a chunk read went unanswered for {} s while the store answered nothing else",
            d.as_secs()
        ),
        _ => format!("{UNANSWERED_IN_A_ROW} chunks in a row could not be read"),
    };
    let stopped = match not_read {
        0 => String::new(),
        n => format!(
            "; verify stopped asking after {after} (the first above says why): {n} more chunk(s) not read"
        ),
    };
    let mut named: Vec<String> = unread
        .iter()
        .map(|(d, (_, why))| format!("{d} ({why})"))
        .collect();
    named.sort();
    let more = named.len().saturating_sub(PLACES_NAMED);
    named.truncate(PLACES_NAMED);
    Some(format!(
        "UNREADABLE: {} chunk(s) could not be read, so they were not checked (not damage: the store did not answer): {}{}{stopped}; run verify again once the store answers",
        unread.len(),
        named.join(", "),
        if more > 0 { format!(" and {more} more") } else { String::new() }
    ))
}

/// What `verify --repair` did: one line per chunk, and how many it set
/// aside or recorded (a chunk that reads well now is left in place).
#[derive(Debug, Default)]
pub struct Repaired {
    pub lines: Vec<String>,
    pub set_aside: usize,
}

/// `verify --repair`: sets each chunk of `corrupt` aside (copied to
/// `quarantine/<id>`, then removed) if it still fails its checks, holding
/// the gc lock (waiting at most `wait` for running backups).
pub fn repair(
    repo: &Arc<Repository>,
    corrupt: &[(Digest, usize)],
    wait: Duration,
) -> Result<Repaired> {
    let lock = GcLock::acquire_for(repo, wait, "verify --repair")?;
    let mut out = Repaired::default();
    for (d, len) in corrupt {
        let _held = lock.hold()?;
        let key = d.key();
        // One read, checked: the bytes set aside are the bytes that fail
        // (a first read damaged on the way must not cost a good chunk).
        // A missing one is damage only where the repository answers as
        // itself (`open_chunk`), never an unmounted share.
        let raw = repo.backend().get(&key, limits::max_chunk_object(*len))?;
        let got = Ok(raw.clone().map(super::backend::ObjectBuf::from));
        match repo.open_chunk(d, got, *len, &"repair") {
            Ok(_) => {
                out.lines
                    .push(format!("chunk {d} reads well now: left in place"));
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Corrupt => {}
            Err(e) => return Err(e),
        }
        let aside = format!("{}/{}", super::QUARANTINE, d.to_hex());
        match raw {
            // Recorded (empty), so no incremental backup names it again
            // until it is stored again; never over a copy an earlier
            // repair set aside (explore5 M1).
            None => {
                if repo.backend().put_new(&aside, b"")? {
                    out.lines
                        .push(format!("REPAIRED chunk {d}: missing, recorded as {aside}"));
                    out.set_aside += 1;
                }
            }
            Some(raw) => {
                repo.backend().put(&aside, &raw)?;
                repo.backend().delete(&key)?;
                tracing::warn!(chunk = %key, "a damaged chunk was set aside as {aside}");
                out.lines
                    .push(format!("REPAIRED chunk {d}: set aside as {aside}"));
                out.set_aside += 1;
            }
        }
    }
    Ok(out)
}

/// Which walk: the first decides what is read; the second only names
/// where damaged chunks are used.
#[derive(Clone, Copy, PartialEq)]
enum Walk {
    First,
    /// A backup forgotten or damaged since the first walk is passed over:
    /// the damage found must still be reported.
    Again,
}

/// Calls `each` with every chunk reference of the chosen backups; a
/// manifest or catalog that cannot be decoded is a line in `damaged`.
/// Returns the number of backups read.
fn walk(
    repo: &Repository,
    vms: &[String],
    backup: Option<&str>,
    which: Walk,
    damaged: &mut Vec<String>,
    mut each: impl FnMut(&Digest, usize, Place<'_>),
) -> Result<u64> {
    let mut backups = 0;
    for v in vms {
        let (ids, catalogs) = match backup {
            Some(b) if super::catalog::is_catalog_id(b) => (vec![], vec![b.to_string()]),
            Some(b) => (vec![b.to_string()], vec![]),
            None => (repo.backup_ids(v)?, repo.catalog_ids(v)?),
        };
        for id in catalogs {
            let Some(c) = readable(repo.catalog(v, &id), which, damaged, "catalog", v, &id)? else {
                continue;
            };
            backups += 1;
            for e in &c.entries {
                let mut i = 0u64;
                for ch in &e.chunks {
                    let place = Place {
                        vm: v,
                        backup: &id,
                        disk: &e.path,
                        block: i,
                    };
                    each(&ch.digest, ch.len as usize, place);
                    i += ch.repeat;
                }
            }
        }
        for id in ids {
            let Some(m) = readable(repo.manifest(v, &id), which, damaged, "manifest", v, &id)?
            else {
                continue;
            };
            backups += 1;
            for d in &m.disks {
                for (i, c) in d.chunks.iter_present() {
                    let place = Place {
                        vm: v,
                        backup: &id,
                        disk: &d.name,
                        block: i,
                    };
                    each(&c, d.chunk_len(i), place);
                }
            }
        }
    }
    Ok(backups)
}

/// Chunks whose read failed, each with why.
type Failed = HashMap<Digest, (ErrorKind, String)>;

/// Reads every chunk of `lens` until [`UNANSWERED_IN_A_ROW`] reads in a
/// row go unanswered, or one goes unanswered in a silence (see
/// [`SILENT_FOR`]); returns the chunks that failed, each with why, how
/// many were checked, how many were not read, and why it stopped.
fn check_chunks(
    repo: &Repository,
    lens: &HashMap<Digest, usize>,
    threads: usize,
) -> (Failed, u64, u64, Option<Stopped>) {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    // Threads take the next chunk from one shared iterator: no second
    // list of the chunks.
    let work = Mutex::new(lens.iter());
    let bad = Mutex::new(HashMap::new());
    let (unanswered, checked, asked) = (AtomicUsize::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let stopped = Mutex::new(None);
    // When the store last answered a read, in ns after `t0`.
    let t0 = std::time::Instant::now();
    let last_answer = AtomicU64::new(0);
    let ns = |t: std::time::Instant| t.duration_since(t0).as_nanos() as u64;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                if stopped.lock().expect("lock").is_some() {
                    break;
                }
                let Some((d, len)) = work.lock().expect("lock").next() else {
                    break;
                };
                asked.fetch_add(1, Ordering::Relaxed);
                let start = std::time::Instant::now();
                let r = repo.read_chunk(d, *len, &"verify");
                let end = std::time::Instant::now();
                match &r {
                    Err(e) if !is_damage(e.kind()) => {
                        let took = end - start;
                        let silence = ns(end).saturating_sub(last_answer.load(Ordering::Acquire));
                        let silent = e.is_unanswered()
                            && took >= SILENT_FOR
                            && silence >= (took / 2).as_nanos() as u64;
                        let why = if silent {
                            Some(Stopped::Silent(took))
                        } else if unanswered.fetch_add(1, Ordering::AcqRel) + 1
                            >= UNANSWERED_IN_A_ROW
                        {
                            Some(Stopped::InARow)
                        } else {
                            None
                        };
                        if let Some(why) = why {
                            stopped.lock().expect("lock").get_or_insert(why);
                        }
                    }
                    _ => {
                        unanswered.store(0, Ordering::Release);
                        last_answer.fetch_max(ns(end), Ordering::AcqRel);
                        checked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Err(e) = r {
                    // Its own id is the line's: say only why.
                    let why = e
                        .to_string()
                        .replace(&format!("verify: chunk {d} "), "")
                        .replace(&format!("chunk {d} of verify: "), "")
                        .replace(&format!("chunk {d} of verify "), "");
                    bad.lock().expect("lock").insert(*d, (e.kind(), why));
                }
            });
        }
    });
    let not_read = lens.len() as u64 - asked.into_inner();
    (
        bad.into_inner().expect("lock"),
        checked.into_inner(),
        not_read,
        stopped.into_inner().expect("lock"),
    )
}

/// One line per damaged chunk: why, and the first places that use it.
/// Never fails: the damage found is reported even if the manifests can no
/// longer be read.
fn name_places(
    repo: &Repository,
    vms: &[String],
    backup: Option<&str>,
    bad: HashMap<Digest, String>,
) -> Vec<String> {
    let mut uses: HashMap<Digest, (Vec<String>, u64)> = HashMap::new();
    // Damaged manifests were named by the first walk.
    let mut again = vec![];
    let walked = walk(repo, vms, backup, Walk::Again, &mut again, |d, _, p| {
        if !bad.contains_key(d) {
            return;
        }
        let (named, count) = uses.entry(*d).or_default();
        *count += 1;
        if named.len() < PLACES_NAMED {
            let disk = crate::util::escape_controls(p.disk);
            named.push(format!("{}/{} {disk} block {}", p.vm, p.backup, p.block));
        }
    });
    let mut lines = vec![];
    for (d, why) in &bad {
        let (named, count) = uses.remove(d).unwrap_or_default();
        let more = match count.saturating_sub(named.len() as u64) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        let used = match (&walked, named.is_empty()) {
            (Err(e), _) => format!("where it is used could not be read again: {e}"),
            (Ok(_), true) => "used by no backup still listed (forgotten while verify ran)".into(),
            (Ok(_), false) => format!("used by {}{more}", named.join(", ")),
        };
        lines.push(format!("DAMAGED chunk {d} ({why}) {used}"));
    }
    lines
}

/// A backup's document, or `None` to pass it over: gone since the first
/// walk (the second only names places), or damaged (named in `damaged`).
fn readable<T>(
    r: Result<T>,
    which: Walk,
    damaged: &mut Vec<String>,
    what: &str,
    vm: &str,
    id: &str,
) -> Result<Option<T>> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(_) if which == Walk::Again => Ok(None),
        Err(e) if e.kind() == ErrorKind::Corrupt => {
            damaged.push(format!("DAMAGED {what} {vm}/{id}: {e}"));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::forget::tests::backup_at;

    /// 2026-10-18T00:00:00Z.
    const DAY0: u64 = 1_792_281_600;

    use crate::repo::testing::{Knobs, TestBackend};

    /// A local repository whose chunk reads are counted.
    fn repo() -> (tempfile::TempDir, std::sync::Arc<Repository>, Knobs) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("r");
        Repository::open_or_create(path.to_str().unwrap()).unwrap();
        let knobs = Knobs::default();
        let backend = TestBackend::new(&path, knobs.clone());
        let repo = Repository::open_backend(Box::new(backend)).unwrap();
        (d, repo, knobs)
    }

    #[test]
    fn each_shared_chunk_is_read_once_however_many_backups_use_it() {
        let (_d, repo, knobs) = repo();
        // Chunk 0 is the VM's in every backup, chunk 2 the week's.
        let mut refs = 0;
        let mut distinct = std::collections::HashSet::new();
        for day in 0..10 {
            let m = backup_at(&repo, "web", DAY0 + day * 86_400);
            for (_, c) in m.disks[0].chunks.iter_present() {
                refs += 1;
                distinct.insert(c);
            }
        }
        assert!(distinct.len() * 2 < refs, "the backups share chunks");
        let before = knobs.chunk_reads();
        let r = verify(&repo, &["web".into()], None, 2).unwrap();
        assert!(r.damaged.is_empty(), "{:?}", r.damaged);
        assert_eq!(r.backups, 10);
        assert_eq!(r.chunks, distinct.len() as u64);
        assert_eq!(knobs.chunk_reads() - before, r.chunks);
    }

    #[test]
    fn a_damaged_chunk_is_named_with_its_first_places_and_a_count_of_the_rest() {
        let (d, repo, _) = repo();
        let mut shared = None;
        for day in 0..8 {
            let m = backup_at(&repo, "web", DAY0 + day * 86_400);
            shared = m.disks[0].chunks.get(0);
        }
        let shared = shared.expect("chunk 0 is data");
        let path = d.path().join("r").join(shared.key());
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let r = verify(&repo, &["web".into()], None, 2).unwrap();
        assert_eq!(r.damaged.len(), 1, "{:?}", r.damaged);
        let line = &r.damaged[0];
        assert!(
            line.starts_with(&format!("DAMAGED chunk {shared} (")),
            "{line}"
        );
        assert_eq!(
            line.matches(" disk0 block 0").count(),
            PLACES_NAMED,
            "{line}"
        );
        assert!(line.ends_with(" and 3 more"), "{line}");
    }

    #[test]
    fn a_backup_forgotten_while_verify_reads_still_leaves_every_damaged_chunk_reported() {
        let (d, repo, knobs) = repo();
        let old = backup_at(&repo, "web", DAY0);
        backup_at(&repo, "web", DAY0 + 86_400);
        // Chunk 0 is shared by both backups.
        let shared = old.disks[0].chunks.get(0).expect("chunk 0 is data");
        let path = d.path().join("r").join(shared.key());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        // `forget` removes the old backup after the second walk listed it,
        // just before that walk reads it.
        let file = d
            .path()
            .join("r/backups/web")
            .join(format!("{}.json", old.id));
        let key = format!("backups/web/{}.json", old.id);
        let k = knobs.clone();
        knobs.before_first(&shared.key(), move || {
            k.before_first(&key, move || std::fs::remove_file(file).unwrap())
        });
        let r = verify(&repo, &["web".into()], None, 2).unwrap();
        assert_eq!(r.damaged.len(), 1, "{:?}", r.damaged);
        let line = &r.damaged[0];
        assert!(
            line.starts_with(&format!("DAMAGED chunk {shared} (")),
            "{line}"
        );
        assert!(line.ends_with(" disk0 block 0"), "{line}");
        assert!(!line.contains(&old.id), "{line}");
    }

    #[test]
    fn a_missing_chunk_is_named_once_with_only_why() {
        let (d, repo, _) = repo();
        let m = backup_at(&repo, "web", DAY0);
        let gone = m.disks[0].chunks.get(0).expect("chunk 0 is data");
        std::fs::remove_file(d.path().join("r").join(gone.key())).unwrap();
        let r = verify(&repo, &["web".into()], None, 2).unwrap();
        let line = &r.damaged[0];
        assert!(
            line.starts_with(&format!(
                "DAMAGED chunk {gone} (is missing from the repository) used by web/"
            )),
            "{line}"
        );
    }

    /// review23 M2: a damaged chunk is set aside by `--repair`; the next
    /// backup that has its bytes stores it again (a dedup hit before
    /// would have reused the damaged object), and every backup naming it
    /// reads again.
    #[test]
    fn repair_sets_a_damaged_chunk_aside_so_storing_its_bytes_again_heals_every_backup_naming_it() {
        let (d, repo, _) = repo();
        let mut chunk = None;
        for day in 0..3 {
            let m = backup_at(&repo, "web", DAY0 + day * 86_400);
            chunk = m.disks[0].chunks.get(0);
        }
        let c = chunk.expect("chunk 0 is data");
        let len = 64 << 10;
        let (good, _) = repo.read_chunk(&c, len, &"test").unwrap();
        let path = d.path().join("r").join(c.key());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            repo.put_chunk(&c, &good).unwrap(),
            0,
            "a damaged chunk of a plausible size is reused by a backup"
        );
        let r = verify(&repo, &["web".into()], None, 2).unwrap();
        assert_eq!(r.corrupt, vec![(c, good.len())]);
        let done = repair(&repo, &r.corrupt, Duration::ZERO).unwrap();
        assert_eq!(done.set_aside, 1, "{done:?}");
        let aside = d.path().join("r/quarantine").join(c.to_hex());
        assert_eq!(
            std::fs::read(&aside).unwrap(),
            bytes,
            "the damaged object is kept aside"
        );
        assert!(!repo.has_chunk(&c).unwrap());
        // A second repair finds it missing: the copy set aside stays.
        let again = verify(&repo, &["web".into()], None, 2).unwrap();
        assert_eq!(again.corrupt.len(), 1);
        let done = repair(&repo, &again.corrupt, Duration::ZERO).unwrap();
        assert_eq!(done.set_aside, 0, "{done:?}");
        assert_eq!(
            std::fs::read(&aside).unwrap(),
            bytes,
            "a second repair emptied the copy"
        );
        assert!(
            repo.put_chunk(&c, &good).unwrap() > 0,
            "the next backup with these bytes does not store the chunk again"
        );
        let r = verify(&repo, &["web".into()], None, 2).unwrap();
        assert!(
            r.damaged.is_empty() && r.corrupt.is_empty(),
            "{:?}",
            r.damaged
        );
        assert_eq!(r.backups, 3);
        // A chunk that reads well when repair reads it is left in place,
        // and not counted as set aside.
        let done = repair(&repo, &[(c, good.len())], Duration::ZERO).unwrap();
        assert_eq!(done.set_aside, 0, "{done:?}");
        assert!(repo.has_chunk(&c).unwrap(), "repair removed a good chunk");
    }

    /// review23 L1: a store that does not answer is not damage, and
    /// nothing of it is offered for repair.
    #[test]
    fn chunks_the_store_does_not_answer_for_are_unreadable_not_damaged_and_never_repaired() {
        let (_d, repo, knobs) = repo();
        backup_at(&repo, "web", DAY0);
        knobs.unreachable("chunks/");
        let r = verify(&repo, &["web".into()], None, 2).unwrap();
        knobs.reachable();
        assert!(r.damaged.is_empty(), "{:?}", r.damaged);
        assert!(r.corrupt.is_empty());
        let line = r.unreadable.expect("reported");
        assert!(line.starts_with("UNREADABLE: "), "{line}");
        assert!(line.contains("not damage"), "{line}");
    }

    /// explore8 M1: a store that went away was asked for every chunk,
    /// each request retried: about 100 minutes to say it was down.
    #[test]
    fn verify_stops_asking_once_chunks_in_a_row_go_unanswered_and_counts_what_it_checked() {
        let (_d, repo, knobs) = repo();
        for day in 0..40 {
            backup_at(&repo, "web", DAY0 + day * 86_400);
        }
        let all = verify(&repo, &["web".into()], None, 2).unwrap();
        assert!(all.chunks > 3 * UNANSWERED_IN_A_ROW as u64, "{all:?}");
        assert_eq!(all.checked, all.chunks);
        knobs.unreachable("chunks/");
        let r = verify(&repo, &["web".into()], None, 2).unwrap();
        knobs.reachable();
        assert_eq!(r.checked, 0);
        let line = r.unreadable.expect("reported");
        let asked: u64 = line["UNREADABLE: ".len()..]
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a count");
        assert!(
            asked < UNANSWERED_IN_A_ROW as u64 + 2,
            "{asked} of {} chunks asked for: {line}",
            r.chunks
        );
        assert!(
            line.contains(&format!("{} more chunk(s) not read", r.chunks - asked)),
            "{line}"
        );
    }

    /// explore9 M3: a store that hangs (each read answered by nothing
    /// until its deadline) cost one deadline per thread per round until 8
    /// in a row, then the profile check's own deadline, whose error
    /// replaced the report. Now: about one deadline, the profile step is
    /// not started, and the report says so.
    #[test]
    fn a_store_that_hangs_costs_about_one_deadline_and_later_steps_are_not_started() {
        let d = tempfile::tempdir().unwrap();
        let deadline = Duration::from_millis(1500);
        let (repo, hang) = crate::repo::locks::tests::Hanging::repo(
            &d.path().join("r"),
            &["chunks/", "profiles/"],
            deadline,
        );
        for day in 0..40 {
            backup_at(&repo, "web", DAY0 + day * 86_400);
        }
        hang.store(true, std::sync::atomic::Ordering::SeqCst);
        let t = std::time::Instant::now();
        let mut r = verify(&repo, &["web".into()], None, 2).unwrap();
        let mut asked_profiles = false;
        r.then("operational profiles", || {
            asked_profiles = true;
            crate::prefetch::profile::vms(&repo)?;
            Ok(vec![])
        });
        let took = t.elapsed();
        hang.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(
            took < deadline * 2,
            "{took:?} for a store that hangs {deadline:?} a request: {r:?}"
        );
        assert!(!asked_profiles, "the profile step asked a silent store");
        assert!(matches!(r.stopped, Some(Stopped::Silent(_))), "{r:?}");
        let line = r.unreadable.as_deref().expect("reported");
        assert!(line.contains("more chunk(s) not read"), "{line}");
        assert!(line.contains("answered nothing else"), "{line}");
        assert_eq!(r.not_done.len(), 1, "{:?}", r.not_done);
        assert!(r.not_done[0].starts_with("NOT CHECKED: operational profiles"));
    }

    /// A later step that fails for the store is one line; the damage
    /// found before it is kept.
    #[test]
    fn a_later_step_the_store_fails_is_a_line_and_keeps_the_damage_found() {
        let (d, repo, _) = repo();
        let m = backup_at(&repo, "web", DAY0);
        let gone = m.disks[0].chunks.get(0).expect("chunk 0 is data");
        std::fs::remove_file(d.path().join("r").join(gone.key())).unwrap();
        let mut r = verify(&repo, &["web".into()], None, 2).unwrap();
        assert_eq!(r.stopped, None);
        r.then("operational profiles", || {
            Err(crate::error::Error::new(ErrorKind::Io, "no answer in 60 s"))
        });
        assert_eq!(r.damaged.len(), 1, "{:?}", r.damaged);
        assert_eq!(
            r.not_done,
            vec!["NOT CHECKED: operational profiles could not be read: no answer in 60 s"]
        );
    }
}

#[cfg(test)]
mod slow_link_tests;
