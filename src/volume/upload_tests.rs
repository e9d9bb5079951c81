//! The session uploader's part of the volume: a guest write racing an
//! upload of the same block is never lost (deterministic interleavings),
//! and the uploader's throttle backs off on this volume's real guest
//! latency.

use std::time::{Duration, Instant};

use super::freeze_tests::freeze_for_backup;
use super::tests::{fixture, fixture_on};
use super::*;
use crate::precopy::{Gate, LoadLimit, LoadSource, Throttle};
use crate::repo::Digest;
use crate::session::upload::GuestIo;
use crate::staging::io::{OsStorage, Storage};
use crate::staging::uploaded::{uploaded_path, UploadRecord};

const BS: usize = 65536;

/// Gives `vol` an empty upload record of generation 0 in `dir`.
fn with_record(vol: &Volume, dir: &std::path::Path) -> Arc<Uploaded> {
    let rec = UploadRecord::create(
        &OsStorage,
        &uploaded_path(dir, 0, 0),
        BS as u32,
        vol.nblocks(),
        0,
    )
    .unwrap();
    let u = Uploaded::new(rec, Default::default(), vol.nblocks());
    vol.set_uploaded(Some(u.clone()));
    u
}

/// The record as a restarted daemon would load it.
fn on_disk(vol: &Volume, dir: &std::path::Path) -> crate::staging::uploaded::Entries {
    UploadRecord::open(
        &OsStorage,
        &uploaded_path(dir, 0, 0),
        BS as u32,
        vol.nblocks(),
        0,
    )
    .unwrap()
    .1
}

/// The uploader's read: the block's bytes and the stamp they were read at.
fn upload_read(vol: &Volume, b: u64) -> (Vec<u8>, u32) {
    let mut buf = vec![0u8; BS];
    let stamp = vol
        .read_for_upload(b, &mut buf)
        .unwrap()
        .expect("no write in progress");
    (buf, stamp)
}

#[test]
fn a_guest_write_racing_the_uploader_on_the_same_block_is_never_lost() {
    let f = fixture(16, 40);
    let (vol, dir) = (&f.vol, &f.staging);
    let u = with_record(vol, dir);
    for b in 1..4u64 {
        vol.write(b * BS as u64, &vec![b as u8; BS]).unwrap();
    }
    assert_eq!(vol.upload_todo(Some(&u)), vec![1, 2, 3]);

    // 1. The write lands between the uploader's read and its mark: the
    //    mark is refused, nothing is recorded, the block stays to do.
    let (old, stamp) = upload_read(vol, 1);
    vol.write(BS as u64, &vec![0x11; BS]).unwrap();
    assert!(!vol
        .mark_uploaded(&u, 1, stamp, Some(Digest::of(&old)))
        .unwrap());
    assert!(u.get(1).is_none());

    // 2. The write comes after the mark: it zeroes the entry durably (the
    //    file on disk no longer has it) before its data lands.
    let (old, stamp) = upload_read(vol, 2);
    assert!(vol
        .mark_uploaded(&u, 2, stamp, Some(Digest::of(&old)))
        .unwrap());
    u.sync().unwrap();
    assert_eq!(on_disk(vol, dir).get(&2), Some(&Some(Digest::of(&old))));
    vol.write(2 * BS as u64 + 100, b"new").unwrap();
    assert!(u.get(2).is_none());
    assert!(
        !on_disk(vol, dir).contains_key(&2),
        "the entry outlived the write in the file"
    );

    // 3. The mark runs while the write holds its claim, before the write
    //    announces itself: the write sees the entry and zeroes it first.
    let (old3, stamp3) = upload_read(vol, 3);
    let (v, u2) = (vol.clone(), u.clone());
    *vol.claim_hook.lock() = Some(Arc::new(move |_, b| {
        if b == 3 {
            assert!(v
                .mark_uploaded(&u2, 3, stamp3, Some(Digest::of(&old3)))
                .unwrap());
        }
    }));
    vol.write(3 * BS as u64, &vec![0x33; BS]).unwrap();
    *vol.claim_hook.lock() = None;
    assert!(u.get(3).is_none());
    assert!(!on_disk(vol, dir).contains_key(&3));

    // Every one of them is residue: a backup reads all three, and only
    // block 4, uploaded and untouched, is taken from the record.
    vol.write(4 * BS as u64, &vec![4; BS]).unwrap();
    let (b4, stamp) = upload_read(vol, 4);
    assert!(vol
        .mark_uploaded(&u, 4, stamp, Some(Digest::of(&b4)))
        .unwrap());
    assert_eq!(vol.upload_todo(Some(&u)), vec![1, 2, 3]);
    let (frozen, _) = freeze_for_backup(vol, dir);
    assert_eq!(frozen.read, vec![1, 2, 3, 4]);
    assert_eq!(frozen.uploaded, vec![(4, Some(Digest::of(&vec![4u8; BS])))]);
    // What was written is what the backup reads.
    let mut buf = vec![0u8; BS];
    vol.read_frozen(1, &mut buf).unwrap();
    assert_eq!(buf, vec![0x11; BS]);
    vol.read_frozen(3, &mut buf).unwrap();
    assert_eq!(buf, vec![0x33; BS]);
    vol.end_freeze(false);
}

