//! The session uploader with real threads: racing guest writes never put
//! a stale chunk into a live backup; a finished upload leaves the backup
//! nothing to read; each generation's record replaces the last.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::*;
use crate::session::UploadRequest;

/// The disk-0 bytes of backup `id`, read back from the repository.
fn restore(r: &Rig, vm: &str, id: &str) -> Vec<u8> {
    crate::testutil::disk_bytes(&r.repo, &r.repo.manifest(vm, id).unwrap().disks[0])
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn guest_writes_racing_the_uploader_never_put_a_stale_chunk_in_a_live_backup() {
    let r = rig();
    let (_, _) = backup(&r, "vm", 51, 48);
    r.ds.recover("vm", None).unwrap();
    let d = disk(&r, "vm");
    r.ds.start_upload("vm", UploadRequest::default()).unwrap();
    for round in 0..3u64 {
        // A guest hammering a few blocks (full, partial, zeroing writes)
        // while the uploader stores them.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (d, stop) = (d.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(round);
                while !stop.load(Ordering::Relaxed) {
                    let b = rng.gen_range(0..12u64) * 3 + round;
                    match rng.gen_range(0..4) {
                        0 => d.write_zeroes(b * BS as u64, BS as u64).unwrap(),
                        1 => d
                            .write(b * BS as u64 + 17, &[rng.gen(); 300])
                            .map(|_| ())
                            .unwrap(),
                        _ => {
                            let mut buf = vec![0u8; BS];
                            rng.fill(&mut buf[..]);
                            d.write(b * BS as u64, &buf).map(|_| ()).unwrap()
                        }
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(1500));
        // On a busy machine the uploader may not have stored anything yet:
        // the race needs it to have.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while r.ds.upload_status("vm").unwrap().stored_blocks == 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let st = r.ds.upload_status("vm").unwrap();
        assert!(st.stored_blocks > 0, "{st:?}");
        // The disk as the backup must find it (no writes from here on);
        // the uploader keeps running into the backup.
        let at_freeze = d.read(0, 48 * BS).unwrap();
        let rep = r.ds.backup_session("vm").unwrap();
        let dr = &rep.disks[0];
        assert_eq!(
            dr.blocks_read + dr.blocks_uploaded,
            dr.blocks_frozen,
            "{dr:?}"
        );
        assert_eq!(dr.uploaded_missing, 0);
        assert!(
            restore(&r, "vm", &rep.backup) == at_freeze,
            "round {round}: the backup is not the disk at the freeze ({dr:?}, {st:?})"
        );
        // The generation moved on: its record is the only one.
        let s = r.ds.session("vm").unwrap();
        let g = round + 1;
        assert!(s.dir.join(format!("disk0.uploaded-{g}")).exists());
        assert!(!s.dir.join(format!("disk0.uploaded-{round}")).exists());
        assert_eq!(r.ds.upload_status("vm").unwrap().generation, g);
    }
    // Quiet guest: the uploader finishes, the backup reads nothing.
    d.write(40 * BS as u64, &vec![7u8; BS]).unwrap();
    d.write(41 * BS as u64, &vec![8u8; BS]).unwrap();
    wait_for("the upload of 2 blocks", || {
        let st = r.ds.upload_status("vm").unwrap();
        st.residue == 0 && st.blocks_uploaded == 2
    });
    let at_freeze = d.read(0, 48 * BS).unwrap();
    let rep = r.ds.backup_session("vm").unwrap();
    let dr = &rep.disks[0];
    assert_eq!(
        (dr.blocks_frozen, dr.blocks_uploaded, dr.blocks_read),
        (2, 2, 0)
    );
    assert_eq!(rep.read_bytes, 0);
    assert!(restore(&r, "vm", &rep.backup) == at_freeze);
    let st = r.ds.stop_upload("vm").unwrap();
    assert_eq!(st.state, "stopped");
    assert!(!r.ds.session("vm").unwrap().dir.join("upload.json").exists());
    r.ds.release("vm", true).unwrap();
}

#[test]
fn the_uploader_halts_while_the_sessions_guest_io_is_over_its_latency_limit_and_goes_on_after() {
    let r = rig();
    backup(&r, "vm", 52, 16);
    r.ds.recover("vm", None).unwrap();
    let d = disk(&r, "vm");
    for b in 0..8u64 {
        d.write(b * BS as u64, &vec![b as u8 + 1; BS]).unwrap();
    }
    // A guest reading staged blocks all along: every request takes more
    // than the 1 µs limit (reads add no upload work).
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (d, stop) = (d.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                d.read((i % 8) * BS as u64, BS).unwrap();
                i += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let req = UploadRequest {
        load_limit: Some("latency=0.001".into()),
    };
    r.ds.start_upload("vm", req).unwrap();
    wait_for("halted", || {
        r.ds.upload_status("vm").unwrap().state == "halted"
    });
    std::thread::sleep(Duration::from_millis(1500));
    let st = r.ds.upload_status("vm").unwrap();
    assert_eq!(st.state, "halted", "{st:?}");
    assert!(st.why.contains("I/O latency"), "{}", st.why);
    assert!(st.load.unwrap().latency_ms > 0.00125, "{st:?}");
    assert_eq!(st.stored_blocks, 0, "it read while halted: {st:?}");
    assert_eq!(st.residue, 8);
    let session = r.ds.status(&r.ds.session("vm").unwrap());
    assert_eq!(
        session.upload.expect("in the session's status").state,
        "halted"
    );
    // The guest goes quiet: the uploader copies again and finishes.
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    wait_for("the upload after the load fell", || {
        r.ds.upload_status("vm").unwrap().residue == 0
    });
    let st = r.ds.upload_status("vm").unwrap();
    assert_eq!((st.stored_blocks, st.blocks_uploaded), (8, 8), "{st:?}");
    assert!(st.held_ms >= 1500.0, "{st:?}");
    let rep = r.ds.backup_session("vm").unwrap();
    assert_eq!(
        (rep.disks[0].blocks_uploaded, rep.disks[0].blocks_read),
        (8, 0)
    );
    r.ds.release("vm", true).unwrap();
}

#[test]
fn uploaded_chunks_collected_while_no_uploader_ran_are_read_by_the_backup_and_it_is_exact() {
    let r = rig();
    backup(&r, "vm", 53, 16);
    r.ds.recover("vm", None).unwrap();
    let d = disk(&r, "vm");
    for b in 0..6u64 {
        d.write(b * BS as u64 + 5, &[b as u8 + 1; 1000]).unwrap();
    }
    r.ds.start_upload("vm", UploadRequest::default()).unwrap();
    wait_for("the upload of 6 blocks", || {
        r.ds.upload_status("vm").unwrap().blocks_uploaded == 6
    });
    // While it runs, gc keeps its chunks (its writer lock).
    let opts = |wait| crate::repo::gc::GcOptions {
        dry_run: false,
        wait: Duration::from_millis(wait),
    };
    let referrers = [crate::repo::gc::MANIFESTS];
    assert!(crate::repo::gc::collect(&r.repo, &referrers, opts(300)).is_err());
    // Stopped, the chunks no manifest names yet are collected.
    r.ds.stop_upload("vm").unwrap();
    let rep = crate::repo::gc::collect(&r.repo, &referrers, opts(0)).unwrap();
    assert!(rep.removed_chunks >= 6, "{rep:?}");
    let at_freeze = d.read(0, 16 * BS).unwrap();
    let b = r.ds.backup_session("vm").unwrap();
    let dr = &b.disks[0];
    assert_eq!(
        (dr.blocks_uploaded, dr.uploaded_missing, dr.blocks_read),
        (0, 6, 6)
    );
    assert!(restore(&r, "vm", &b.backup) == at_freeze);
    r.ds.release("vm", true).unwrap();
}

#[test]
fn the_uploaders_status_after_a_stop_says_stopped_and_never_started_is_not_found() {
    let r = rig();
    backup(&r, "vm", 54, 16);
    r.ds.recover("vm", None).unwrap();
    let e = r.ds.upload_status("vm").unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::NotFound, "{e}");
    let d = disk(&r, "vm");
    d.write(5, &[1; 1000]).unwrap();
    r.ds.start_upload("vm", UploadRequest::default()).unwrap();
    wait_for("the upload of 1 block", || {
        r.ds.upload_status("vm").unwrap().blocks_uploaded == 1
    });
    r.ds.stop_upload("vm").unwrap();
    let st = r.ds.upload_status("vm").unwrap();
    assert_eq!((st.state.as_str(), st.running), ("stopped", false));
    assert_eq!(st.blocks_uploaded, 1, "{st:?}");
    let s = r.ds.session("vm").unwrap();
    assert_eq!(r.ds.status(&s).upload.expect("shown").state, "stopped");
    // A second stop says the same, and a start runs it again.
    assert_eq!(r.ds.stop_upload("vm").unwrap().state, "stopped");
    r.ds.start_upload("vm", UploadRequest::default()).unwrap();
    assert_ne!(r.ds.upload_status("vm").unwrap().state, "stopped");
    r.ds.release("vm", true).unwrap();
}
