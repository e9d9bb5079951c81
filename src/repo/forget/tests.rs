//! Forget and gc over 30 simulated days of backups of three VMs.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::repo::gc::{collect, GcOptions, MANIFESTS};
use crate::repo::locks::WriterLock;
use crate::repo::manifest::DiskManifest;
use crate::repo::writer::{publish_manifest_at, store_chunks};
use crate::repo::{Digest, Manifest};

const K64: u64 = 64 << 10;
const DAY: u64 = 86_400;
/// 2026-10-18T00:00:00Z, a Sunday: day 0 of the simulation.
const DAY0: u64 = 1_792_281_600;

/// A backup of `vm` taken at `unix`: chunk 0 is the VM's (every backup
/// shares it), chunk 1 the day's, chunk 2 the ISO week's, chunk 3 zeros.
pub(crate) fn backup_at(repo: &Arc<Repository>, vm: &str, unix: u64) -> Manifest {
    let day = unix / DAY;
    let week = (unix + 3 * DAY) / (7 * DAY);
    let fill = |seed: String| -> Vec<u8> {
        let h = blake3::hash(seed.as_bytes());
        h.as_bytes()
            .iter()
            .cycle()
            .take(K64 as usize)
            .copied()
            .collect()
    };
    let blocks = [
        fill(vm.to_string()),
        fill(format!("{vm}-day-{day}")),
        fill(format!("{vm}-week-{week}")),
        vec![0; K64 as usize],
    ];
    let lock = WriterLock::acquire(repo, vm).unwrap();
    let read = |i: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&blocks[i as usize]);
        Ok(())
    };
    let st = store_chunks(repo, 4 * K64, K64 as u32, 0..4, &read, &|_| {}).unwrap();
    let disk = DiskManifest {
        name: "disk0".into(),
        size: 4 * K64,
        chunk_size: K64 as u32,
        chunks: st.chunks.iter().map(|c| c.1).collect(),
        stored_bytes: st.sizes.values().sum(),
        new_bytes: st.new_bytes,
    };
    let at = UNIX_EPOCH + Duration::from_secs(unix);
    publish_manifest_at(repo, &lock, vm, serde_json::json!({}), vec![disk], at).unwrap()
}

fn referenced(repo: &Repository) -> HashSet<Digest> {
    let mut out = HashSet::new();
    for vm in repo.vms().unwrap() {
        for id in repo.backup_ids(&vm).unwrap() {
            let m = repo.manifest(&vm, &id).unwrap();
            out.extend(m.disks.iter().flat_map(|d| d.chunks.digests().copied()));
        }
    }
    out
}

fn stored_chunks(repo: &Repository) -> HashSet<Digest> {
    repo.backend()
        .list_all("chunks")
        .unwrap()
        .iter()
        .map(|o| Digest::from_hex(o.key.rsplit('/').next().unwrap()).unwrap())
        .collect()
}

/// Reads back every chunk of every backup, verified (what `verify` does).
fn verify_all(repo: &Repository) {
    for vm in repo.vms().unwrap() {
        for id in repo.backup_ids(&vm).unwrap() {
            let m = repo.manifest(&vm, &id).unwrap();
            for d in &m.disks {
                for (i, c) in d.chunks.iter_present() {
                    repo.read_chunk(&c, d.chunk_len(i), &format!("{vm}/{id}"))
                        .unwrap();
                }
            }
        }
    }
}

