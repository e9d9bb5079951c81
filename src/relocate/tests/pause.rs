//! Pause and resume: the copier stops promptly with every copied bit
//! true, and a pause outlives a restart.

use super::*;

#[test]
fn a_pause_stops_the_copier_promptly_keeps_every_copied_bit_true_and_resume_finishes() {
    let rig = rig();
    let disks = rig.volumes();
    // 3 MiB at 1 MB/s: about 3 s of copying.
    let r = rig.relocate_at(&disks, Some(1.0));
    let deadline = Instant::now() + Duration::from_secs(30);
    while r.status().bytes_done == 0 {
        assert!(Instant::now() < deadline, "no progress: {:?}", r.status());
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    let st = r.pause().unwrap();
    let took = t.elapsed();
    eprintln!("pause took {took:?}");
    assert_eq!(st.state, State::Paused);
    assert!(took < Duration::from_secs(1), "pause took {took:?}");
    // Recorded durably, for a restart.
    let meta = std::fs::read_to_string(rig.session_dir.join("relocation.json")).unwrap();
    assert!(meta.contains("\"paused\": true"), "{meta}");
    // Nothing moves while paused, and what is recorded is true.
    let before = r.status();
    std::thread::sleep(Duration::from_millis(400));
    let after = r.status();
    assert_eq!(after.state, State::Paused);
    assert_eq!(
        before.bytes_copied, after.bytes_copied,
        "copied while paused"
    );
    assert_eq!(before.bytes_done, after.bytes_done);
    assert!(
        before.bytes_done < before.bytes_total,
        "finished before the pause"
    );
    for i in 0..2 {
        let t = rig.target_bytes(i);
        for b in 0..BLOCKS {
            if r.copied_map(i).test(b as u64) {
                assert!(
                    t[b * BS..][..BS] == rig.images[i][b * BS..][..BS],
                    "disk{i} block {b} is marked copied over other bytes"
                );
            }
        }
    }
    // The guest goes on writing while paused.
    disks[1].write(2 * BS as u64, b"while paused").unwrap();
    let st = r.resume_copy().unwrap();
    assert_ne!(st.state, State::Paused);
    assert_eq!(settle(&r), State::Done);
    assert!(rig.target_bytes(0) == rig.images[0]);
    let mut want = rig.images[1].clone();
    want[2 * BS..][..12].copy_from_slice(b"while paused");
    assert!(rig.target_bytes(1) == want);
    // The rate limit held for the pipelined copy (paused time not counted).
    let st = r.status();
    assert!(
        st.rate_mbps <= 1.15,
        "copied at {:.2} MB/s over a 1 MB/s limit",
        st.rate_mbps
    );
    assert_eq!(r.pause().unwrap_err().kind(), ErrorKind::AlreadyExists);
}

#[test]
fn a_relocation_paused_before_a_restart_stays_paused_until_resumed() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate_at(&disks, Some(1.0));
    r.pause().unwrap();
    r.stop();
    drop((r, disks));
    let (disks, r) = rig.restart();
    let r = r.unwrap();
    r.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while r.state() != State::Paused {
        assert!(Instant::now() < deadline, "not paused: {:?}", r.status());
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(r.status().bytes_copied, 0, "a paused relocation copied");
    r.resume_copy().unwrap();
    assert_eq!(settle(&r), State::Done);
    assert!(disks.iter().all(|d| d.is_switched()));
    assert!(rig.target_bytes(0) == rig.images[0]);
}