#[test]
fn the_uploaders_throttle_backs_off_on_the_sessions_slow_guest_writes_and_resumes_when_they_are_fast(
) {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let faults = Arc::new(FaultyStorage::new(OsStorage::shared()));
    let f = fixture_on(16, 41, faults.clone() as Arc<dyn Storage>);
    let vol = f.vol.clone();
    let data_file = vol.store.data_path.to_str().unwrap().to_string();
    // Stage the blocks first, so the guest writes below are plain writes.
    for b in 0..16u64 {
        vol.write(b * BS as u64, &vec![1; BS]).unwrap();
    }
    let limit = LoadLimit::parse("latency=5").unwrap();
    let mut t = Throttle::new(Some(limit), None);
    let disks = [vol.clone()];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guest = |stop: Arc<std::sync::atomic::AtomicBool>| {
        let vol = vol.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                vol.write((i % 16) * BS as u64, &[i as u8; 4096]).unwrap();
                i += 1;
            }
        })
    };
    // Every staging write of the guest takes 20 ms: four times the limit.
    faults.inject(Rule::delay(
        Op::Write,
        &data_file,
        Duration::from_millis(20),
    ));
    let g = guest(stop.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    while t.gate != Gate::Halted {
        assert!(Instant::now() < deadline, "never halted: {:?}", t.load);
        std::thread::sleep(Duration::from_millis(50));
        t.sample(&mut GuestIo(&disks)).unwrap();
    }
    let load = t.load.unwrap();
    assert!(load.latency_ms > 5.0 * 1.25, "{load:?}");
    assert!(t.why.contains("I/O latency"), "{}", t.why);
    // While halted, the uploader's next read waits (here: until told to
    // give up after a while).
    let t0 = Instant::now();
    let give_up = t0 + Duration::from_secs(1);
    t.before_read(&mut GuestIo(&disks), &|| Instant::now() < give_up)
        .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert!(t.held >= Duration::from_millis(750), "{:?}", t.held);
    // The guest's writes are fast again: the gate opens (below 80% of the
    // limit), and a read goes through at once.
    faults.clear();
    let deadline = Instant::now() + Duration::from_secs(20);
    while t.gate != Gate::Copying {
        assert!(Instant::now() < deadline, "never resumed: {:?}", t.load);
        std::thread::sleep(Duration::from_millis(50));
        t.sample(&mut GuestIo(&disks)).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    g.join().unwrap();
    let t0 = Instant::now();
    t.before_read(&mut GuestIo(&disks), &|| true).unwrap();
    assert!(t0.elapsed() < Duration::from_millis(100));
    assert!(t.load.unwrap().level < 0.8);
}

#[test]
fn the_sessions_guest_tail_counts_exactly_the_requests_slower_than_the_limit() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let faults = Arc::new(FaultyStorage::new(OsStorage::shared()));
    let f = fixture_on(16, 43, faults.clone() as Arc<dyn Storage>);
    let vol = f.vol.clone();
    let data_file = vol.store.data_path.to_str().unwrap().to_string();
    for b in 0..16u64 {
        vol.write(b * BS as u64, &vec![1; BS]).unwrap();
    }
    let (n0, slow0) = vol.guest_tail(Duration::from_millis(10));
    // 5 of the next 40 guest writes take 30 ms.
    faults.inject(
        Rule::delay(Op::Write, &data_file, Duration::from_millis(30))
            .after(10)
            .times(5),
    );
    for i in 0..40u64 {
        vol.write((i % 16) * BS as u64, &[i as u8; 4096]).unwrap();
    }
    let (n, slow) = vol.guest_tail(Duration::from_millis(10));
    assert_eq!(n - n0, 40);
    assert_eq!(slow - slow0, 5);
    // What the uploader's throttle reads.
    let io = GuestIo(&[vol]).io(Some(Duration::from_millis(10))).unwrap();
    assert_eq!(io.tail, Some((n, slow)));
}