#[test]
fn thirty_days_of_three_vms_keep_the_readme_policy_table_and_gc_removes_only_unreferenced_chunks() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
    // One backup a day for 30 days (Oct 18 .. Nov 16, 2026), each VM at
    // its own hour.
    let vms = [("web", 2), ("db", 14), ("mail", 23)];
    for day in 0..30 {
        for (vm, hour) in vms {
            backup_at(&repo, vm, DAY0 + day * DAY + hour * 3600);
        }
    }
    let before = stored_chunks(&repo);
    // The README's policy table.
    let policy = Policy {
        last: 3,
        daily: 4,
        weekly: 2,
        monthly: 2,
        ..Default::default()
    };
    let opts = ForgetOptions {
        vm: None,
        policy,
        dry_run: true,
        force: false,
    };
    let dry = forget(&repo, &opts).unwrap();
    assert_eq!((dry.kept, dry.removed), (30, 60));
    assert_eq!(
        repo.backup_ids("web").unwrap().len(),
        30,
        "dry run removed nothing"
    );

    let r = forget(
        &repo,
        &ForgetOptions {
            dry_run: false,
            ..opts
        },
    )
    .unwrap();
    assert_eq!((r.kept, r.removed), (30, 60));
    // (day of the simulation, rule), newest first, as the README's table says.
    let table: [(u64, &str); 10] = [
        (29, "keep-last 1 of 3"),      // Nov 16
        (28, "keep-last 2 of 3"),      // Nov 15
        (27, "keep-last 3 of 3"),      // Nov 14
        (26, "keep-daily 2026-11-13"), // the days not covered by keep-last
        (25, "keep-daily 2026-11-12"),
        (24, "keep-daily 2026-11-11"),
        (23, "keep-daily 2026-11-10"),
        (21, "keep-weekly 2026-W45"), // Sun Nov 8: W46 and W47 are covered
        (14, "keep-weekly 2026-W44"), // Sun Nov 1
        // Sun Oct 25: November is covered, and Oct 26-31 were already
        // removed as superseded in W44 (later rules see only older ones).
        (7, "keep-monthly 2026-10"),
    ];
    for (v, (vm, hour)) in r.vms.iter().zip([("db", 14), ("mail", 23), ("web", 2)]) {
        assert_eq!(v.vm, vm);
        let kept: Vec<(u64, &str)> = v
            .backups
            .iter()
            .filter(|b| b.keep)
            .map(|b| {
                let m = repo.manifest(vm, &b.id).unwrap();
                assert_eq!(m.created_unix % DAY, hour * 3600);
                ((m.created_unix - DAY0) / DAY, b.reason.as_str())
            })
            .collect();
        assert_eq!(kept.len(), table.len(), "{vm}: {kept:?}");
        for ((day, reason), (want_day, want)) in kept.iter().zip(table) {
            assert_eq!(*day, want_day, "{vm}: {kept:?}");
            assert!(
                reason.starts_with(want),
                "{vm} day {day}: {reason} (want {want})"
            );
        }
        assert_eq!(repo.backup_ids(vm).unwrap().len(), 10);
    }

    // gc removes exactly the chunks no remaining manifest references.
    let live = referenced(&repo);
    let g = collect(
        &repo,
        &[MANIFESTS],
        GcOptions {
            dry_run: false,
            wait: Duration::ZERO,
        },
    )
    .unwrap();
    let after = stored_chunks(&repo);
    assert_eq!(after, live, "every referenced chunk stays, nothing else");
    let removed: HashSet<_> = before.difference(&after).collect();
    assert_eq!(removed.len() as u64, g.removed_chunks);
    assert!(removed.iter().all(|c| !live.contains(c)));
    // 3 VMs x 20 forgotten days; their week chunks are shared with kept
    // days except for the weeks nothing kept (W43 and W42's remainder).
    assert!(g.removed_chunks >= 60, "{g:?}");
    assert!(g.freed_bytes > 0);
    verify_all(&repo);
    // A second collection finds nothing.
    let g2 = collect(
        &repo,
        &[MANIFESTS],
        GcOptions {
            dry_run: false,
            wait: Duration::ZERO,
        },
    )
    .unwrap();
    assert_eq!(g2.removed_chunks, 0);
}

#[test]
fn a_backup_a_session_pins_is_kept_unless_forced() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
    let old = backup_at(&repo, "vm", DAY0);
    let new = backup_at(&repo, "vm", DAY0 + DAY);
    let pin = crate::repo::pins::Pin::new("vm", vec![old.id.clone()], d.path(), true);
    crate::repo::pins::put(&repo, &pin).unwrap();
    let mut opts = ForgetOptions {
        vm: Some("vm".into()),
        policy: Policy {
            last: 1,
            ..Default::default()
        },
        dry_run: false,
        force: false,
    };
    let r = forget(&repo, &opts).unwrap();
    assert_eq!(r.removed, 0);
    let b = &r.vms[0].backups[1];
    assert!(
        b.keep && b.reason.contains("used by a live recovery session"),
        "{b:?}"
    );
    opts.force = true;
    let r = forget(&repo, &opts).unwrap();
    assert_eq!(r.removed, 1);
    assert!(!r.vms[0].backups[1].forced_from.is_empty());
    assert_eq!(repo.backup_ids("vm").unwrap(), vec![new.id]);
}

