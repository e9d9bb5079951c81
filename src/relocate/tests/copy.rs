//! The pipelined copier against racing guest writes: every byte copied,
//! and no block recorded copied over bytes a guest write replaced (a hole
//! whose write is still completing, a batch waiting for its commit).

use super::*;
use std::sync::atomic::AtomicBool;

/// A disk whose last block is short (and not a multiple of 4 KiB) ends
/// byte-exact on the target, with a guest write in it.
#[test]
fn a_relocation_copies_every_byte_even_of_a_short_unaligned_last_block() {
    let size = BLOCKS * BS - 1000;
    let rig = rig_of(size);
    let disks = rig.volumes();
    disks[0]
        .write(BS as u64 + 7, b"written by the guest")
        .unwrap();
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    let mut want = rig.images[0].clone();
    want[BS + 7..BS + 27].copy_from_slice(b"written by the guest");
    assert_eq!(rig.target_bytes(0).len(), size);
    assert!(rig.target_bytes(0) == want, "disk0's target differs");
    assert!(
        rig.target_bytes(1) == rig.images[1],
        "disk1's target differs"
    );
}

/// A guest write into a hole that has ended its write but not yet marked
/// the block present is not taken for a hole: the copier never records
/// the block copied as one, and the target ends with the write.
#[test]
fn a_write_into_a_hole_still_completing_is_never_recorded_copied_as_a_hole() {
    let rig = rig();
    let disks = rig.volumes();
    let (reached_tx, reached_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    *disks[0].complete_hook.lock() = Some(Arc::new(move |_, b| {
        if b == 3 {
            let _ = reached_tx.send(());
            let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(60));
        }
    }));
    let d0 = disks[0].clone();
    let writer = std::thread::spawn(move || d0.write(3 * BS as u64, &[0x77; BS]));
    reached_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the write reached its completion");
    let r = rig.relocate(&disks);
    // The first pass records every other block of disk 0, and commits
    // block 3 in its hole run while the write is still completing.
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..BLOCKS as u64).any(|b| b != 3 && !r.copied[0].test(b)) {
        assert!(Instant::now() < deadline, "copier stuck: {:?}", r.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    let marked_while_writing = r.copied[0].test(3);
    go_tx.send(()).unwrap();
    writer.join().unwrap().unwrap();
    *disks[0].complete_hook.lock() = None;
    assert_eq!(settle(&r), State::Done);
    assert!(
        !marked_while_writing,
        "block 3 was recorded copied as a hole while its write completed"
    );
    let mut want = rig.images[0].clone();
    want[3 * BS..4 * BS].fill(0x77);
    assert!(
        rig.target_bytes(0) == want,
        "the target lost the write into the hole"
    );
}

#[test]
fn a_guest_write_racing_a_batch_in_flight_is_never_recorded_as_copied_with_the_old_bytes() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    // The guest writes block 5 of disk 0 after the copier wrote the old
    // bytes to the target, while their batch waits for its commit.
    let raced = Arc::new(AtomicBool::new(false));
    let (d0, flag) = (disks[0].clone(), raced.clone());
    *r.commit_hook.lock() = Some(Arc::new(move |i, blocks: &[u64]| {
        if i == 0 && blocks.contains(&5) && !flag.swap(true, Ordering::SeqCst) {
            d0.write(5 * BS as u64 + 9, b"racing write").unwrap();
        }
    }));
    r.spawn();
    assert_eq!(settle(&r), State::Done);
    assert!(raced.load(Ordering::SeqCst), "the hook never saw block 5");
    let mut want = rig.images[0].clone();
    want[5 * BS + 9..][..12].copy_from_slice(b"racing write");
    assert!(
        rig.target_bytes(0) == want,
        "the target holds a stale block"
    );
    assert!(r.copies_lost.load(Ordering::Relaxed) >= 1);
    assert!(rig.target_bytes(1) == rig.images[1]);
}