#[test]
fn after_a_failed_sync_of_the_upload_record_a_guest_write_over_an_uploaded_block_fails_the_disk() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let f = fixture(16, 41);
    let (vol, dir) = (&f.vol, &f.staging);
    let faults = FaultyStorage::new(OsStorage::shared());
    let rec = UploadRecord::create(
        &faults,
        &uploaded_path(dir, 0, 0),
        BS as u32,
        vol.nblocks(),
        0,
    )
    .unwrap();
    let u = Uploaded::new(rec, Default::default(), vol.nblocks());
    vol.set_uploaded(Some(u.clone()));
    vol.write(BS as u64, &vec![1; BS]).unwrap();
    let (old, stamp) = upload_read(vol, 1);
    assert!(vol
        .mark_uploaded(&u, 1, stamp, Some(Digest::of(&old)))
        .unwrap());
    // The uploader's checkpoint takes the one writeback error the kernel
    // reports for the record's descriptor.
    faults.inject(Rule::fail(Op::Sync, "uploaded-0", libc::EIO).times(1));
    assert!(u.sync().is_err());
    // A guest write over block 1 clears its entry and syncs: that sync
    // would now "succeed", while the cleared page may be the one lost.
    assert!(
        vol.write(BS as u64, &vec![2; BS]).is_err(),
        "a write was acknowledged although its entry's clear may not be on disk"
    );
    assert!(vol.is_failed());
}

/// review22 M1: a second write to a block whose upload entry a first
/// write is still zeroing must not land (and be flushed) before a zeroing
/// is durable: after a power cut the entry would name the old chunk, and
/// the next live backup would take it for a block the guest rewrote.
#[test]
fn a_second_write_to_a_block_whose_entry_another_write_is_zeroing_lands_only_after_a_synced_zeroing(
) {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    use crate::staging::io::mem::MemStorage;
    let r = super::tests::Reopenable::new(8, 45);
    let mem = MemStorage::new();
    let faults = FaultyStorage::new(Arc::new(mem.clone()));
    let vol = r.open(&faults);
    let path = uploaded_path(&r.sdir, 0, 0);
    let rec = UploadRecord::create(&faults, &path, BS as u32, vol.nblocks(), 0).unwrap();
    let u = Uploaded::new(rec, Default::default(), vol.nblocks());
    vol.set_uploaded(Some(u.clone()));
    vol.write(BS as u64, &vec![1; BS]).unwrap();
    let (old, stamp) = upload_read(&vol, 1);
    assert!(vol
        .mark_uploaded(&u, 1, stamp, Some(Digest::of(&old)))
        .unwrap());
    u.sync().unwrap();
    vol.flush().unwrap();
    let entry_on_disk = |m: &MemStorage| {
        UploadRecord::open(m, &path, BS as u32, vol.nblocks(), 0)
            .unwrap()
            .1
            .contains_key(&1)
    };
    // The first write's sync of the zeroed entry is held up.
    faults.inject(Rule::delay(
        Op::Sync,
        "uploaded-0",
        Duration::from_millis(700),
    ));
    std::thread::scope(|s| {
        let first = s.spawn(|| vol.write(BS as u64, &[2; 512]));
        // Until its zeroing is written (not yet synced).
        let deadline = Instant::now() + Duration::from_secs(10);
        while entry_on_disk(&mem.kill_state(mem.position())) {
            assert!(
                Instant::now() < deadline,
                "the first write never zeroed the entry"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        vol.write(BS as u64 + 4096, &[3; 512]).unwrap();
        vol.flush().unwrap();
        // Power cut now: nothing unsynced survives.
        let mut rng = rand::rngs::mock::StepRng::new(0, 0);
        let cut = mem.crash_state(mem.position(), 0.0, &mut rng);
        assert!(
            !entry_on_disk(&cut),
            "a flushed write over block 1 left its upload entry valid on disk"
        );
        first.join().unwrap().unwrap();
    });
}

#[test]
fn a_write_over_an_uploaded_block_is_not_quick_as_it_syncs_the_upload_record() {
    let f = fixture(16, 42);
    let (vol, dir) = (&f.vol, &f.staging);
    let u = with_record(vol, dir);
    vol.write(BS as u64, &vec![1; BS]).unwrap();
    assert!(vol.write_is_quick(BS as u64, 512));
    let (old, stamp) = upload_read(vol, 1);
    assert!(vol
        .mark_uploaded(&u, 1, stamp, Some(Digest::of(&old)))
        .unwrap());
    assert!(
        !vol.write_is_quick(BS as u64, 512),
        "a write that must clear and sync an upload entry was quick: it would sync on a FUSE event thread"
    );
    vol.write(BS as u64, &[2; 512]).unwrap();
    assert!(vol.write_is_quick(BS as u64, 512));
}
