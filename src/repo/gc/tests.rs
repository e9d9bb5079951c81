use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::prefetch::profile::{self, Access, DiskTrace, ProfileDoc, Recording};
use crate::repo::forget::tests::backup_at;
use crate::repo::forget::{forget, ForgetOptions};
use crate::repo::retention::Policy;

const DAY: u64 = 86_400;
const T0: u64 = 1_792_281_600;

fn referrers() -> [Referrer; 2] {
    [MANIFESTS, profile::REFERRER]
}

fn opts(dry_run: bool) -> GcOptions {
    GcOptions {
        dry_run,
        wait: Duration::from_secs(60),
    }
}

fn new_repo(d: &tempfile::TempDir) -> Arc<Repository> {
    Repository::open_or_create(d.path().join("r").to_str().unwrap())
        .unwrap()
        .0
}

fn keep_last(repo: &Arc<Repository>, n: u32) {
    forget(
        repo,
        &ForgetOptions {
            vm: None,
            policy: Policy {
                last: n,
                ..Default::default()
            },
            dry_run: false,
            force: false,
        },
    )
    .unwrap();
}

fn chunk_keys(repo: &Repository) -> HashSet<String> {
    let all = repo.backend().list_all("chunks").unwrap();
    all.into_iter().map(|o| o.key).collect()
}

#[test]
fn a_dry_run_removes_nothing_and_a_profiles_chunks_stay() {
    let d = tempfile::tempdir().unwrap();
    let repo = new_repo(&d);
    let old = backup_at(&repo, "vm", T0);
    backup_at(&repo, "vm", T0 + 30 * DAY);
    // The profile recorded a boot of the old backup: its day chunk.
    let day_chunk = old.disks[0].chunks.get(1).unwrap();
    let mut doc = ProfileDoc::new("vm");
    doc.push(Recording {
        recorded: "2026-10-18T00:00:00Z".into(),
        backup: old.id.clone(),
        source: "session".into(),
        disks: vec![DiskTrace {
            index: 0,
            block_size: 65536,
            accesses: vec![Access(1, 5, Some(day_chunk))],
        }],
    });
    profile::store(&repo, &doc).unwrap();
    keep_last(&repo, 1);
    let before = chunk_keys(&repo);
    let dry = collect(&repo, &referrers(), opts(true)).unwrap();
    assert_eq!(chunk_keys(&repo), before, "a dry run removes nothing");
    // The old backup's week chunk is unreferenced; its day chunk is the
    // profile's.
    assert_eq!(dry.removed_chunks, 1, "{dry:?}");
    assert_eq!(dry.referrers["profiles"], 1);
    assert_eq!(dry.referrers["backups"], 1);
    let real = collect(&repo, &referrers(), opts(false)).unwrap();
    assert_eq!(
        (real.removed_chunks, real.freed_bytes),
        (1, dry.freed_bytes)
    );
    assert!(repo.has_chunk(&day_chunk).unwrap());
    assert!(!repo
        .has_chunk(&old.disks[0].chunks.get(2).unwrap())
        .unwrap());
    assert_eq!(chunk_keys(&repo).len(), before.len() - 1);
}

#[test]
fn a_damaged_manifest_stops_gc_before_anything_is_removed() {
    let d = tempfile::tempdir().unwrap();
    let repo = new_repo(&d);
    let a = backup_at(&repo, "vm", T0);
    backup_at(&repo, "vm", T0 + 10 * DAY);
    keep_last(&repo, 1);
    let b = backup_at(&repo, "other", T0);
    let key = format!("backups/other/{}.json", b.id);
    let mut bytes = repo.backend().get(&key, 1 << 30).unwrap().unwrap();
    let n = bytes.len() / 2;
    bytes[n] ^= 0x20;
    repo.backend().put(&key, &bytes).unwrap();
    let before = chunk_keys(&repo);
    let e = collect(&repo, &referrers(), opts(false)).unwrap_err();
    assert!(e.to_string().contains(&key), "names the object: {e}");
    assert!(e.to_string().contains("before removing anything"), "{e}");
    assert_eq!(chunk_keys(&repo), before);
    assert!(repo.has_chunk(&a.disks[0].chunks.get(2).unwrap()).unwrap());
}