#[test]
fn a_session_pinned_while_forget_decides_keeps_its_backup() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("r");
    let (plain, _) = Repository::open_or_create(path.to_str().unwrap()).unwrap();
    let knobs = crate::repo::testing::Knobs::default();
    let repo = Repository::open_backend(Box::new(crate::repo::testing::TestBackend::new(
        &path,
        knobs.clone(),
    )))
    .unwrap();
    let old = backup_at(&repo, "vm", DAY0);
    let new = backup_at(&repo, "vm", DAY0 + DAY);
    // forget has read the pins (none) and reads the manifests, minutes on
    // S3: meanwhile a daemon recovers from `old`. Its pin lands just
    // before forget reads old's manifest, and its check for the manifest
    // finds it, since nothing is deleted yet.
    let pin = crate::repo::pins::Pin::new("vm", vec![old.id.clone()], d.path(), true);
    knobs.before_first(&format!("backups/vm/{}.json", old.id), move || {
        crate::repo::pins::put(&plain, &pin).unwrap()
    });
    let opts = ForgetOptions {
        vm: Some("vm".into()),
        policy: Policy {
            last: 1,
            ..Default::default()
        },
        dry_run: false,
        force: false,
    };
    let r = forget(&repo, &opts).unwrap();
    assert_eq!(
        repo.backup_ids("vm").unwrap(),
        vec![old.id.clone(), new.id],
        "the session's backup is still there"
    );
    assert_eq!((r.removed, r.kept), (0, 2));
    let b = r.vms[0].backups.iter().find(|b| b.id == old.id).unwrap();
    assert!(
        b.keep && b.reason.contains("used by a live recovery session"),
        "{b:?}"
    );
    // Its chunks survive gc, and it reads back whole.
    collect(
        &repo,
        &[MANIFESTS],
        GcOptions {
            dry_run: false,
            wait: Duration::ZERO,
        },
    )
    .unwrap();
    verify_all(&repo);
}

/// A file backup of `vm` at `unix`: one file shared by every backup of
/// the VM, one of the day's own.
fn file_backup_at(repo: &Arc<Repository>, vm: &str, unix: u64) -> Catalog {
    use crate::repo::catalog::{Catalog, ChunkSink, Entry, EntryKind, CATALOG_FORMAT};
    let mut sink = ChunkSink::default();
    let mut entries = vec![];
    for (name, seed) in [("shared", vm.to_string()), ("day", format!("{vm}-{unix}"))] {
        let h = blake3::hash(seed.as_bytes());
        let data: Vec<u8> = h.as_bytes().iter().cycle().take(100_000).copied().collect();
        entries.push(Entry {
            path: format!("/srv/{name}"),
            kind: EntryKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: unix as i64,
            mtime_nsec: 0,
            size: data.len() as u64,
            target: None,
            chunks: sink.store(repo, &data[..]).unwrap(),
            inode: None,
        });
    }
    let c = Catalog {
        format: CATALOG_FORMAT,
        vm: vm.into(),
        id: String::new(),
        created: String::new(),
        created_unix: 0,
        source: serde_json::json!({}),
        file_bytes: sink.file_bytes,
        stored_bytes: sink.stored_bytes(),
        new_bytes: sink.new_bytes,
        entries,
    };
    repo.publish_catalog_at(c, UNIX_EPOCH + Duration::from_secs(unix))
        .unwrap()
}

use crate::repo::catalog::Catalog;

fn catalog_chunks(c: &Catalog) -> HashSet<Digest> {
    c.entries
        .iter()
        .flat_map(|e| e.chunks.iter().map(|c| c.digest))
        .collect()
}

