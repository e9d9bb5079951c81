//! Readers (and writers) that joined a guest write's claim on a block
//! whose write then failed: the error is the writer's; they read the block
//! as it still is (the backup's bytes), on every path that can join a claim.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::tests::{fixture_on, Fixture};
use crate::disk::Spawner;
use crate::error::Result;
use crate::pool::WorkerPool;
use crate::staging::io::fault::{FaultyStorage, Op, Rule};
use crate::staging::io::OsStorage;

const BS: usize = 65536;
/// A block with backup data (every fifth block is a zero chunk).
const B: u64 = 1;

/// A fixture whose staging can be made to fail, and a full-block write of
/// block `B` held just after its claim: whoever reads or writes `B` now
/// joins that claim.
struct HeldWrite {
    f: Fixture,
    faults: FaultyStorage,
    go: mpsc::Sender<()>,
    writer: JoinHandle<Result<usize>>,
    /// Holders of the claim's slot while no one else waits on it.
    holders: usize,
}

impl HeldWrite {
    fn start(seed: u64) -> HeldWrite {
        let faults = FaultyStorage::new(OsStorage::shared());
        let f = fixture_on(8, seed, Arc::new(faults.clone()));
        let (held_tx, held_rx) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        let go_rx = std::sync::Mutex::new(go_rx);
        let at = B * BS as u64;
        // Only the full-block write (at the block's start) is held.
        *f.vol.claim_hook.lock() = Some(Arc::new(move |off, b| {
            if (off, b) == (at, B) {
                let _ = held_tx.send(());
                let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(60));
            }
        }));
        let v = f.vol.clone();
        let writer = std::thread::spawn(move || v.write(at, &vec![0xeeu8; BS]));
        held_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        let holders = Arc::strong_count(&f.vol.inflight.lock()[&B]);
        HeldWrite {
            f,
            faults,
            go,
            writer,
            holders,
        }
    }

    /// Waits until `n` waiters hold the claim's slot.
    fn joined(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Arc::strong_count(&self.f.vol.inflight.lock()[&B]) < self.holders + n {
            assert!(Instant::now() < deadline, "nobody joined the write's claim");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lets the write go on with its staging write failing (EIO); checks
    /// that the write itself failed.
    fn fail(self) -> Fixture {
        self.faults
            .inject(Rule::fail(Op::Write, "disk0.data", libc::EIO).times(1));
        self.go.send(()).unwrap();
        let e = self.writer.join().unwrap().expect_err("the write failed");
        assert_eq!(e.errno(), libc::EIO, "{e}");
        assert_eq!(self.faults.injected(), 1);
        *self.f.vol.claim_hook.lock() = None;
        self.f
    }
}

fn backup_bytes(f: &Fixture, off: u64, len: usize) -> &[u8] {
    &f.data[off as usize..][..len]
}

#[test]
fn a_read_within_one_block_joining_a_failed_writes_claim_gets_the_backup_bytes() {
    let h = HeldWrite::start(51);
    let v = h.f.vol.clone();
    let off = B * BS as u64 + 100;
    let reader = std::thread::spawn(move || v.read(off, 4096));
    h.joined(1);
    let f = h.fail();
    let got = reader
        .join()
        .unwrap()
        .expect("the read failed with the write's error");
    assert!(got[..] == *backup_bytes(&f, off, 4096), "wrong bytes");
}

#[test]
fn a_read_across_blocks_joining_a_failed_writes_claim_gets_the_backup_bytes() {
    let h = HeldWrite::start(52);
    let v = h.f.vol.clone();
    // Block 0 (a zero chunk) and the claimed block 1: the general path.
    let off = B * BS as u64 - 1000;
    let reader = std::thread::spawn(move || v.read(off, 3000));
    h.joined(1);
    let f = h.fail();
    let got = reader
        .join()
        .unwrap()
        .expect("the read failed with the write's error");
    assert!(got[..] == *backup_bytes(&f, off, 3000), "wrong bytes");
}

#[test]
fn a_read_waiting_later_on_a_failed_writes_claim_gets_the_backup_bytes() {
    let h = HeldWrite::start(53);
    let pool = WorkerPool::new("test-io", 1);
    let spawn: Spawner = Arc::new(move |job| pool.submit(job));
    let (tx, rx) = mpsc::channel();
    let off = B * BS as u64 + 100;
    let done: crate::disk::ReadDone = Box::new(move |r| tx.send(r).unwrap());
    assert!(
        h.f.vol.read_later(off, 4096, done, &spawn).is_ok(),
        "the read was given back"
    );
    // Registered on the claim's slot when `read_later` returned.
    h.joined(1);
    let f = h.fail();
    let got = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("answered")
        .expect("the read failed with the write's error");
    assert!(got[..] == *backup_bytes(&f, off, 4096), "wrong bytes");
    assert!(!f.vol.guest_busy());
}

/// The copier already ignored the outcome of a fill it waited for; kept
/// here so every path that can join a write's claim is covered.
#[test]
fn a_copy_read_waiting_on_a_failed_writes_claim_gets_the_backup_bytes() {
    let h = HeldWrite::start(54);
    let r = h.f.vol.start_copy_read(B);
    h.joined(1);
    let f = h.fail();
    let got = f.vol.finish_copy_read(B, r).unwrap();
    assert!(
        got[..] == *backup_bytes(&f, B * BS as u64, BS),
        "wrong bytes"
    );
}

#[test]
fn a_partial_write_waiting_on_a_failed_writes_claim_still_lands() {
    let h = HeldWrite::start(55);
    let v = h.f.vol.clone();
    let off = B * BS as u64 + 10;
    let writer = std::thread::spawn(move || v.write(off, b"second"));
    h.joined(1);
    let f = h.fail();
    writer
        .join()
        .unwrap()
        .expect("the partial write failed with the other write's error");
    let mut want = backup_bytes(&f, B * BS as u64, BS).to_vec();
    want[10..16].copy_from_slice(b"second");
    assert!(
        f.vol.read(B * BS as u64, BS).unwrap() == want,
        "wrong bytes"
    );
}

#[test]
fn a_write_that_panics_holding_a_claim_leaves_no_reader_waiting_forever() {
    let f = super::tests::fixture(8, 36);
    *f.vol.claim_hook.lock() = Some(Arc::new(|_, b| {
        if b == B {
            panic!("a bug in the write path");
        }
    }));
    let vol = f.vol.clone();
    let at = B * BS as u64;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        vol.write(at, &vec![7u8; BS])
    }));
    assert!(r.is_err(), "the hook did not panic");
    *f.vol.claim_hook.lock() = None;
    let (tx, rx) = mpsc::channel();
    let vol = f.vol.clone();
    std::thread::spawn(move || tx.send(vol.read(at, 10)).unwrap());
    let got = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a reader waits forever on the panicked write's claim");
    assert_eq!(got.unwrap(), f.data[BS..BS + 10]);
    assert!(!f.vol.guest_busy(), "the write still counts as in flight");
}