#[test]
fn guest_writes_all_through_a_pipelined_copy_leave_the_target_equal_to_every_write() {
    let rig = rig();
    let disks = rig.volumes();
    // ~1.5 s of copying at 2 MB/s: the writer races every stage of it.
    let r = rig.relocate_at(&disks, Some(2.0));
    let mut want = rig.images.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    let t0 = Instant::now();
    let mut writes = 0;
    while t0.elapsed() < Duration::from_millis(1200) && r.state() != State::Done {
        let i = rng.gen_range(0..2);
        let off = rng.gen_range(0..BLOCKS * BS - 8192);
        let len = rng.gen_range(1..8192);
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        disks[i].write(off as u64, &data).unwrap();
        want[i][off..off + len].copy_from_slice(&data);
        writes += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(settle(&r), State::Done);
    eprintln!(
        "{writes} guest writes during the copy; status {:?}",
        r.status()
    );
    for (i, w) in want.iter().enumerate() {
        assert!(
            rig.target_bytes(i) == *w,
            "disk{i}: the target lost a write"
        );
    }
}

/// explore4 M2: the repository unreachable while the copy reads blocks
/// not staged (moved away, as a share that went down) does not fail the
/// relocation: it waits, says so in `status`, and completes once the
/// repository answers again.
/// explore8 LOW: while it waited, the ETA grew from a decaying average.
#[test]
fn a_relocation_waiting_for_the_repository_gives_no_eta() {
    let rig = rig();
    let disks = rig.volumes();
    let (repo, away) = (
        rig.dir.path().join("repo"),
        rig.dir.path().join("repo.away"),
    );
    let r = rig.relocate_at(&disks, Some(0.2));
    let deadline = Instant::now() + Duration::from_secs(30);
    while r.status().bytes_copied == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing copied: {:?}",
            r.status()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::rename(&repo, &away).unwrap();
    loop {
        let st = r.status();
        if st
            .note
            .as_deref()
            .is_some_and(|n| n.contains("waiting for the repository"))
        {
            assert_eq!(st.eta_s, None, "{st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no wait shown: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::rename(&away, &repo).unwrap();
    let _ = r.cancel(false);
}

#[test]
fn a_repository_outage_during_the_copy_is_waited_out_and_the_relocation_completes() {
    let rig = rig();
    let disks = rig.volumes();
    let (repo, away) = (
        rig.dir.path().join("repo"),
        rig.dir.path().join("repo.away"),
    );
    std::fs::rename(&repo, &away).unwrap();
    // Slow (about 3 blocks a second): a pass outlasts the outage's end.
    let r = rig.relocate_at(&disks, Some(0.2));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = r.status();
        assert_ne!(st.state, State::Failed, "{st:?}");
        if st
            .note
            .as_deref()
            .is_some_and(|n| n.contains("waiting for the repository"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no wait shown: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::rename(&away, &repo).unwrap();
    // The note goes with the first block copied, not at the pass's end
    // (explore5 M4: it stayed for a whole pass).
    let back = Instant::now();
    while r
        .status()
        .note
        .is_some_and(|n| n.contains("waiting for the repository"))
    {
        assert!(back.elapsed() < Duration::from_secs(5), "{:?}", r.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ne!(
        r.state(),
        State::Done,
        "the copy was over before the note went"
    );
    assert_eq!(settle(&r), State::Done, "{:?}", r.status());
    for i in 0..2 {
        assert!(
            rig.target_bytes(i) == rig.images[i],
            "disk{i}'s target differs"
        );
    }
}

/// review24 M3: an I/O error of staging itself (its disk failing) is no
/// repository outage: the relocation fails naming it, it does not wait.
#[test]
fn a_staging_read_error_during_the_copy_fails_the_relocation_and_is_not_waited_out() {
    use crate::staging::io::fault::{Op, Rule};
    let rig = rig();
    let disks = rig.volumes();
    for d in &disks {
        d.read(0, (BLOCKS * BS) as u64 as usize).unwrap(); // every block staged
    }
    rig.faults
        .inject(Rule::fail(Op::Read, "disk0.data", libc::EIO));
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Failed, "{:?}", r.status());
    let st = r.status();
    assert!(
        st.note
            .as_deref()
            .is_none_or(|n| !n.contains("waiting for the repository")),
        "{st:?}"
    );
}