#[test]
fn file_backups_are_their_own_series_forgotten_by_the_policy_and_gc_frees_their_chunks() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
    let repo = Arc::new(repo);
    // db: disk backups on days 0-1, file backups hourly on days 5-6;
    // notes: file backups only, days 0-3.
    for day in 0..2 {
        backup_at(&repo, "db", DAY0 + day * DAY);
    }
    let mut db_files = vec![];
    for h in 0..48 {
        db_files.push(file_backup_at(&repo, "db", DAY0 + 5 * DAY + h * 3600));
    }
    let mut notes = vec![];
    for day in 0..4 {
        notes.push(file_backup_at(&repo, "notes", DAY0 + day * DAY));
    }
    let policy = Policy {
        last: 2,
        daily: 2,
        ..Default::default()
    };
    let run = |dry_run: bool, vm: Option<&str>| {
        forget(
            &repo,
            &ForgetOptions {
                vm: vm.map(str::to_string),
                policy,
                dry_run,
                force: false,
            },
        )
        .unwrap()
    };

    // A dry run decides and removes nothing.
    let r = run(true, None);
    assert_eq!(r.removed, 45, "{r:?}");
    assert_eq!(repo.catalog_ids("db").unwrap().len(), 48);
    assert_eq!(repo.catalog_ids("notes").unwrap().len(), 4);

    let r = run(false, None);
    let vms: Vec<&str> = r.vms.iter().map(|v| v.vm.as_str()).collect();
    assert_eq!(vms, ["db", "notes"]);
    let db = &r.vms[0];
    // Two series: 48 hourly file backups do not push out the two disk
    // backups, which the policy keeps whole (last 2).
    let disk: Vec<_> = db
        .backups
        .iter()
        .filter(|b| b.kind == BackupKind::Disk)
        .collect();
    assert_eq!(disk.len(), 2);
    assert!(disk
        .iter()
        .all(|b| b.keep && b.reason.starts_with("keep-last")));
    let kept_files: Vec<&str> = db
        .backups
        .iter()
        .filter(|b| b.kind == BackupKind::Files && b.keep)
        .map(|b| b.id.as_str())
        .collect();
    // The two newest (day 6, 23:00 and 22:00) and day 5's newest (23:00).
    let want = [&db_files[47].id, &db_files[46].id, &db_files[23].id];
    assert_eq!(kept_files, want);
    assert_eq!(repo.catalog_ids("db").unwrap().len(), 3);
    assert_eq!(repo.backup_ids("db").unwrap().len(), 2);
    // notes: days 3 and 2 (last 2), then days 1 and 0 (daily 2).
    assert_eq!(repo.catalog_ids("notes").unwrap().len(), 4);
    assert_eq!(r.removed, 45);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["vms"][0]["backups"][2]["kind"], "files");

    // gc frees the chunks only forgotten file backups referenced.
    let before = stored_chunks(&repo);
    let g = collect(
        &repo,
        &[MANIFESTS, crate::repo::catalog::REFERRER],
        GcOptions {
            dry_run: false,
            wait: Duration::ZERO,
        },
    )
    .unwrap();
    let after = stored_chunks(&repo);
    let mut live = referenced(&repo);
    for vm in ["db", "notes"] {
        for id in repo.catalog_ids(vm).unwrap() {
            live.extend(catalog_chunks(&repo.catalog(vm, &id).unwrap()));
        }
    }
    assert_eq!(after, live);
    let forgotten_own: HashSet<Digest> = db_files
        .iter()
        .filter(|c| !want.contains(&&c.id))
        .flat_map(|c| catalog_chunks(c).into_iter().filter(|d| !live.contains(d)))
        .collect();
    assert!(forgotten_own.len() >= 45, "{}", forgotten_own.len());
    assert!(forgotten_own.iter().all(|c| !after.contains(c)));
    assert_eq!(before.difference(&after).count() as u64, g.removed_chunks);
    for id in want {
        let c = repo.catalog("db", id).unwrap();
        for e in &c.entries {
            for ch in &e.chunks {
                repo.read_chunk(&ch.digest, ch.len as usize, id).unwrap();
            }
        }
    }

    // --vm names a VM that has only file backups.
    let r = run(true, Some("notes"));
    assert_eq!((r.kept, r.removed), (4, 0));
}

