//! Admission under bounded staging: a new recovery goes only where its
//! expected working set fits, and a refusal says where the figure came
//! from; a profile that does not fit below the low watermark, where
//! prefetch stops, is admitted with a warning.

use super::*;

#[test]
fn with_bounded_staging_a_new_recovery_goes_where_its_working_set_fits_or_is_refused() {
    let r = rig_with(POINTS);
    backup(&r, "fresh", 21, 4);
    backup(&r, "other", 22, 4);
    // The main staging (point a) cannot hold a 4-block disk; ssd can.
    let dirs = r.ds.stagings().to_vec();
    let (main, fast) = (&dirs[0], dirs.iter().find(|d| d.root() == ssd(&r)).unwrap());
    main.budget().set_limits(2 * 65536, 0);
    fast.budget().set_limits(64 << 20, 0);
    // An idle daemon would place it on `a`; `a` has no room.
    let info = r.ds.recover("fresh", None).unwrap();
    assert!(["b", "c"].contains(&info.export_point.as_str()), "{info:?}");
    let e = r.ds.recover_placed("other", None, &at("a")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("expected working set") && msg.contains("export point a"),
        "{msg}"
    );
    assert!(r.ds.session("other").is_none());
    // With no room anywhere, auto placement is refused too.
    fast.budget().set_limits(65536, 0);
    let e = r.ds.recover("other", None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
}

#[test]
fn under_no_profile_a_stored_profile_does_not_size_admission_and_a_refusal_says_where_its_figure_came_from(
) {
    use crate::prefetch::profile::{self, Access, DiskTrace, Recording};
    // The rig serves as `serve --no-profile` does (use_profile: false).
    let r = rig();
    // 24 MiB, all zero chunks but one: more than the default working set.
    let blocks = 384u64;
    let mut data = vec![0u8; blocks as usize * BS];
    data[..BS].fill(7);
    let img = r.dir.path().join("big.img");
    std::fs::write(&img, &data).unwrap();
    let rep = run_backup(
        &r.repo,
        BackupRequest {
            vm: "big".into(),
            config: None,
            chunk_size: BS as u32,
            images: vec![img],
            progress: false,
        },
    )
    .unwrap();
    // A stored profile of the whole disk: 24 MiB.
    let rec = Recording {
        recorded: "2026-11-24T00:00:00Z".into(),
        backup: rep.manifest.id.clone(),
        source: "session".into(),
        disks: vec![DiskTrace {
            index: 0,
            block_size: BS as u64,
            accesses: (0..blocks).map(|b| Access(b, 0, None)).collect(),
        }],
    };
    profile::append(&r.repo, "big", rec).unwrap();
    let budget = r.ds.stagings()[0].budget().clone();
    // 20 MiB holds the default 16 MiB, not the profile's 24 MiB.
    budget.set_limits(20 << 20, 0);
    r.ds.recover("big", None).unwrap();
    r.ds.release("big", true).unwrap();
    budget.set_limits(8 << 20, 0);
    let e = r.ds.recover("big", None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    assert!(
        e.to_string()
            .contains("expected working set (16.0 MiB, the default: serve --no-profile)"),
        "{e}"
    );
}

/// A datastore that follows stored profiles (as `serve` does by default).
fn profiled_rig() -> Rig {
    let r = rig();
    let prefetch = PrefetchOptions {
        use_profile: true,
        default_profile: false,
        ..Default::default()
    };
    let dir = r.dir.path().join("profiled");
    std::fs::create_dir_all(&dir).unwrap();
    let ds = datastore_prefetching(
        &dir,
        &r.repo,
        &[],
        crate::placement::DEFAULT_MAX_CONNECTIONS_PER_HOST,
        prefetch,
    );
    Rig { ds, ..r }
}

#[test]
fn a_profile_that_does_not_fit_below_the_low_watermark_is_admitted_with_a_warning_saying_so() {
    use crate::prefetch::profile::{self, Access, DiskTrace, Recording};
    let r = profiled_rig();
    // 400 blocks of data (25 MiB); a stored profile of 200 (12.5 MiB).
    let (id, _) = backup(&r, "vm", 5, 400);
    let rec = Recording {
        recorded: "2026-11-24T00:00:00Z".into(),
        backup: id,
        source: "session".into(),
        disks: vec![DiskTrace {
            index: 0,
            block_size: BS as u64,
            accesses: (0..200).map(|b| Access(b, 0, None)).collect(),
        }],
    };
    profile::append(&r.repo, "vm", rec).unwrap();
    let budget = r.ds.stagings()[0].budget().clone();
    // 15 MiB holds the profile, its 80 % (12 MiB), where prefetch stops,
    // does not: admitted, and told.
    budget.set_limits(15 << 20, 0);
    let info = r.ds.recover("vm", None).unwrap();
    let [w] = &info.warnings[..] else {
        panic!("{:?}", info.warnings)
    };
    assert!(
        w.contains("operational profile (12.5 MiB) does not fit below the low watermark")
            && w.contains("12.0 MiB free there"),
        "{w}"
    );
    r.ds.release("vm", true).unwrap();
    // 16 MiB: 12.8 MiB below the watermark; no warning.
    budget.set_limits(16 << 20, 0);
    assert!(r.ds.recover("vm", None).unwrap().warnings.is_empty());
    r.ds.release("vm", true).unwrap();
    // 12 MiB: it does not fit the limit at all: refused, as before.
    budget.set_limits(12 << 20, 0);
    let e = r.ds.recover("vm", None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    assert!(
        e.to_string()
            .contains("expected working set (12.5 MiB, from its operational profile)"),
        "{e}"
    );
}