/// explore4 M3: a damaged manifest a recovery session uses is not to be
/// deleted by hand; gc names the session's own copy instead.
#[test]
fn a_damaged_manifest_a_session_uses_is_not_advised_deleted_and_its_copy_is_named() {
    let d = tempfile::tempdir().unwrap();
    let repo = new_repo(&d);
    let b = backup_at(&repo, "vm", T0);
    let base = backup_at(&repo, "vm", T0 + DAY);
    let session = std::path::Path::new("/staging/sessions/vm").join(&b.id);
    // Recovered from `b`, its live backups based on `base`.
    let pin =
        crate::repo::pins::Pin::new("vm", vec![b.id.clone(), base.id.clone()], &session, true);
    crate::repo::pins::put(&repo, &pin).unwrap();
    let key = format!("backups/vm/{}.json", b.id);
    let good = repo.backend().get(&key, 1 << 30).unwrap().unwrap();
    repo.backend().put(&key, b"{").unwrap();
    let e = collect(&repo, &referrers(), opts(false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not delete it"), "{e}");
    assert!(!e.contains("delete the object by hand"), "{e}");
    assert!(
        e.contains(&format!("{}/manifest.json", session.display())),
        "{e}"
    );
    repo.backend().put(&key, &good).unwrap();
    let bkey = format!("backups/vm/{}.json", base.id);
    repo.backend().put(&bkey, b"{").unwrap();
    let e = collect(&repo, &referrers(), opts(false))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the base of a recovery session's live backups"),
        "{e}"
    );
}

#[test]
fn objects_under_chunks_that_are_not_chunks_are_left_alone() {
    let d = tempfile::tempdir().unwrap();
    let repo = new_repo(&d);
    backup_at(&repo, "vm", T0);
    repo.backend().put("chunks/abcd/not-a-chunk", b"x").unwrap();
    let r = collect(&repo, &referrers(), opts(false)).unwrap();
    assert_eq!((r.removed_chunks, r.foreign_objects), (0, 1));
    assert!(repo.backend().exists("chunks/abcd/not-a-chunk").unwrap());
}

/// Writers in threads back up (reusing chunks of older backups) while
/// collectors forget and collect, again and again: no manifest ever
/// names a missing chunk.
#[test]
fn gc_racing_backups_in_threads_never_removes_a_chunk_a_manifest_needs() {
    let d = tempfile::tempdir().unwrap();
    let repo = new_repo(&d);
    backup_at(&repo, "vm", T0);
    let stop = Arc::new(AtomicBool::new(false));
    let removed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (repo, stop, done) = (repo.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                let mut day = 1;
                while !stop.load(Ordering::SeqCst) {
                    backup_at(&repo, "vm", T0 + (day * 2 + w) * DAY);
                    done.fetch_add(1, Ordering::SeqCst);
                    day += 1;
                }
            })
        })
        .collect();
    for _ in 0..30 {
        // gc back to back would hold the writers off all along: let one
        // more backup finish first.
        let seen = done.load(Ordering::SeqCst);
        while done.load(Ordering::SeqCst) == seen {
            std::thread::sleep(Duration::from_millis(10));
        }
        keep_last(&repo, 1);
        let r = collect(&repo, &referrers(), opts(false)).unwrap();
        removed.fetch_add(r.removed_chunks, Ordering::SeqCst);
        for id in repo.backup_ids("vm").unwrap() {
            let Ok(m) = repo.manifest("vm", &id) else {
                continue; // forgotten meanwhile
            };
            for c in m.disks[0].chunks.digests() {
                assert!(repo.has_chunk(c).unwrap(), "{id} lost chunk {c}");
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        removed.load(Ordering::SeqCst) > 0,
        "the collections removed something"
    );
}

/// explore8 LOW: a gc cut short by an outage ended in the store's error
/// alone, without saying whether running it again was safe.
#[test]
fn a_gc_stopped_by_an_outage_says_how_far_it_got_and_to_run_again() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("r");
    Repository::open_or_create(path.to_str().unwrap()).unwrap();
    let knobs = crate::repo::testing::Knobs::default();
    let backend = crate::repo::testing::TestBackend::new(&path, knobs.clone());
    let repo = Repository::open_backend(Box::new(backend)).unwrap();
    for i in 0u32..1_500 {
        let data = [&i.to_le_bytes()[..], &[9u8; 60]].concat();
        repo.put_chunk(&repo.chunk_id(&data), &data).unwrap();
    }
    // The store goes away once gc holds its lock, before it deletes.
    let k = knobs.clone();
    knobs.before_first("locks/gc-", move || k.unreachable("chunks/"));
    let e = collect(&repo, &referrers(), opts(false)).unwrap_err();
    knobs.reachable();
    let msg = e.to_string();
    assert!(
        msg.starts_with("gc stopped part way: 0 of 1500 unreferenced chunks removed before this batch (nothing referenced was touched); run gc again: "),
        "{msg}"
    );
    let r = collect(&repo, &referrers(), opts(false)).unwrap();
    assert_eq!(r.removed_chunks, 1_500);
}