#[test]
fn the_pin_of_a_throwaway_recovery_killed_before_its_cleanup_is_dropped_and_a_live_ones_kept() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
    let old = backup_at(&repo, "vm", DAY0);
    let new = backup_at(&repo, "vm", DAY0 + DAY);
    let opts = ForgetOptions {
        vm: Some("vm".into()),
        policy: Policy {
            last: 1,
            ..Default::default()
        },
        dry_run: false,
        force: false,
    };
    // `files` running (this process): its pin protects the backup.
    let mut pin =
        crate::repo::pins::Pin::new("vm", vec![old.id.clone()], &d.path().join("a"), true);
    pin.owner = Some(crate::repo::locks::this_process());
    crate::repo::pins::put(&repo, &pin).unwrap();
    let r = forget(&repo, &opts).unwrap();
    assert_eq!(
        r.removed, 0,
        "a live throwaway recovery's backup was forgotten"
    );
    // Killed before its cleanup: a process of this host that has exited.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    pin.owner.as_mut().unwrap().pid = dead;
    pin.owner.as_mut().unwrap().start_time = None;
    crate::repo::pins::put(&repo, &pin).unwrap();
    // Another host's throwaway pin cannot be judged: it still protects.
    let mut far =
        crate::repo::pins::Pin::new("vm", vec![old.id.clone()], &d.path().join("b"), true);
    far.owner = Some(crate::repo::locks::Owner {
        host: "elsewhere".into(),
        ..pin.owner.clone().unwrap()
    });
    far.host = "elsewhere".into();
    crate::repo::pins::put(&repo, &far).unwrap();
    assert_eq!(forget(&repo, &opts).unwrap().removed, 0);
    crate::repo::pins::remove(&repo, &far).unwrap();
    let r = forget(&repo, &opts).unwrap();
    assert_eq!(r.removed, 1, "{r:?}");
    assert_eq!(repo.backup_ids("vm").unwrap(), vec![new.id]);
    assert!(
        crate::repo::pins::of_vm(&repo, "vm").unwrap().is_empty(),
        "the dead pin stays"
    );
}

/// explore7 L3: a backup from a host whose clock ran years ahead took
/// `--keep-last`'s place from today's backups, and nothing said so.
#[test]
fn a_backup_dated_after_this_hosts_clock_is_named_in_a_warning_and_decided_as_usual() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
    let now = crate::util::now_unix();
    let today = backup_at(&repo, "vm", now - 60);
    let ahead = backup_at(&repo, "vm", now + 365 * DAY);
    backup_at(&repo, "other", now - 60);
    let opts = ForgetOptions {
        vm: None,
        policy: Policy {
            last: 1,
            ..Default::default()
        },
        dry_run: true,
        force: false,
    };
    let r = forget(&repo, &opts).unwrap();
    let vm = r.vms.iter().find(|v| v.vm == "vm").unwrap();
    assert_eq!(vm.warnings.len(), 1, "{:?}", vm.warnings);
    assert!(
        vm.warnings[0].contains(&ahead.id) && vm.warnings[0].contains("after this host's clock"),
        "{:?}",
        vm.warnings
    );
    // Decided by time, as PBS does: the dated-ahead one is the newest.
    let kept: Vec<&str> = vm
        .backups
        .iter()
        .filter(|b| b.keep)
        .map(|b| b.id.as_str())
        .collect();
    assert_eq!(kept, [ahead.id.as_str()]);
    assert!(vm.backups.iter().any(|b| b.id == today.id && !b.keep));
    let other = r.vms.iter().find(|v| v.vm == "other").unwrap();
    assert!(other.warnings.is_empty(), "{:?}", other.warnings);
    // Within the slack (a clock a few minutes ahead): nothing said.
    let soon = vec![BackupDecision {
        kind: BackupKind::Disk,
        id: "x".into(),
        created: String::new(),
        created_unix: now + FUTURE_SLACK,
        keep: true,
        reason: String::new(),
        forced_from: vec![],
    }];
    assert!(dated_in_the_future(&soon, now).is_empty());
    let json = serde_json::to_value(&r).unwrap();
    assert!(json["vms"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["warnings"].is_array()));
}
