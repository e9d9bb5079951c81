//! Flush durability under failure and crash: a failed staging or
//! changed-map sync fails the disk for good and persists nothing after
//! it; concurrent flushes and first writes share syncs; a daemon crash
//! keeps unflushed writes and the epoch, a power cut or a failed sync
//! (seen or not) leaves no unsynced block trusted.

use super::tests::{fixture_on, Reopenable};
use super::*;
use crate::staging::io::OsStorage;

const BS: usize = 65536;

#[test]
fn a_failed_staging_sync_fails_every_later_flush_and_write_and_persists_no_presence() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let faults = FaultyStorage::new(OsStorage::shared());
    let f = fixture_on(8, 15, Arc::new(faults.clone()));
    f.vol.read(0, BS).unwrap();
    f.vol.flush().unwrap();
    let present_before = std::fs::read(f.staging.join("disk0.present")).unwrap();
    // The flusher's sync hits a writeback error once; the kernel reports
    // it once and may have dropped the pages.
    faults.inject(Rule::fail(Op::Sync, "disk0.data", libc::EIO).times(1));
    f.vol.read(BS as u64, BS).unwrap(); // a new presence bit, not yet durable
    let e = f.vol.flush().unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    // The device works again, but nothing of that disk is ever claimed durable.
    for _ in 0..3 {
        let e = f.vol.flush().unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        assert!(e.to_string().contains("has failed"), "{e}");
    }
    assert!(
        f.vol.write(0, b"x").is_err(),
        "a failed disk refuses writes"
    );
    assert_eq!(f.vol.read(0, 10).unwrap(), f.data[..10], "reads go on");
    assert_eq!(
        std::fs::read(f.staging.join("disk0.present")).unwrap(),
        present_before,
        "no presence bit was persisted after the failed sync"
    );
    let st = f.vol.status();
    assert!(st.failed.unwrap().contains("Input/output error"));
}

#[test]
fn a_failed_changed_map_sync_fails_the_write_and_the_disk() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let faults = FaultyStorage::new(OsStorage::shared());
    let f = fixture_on(8, 16, Arc::new(faults.clone()));
    faults.inject(Rule::fail(Op::Sync, "disk0.changed", libc::EIO).times(1));
    let e = f.vol.write(3, b"abc").unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert!(f.vol.flush().is_err(), "sticky");
    assert!(f.vol.is_failed());
}

#[test]
fn concurrent_flushes_share_syncs() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let faults = FaultyStorage::new(OsStorage::shared());
    // Each data sync takes 50 ms, so callers pile up behind one.
    faults.inject(Rule::delay(
        Op::Sync,
        "disk0.data",
        Duration::from_millis(50),
    ));
    let f = fixture_on(8, 17, Arc::new(faults.clone()));
    f.vol.write(0, b"abc").unwrap();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let vol = f.vol.clone();
            std::thread::spawn(move || vol.flush().unwrap())
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let syncs = f.vol.status().flushes;
    assert!(syncs <= 4, "16 concurrent flushes took {syncs} syncs");
}

#[test]
fn concurrent_first_writes_share_changed_map_syncs() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    use crate::staging::io::mem::MemStorage;
    let r = Reopenable::new(32, 18);
    let mem = MemStorage::new();
    let faults = FaultyStorage::new(Arc::new(mem.clone()));
    // Each map sync takes 30 ms, so first writes pile up behind one.
    faults.inject(Rule::delay(
        Op::Sync,
        "disk0.changed",
        Duration::from_millis(30),
    ));
    let vol = r.open(&faults);
    let syncs = || mem.syncs_of("disk0.changed").len();
    let before = syncs();
    // One write of 16 blocks: one sync of the changed map, not 16.
    vol.write(0, &vec![1u8; 16 * BS]).unwrap();
    assert_eq!(syncs() - before, 1, "a 16-block first write");
    let before = syncs();
    let start = Arc::new(std::sync::Barrier::new(16));
    let threads: Vec<_> = (16..32u64)
        .map(|b| {
            let (vol, start) = (vol.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                vol.write(b * BS as u64, &vec![b as u8; BS]).unwrap();
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let n = syncs() - before;
    assert!(
        n <= 4,
        "16 concurrent first writes took {n} changed-map syncs"
    );
    assert_eq!(vol.status().blocks_changed, 32);
    vol.close();
}

#[test]
fn a_daemon_crash_keeps_unflushed_writes_and_the_epoch_and_a_power_cut_does_neither() {
    use crate::disk::Disk;
    use crate::staging::io::mem::MemStorage;
    let r = Reopenable::new(8, 31);
    let mem = MemStorage::new();
    let vol = r.open(&mem);
    let epoch = Disk::epoch(vol.as_ref());
    // A partial write into a block never staged (fill, then write) and a
    // whole-block write: neither flushed.
    vol.write(2 * BS as u64 + 10, b"unflushed").unwrap();
    vol.write(5 * BS as u64, &vec![7u8; BS]).unwrap();
    let at = mem.position();

    let killed = mem.kill_state(at);
    let again = r.open(&killed);
    assert_eq!(
        again.read(2 * BS as u64 + 10, 9).unwrap(),
        b"unflushed",
        "a daemon crash lost an unflushed write"
    );
    assert_eq!(again.read(5 * BS as u64, BS).unwrap(), vec![7u8; BS]);
    assert_eq!(
        again.read(2 * BS as u64, 10).unwrap(),
        r.data[2 * BS..2 * BS + 10],
        "the rest of the block is the backup's"
    );
    assert_eq!(
        Disk::epoch(again.as_ref()),
        epoch,
        "the epoch changed over a daemon crash"
    );
    again.close();

    let mut rng = rand::rngs::mock::StepRng::new(0, 1);
    let cut = mem.crash_state(at, 1.0, &mut rng);
    let after_power = r.open(&cut);
    assert_eq!(
        after_power.read(5 * BS as u64, BS).unwrap(),
        r.data[5 * BS..6 * BS],
        "after a power cut an unflushed block is the backup's again"
    );
    assert_ne!(
        Disk::epoch(after_power.as_ref()),
        epoch,
        "a power cut kept the epoch"
    );
    after_power.close();
    vol.close();
}

#[test]
fn after_a_failed_sync_the_next_daemon_trusts_no_unsynced_block_and_changes_the_epoch() {
    use crate::disk::Disk;
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let r = Reopenable::new(8, 32);
    let faults = FaultyStorage::new(OsStorage::shared());
    let vol = r.open(&faults);
    let epoch = Disk::epoch(vol.as_ref());
    vol.write(3 * BS as u64, &vec![9u8; BS]).unwrap();
    faults.inject(Rule::fail(Op::Sync, "disk0.data", libc::EIO).times(1));
    assert!(vol.flush().is_err());
    vol.close();
    drop(vol);
    // The same boot: only the mirror's poison tells the next daemon that
    // the kernel may have dropped those pages.
    let again = r.open(&OsStorage);
    assert_eq!(
        again.read(3 * BS as u64, BS).unwrap(),
        r.data[3 * BS..4 * BS],
        "a block whose sync failed was trusted"
    );
    assert_ne!(
        Disk::epoch(again.as_ref()),
        epoch,
        "NFS clients would not resend"
    );
    again.close();
}

#[test]
fn a_writeback_error_a_killed_daemon_never_saw_makes_the_next_one_trust_no_unsynced_block() {
    use crate::disk::Disk;
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    use crate::staging::io::mem::MemStorage;
    let r = Reopenable::new(8, 33);
    let mem = MemStorage::new();
    let vol = r.open(&mem);
    let epoch = Disk::epoch(vol.as_ref());
    vol.write(3 * BS as u64, &vec![9u8; BS]).unwrap();
    // `kill -9` before any flush; the kernel then failed to write the
    // block back, which no descriptor has reported yet: the restarted
    // daemon's first sync of the data file is the one that sees it.
    let killed = FaultyStorage::new(Arc::new(mem.kill_state(mem.position())));
    killed.inject(Rule::fail(Op::Sync, "disk0.data", libc::EIO).times(1));
    let again = r.open(&killed);
    assert_eq!(
        again.read(3 * BS as u64, BS).unwrap(),
        r.data[3 * BS..4 * BS],
        "a block whose writeback failed was trusted from the mirror"
    );
    assert_ne!(
        Disk::epoch(again.as_ref()),
        epoch,
        "NFS clients would not resend"
    );
    again.close();
    vol.close();
}
