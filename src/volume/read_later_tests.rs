//! Reads that wait for a fetch holding no thread (`Volume::read_later`).

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::tests::fixture;
use crate::disk::{ReadDone, Spawner};
use crate::error::Result;
use crate::pool::WorkerPool;

const BS: usize = 65536;

/// A `ReadDone` that sends its answer (with a tag) down `tx`.
fn to(tx: &mpsc::Sender<(usize, Result<Bytes>)>, tag: usize) -> ReadDone {
    let tx = tx.clone();
    Box::new(move |r| tx.send((tag, r)).unwrap())
}

/// A one-thread pool whose thread is busy until the returned sender is
/// dropped: anything that needs the pool waits for that.
fn busy_pool() -> (Spawner, mpsc::Sender<()>) {
    let pool = WorkerPool::new("test-io", 1);
    let (hold, held) = mpsc::channel::<()>();
    pool.submit(move || while held.recv().is_ok() {});
    (Arc::new(move |job| pool.submit(job)), hold)
}

#[test]
fn misses_waiting_later_hold_no_thread_and_share_the_fetched_bytes() {
    let f = fixture(16, 31);
    let (pool, hold) = busy_pool();
    f.knobs.close_gate();
    let (tx, rx) = mpsc::channel();
    // Blocks 0, 5, 10, 15 are zero chunks; two reads of block 1 share its fetch.
    let reads: Vec<(usize, usize)> = [1, 2, 3, 4, 6, 7, 8, 9, 11, 12]
        .iter()
        .map(|&b| (b * BS + 100, 4096))
        .chain([(BS, BS)])
        .collect();
    for (i, &(off, len)) in reads.iter().enumerate() {
        let given_back = f.vol.read_later(off as u64, len, to(&tx, i), &pool);
        assert!(given_back.is_ok(), "read {i} was given back");
    }
    // The calls returned with every fetch held at the gate.
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    f.knobs.open_gate();
    let mut got: Vec<Option<Bytes>> = vec![None; reads.len()];
    for _ in 0..reads.len() {
        let (i, r) = rx.recv_timeout(Duration::from_secs(30)).expect("answered");
        got[i] = Some(r.unwrap());
    }
    for (&(off, len), b) in reads.iter().zip(&got) {
        assert_eq!(b.as_ref().unwrap()[..], f.data[off..off + len]);
    }
    // Readers are answered before their blocks are staged: let fills end.
    f.vol.quiesce(Duration::from_secs(30));

    // The two reads of block 1 are slices of one buffer.
    let (a, b) = (got[0].as_ref().unwrap(), got[10].as_ref().unwrap());
    assert_eq!(a.as_ptr() as usize - 100, b.as_ptr() as usize);
    let st = f.vol.status();
    // Readahead may have fetched blocks past the reads (they look
    // sequential); each block was fetched once, and nothing read back.
    assert!(st.fetched_blocks >= 10 && st.fetched_blocks == st.blocks_staged);
    assert_eq!(st.staging_reads, 0);
    assert_eq!(st.reads, reads.len() as u64);
    drop(hold);
}

#[test]
fn reads_that_are_local_or_span_blocks_are_given_back_for_the_blocking_path() {
    let f = fixture(8, 32);
    let (pool, _hold) = busy_pool();
    let (tx, _rx) = mpsc::channel();
    // Spanning blocks 1 and 2; a zero chunk; past the end.
    for (off, len) in [(2 * BS - 10, 20), (5 * BS, 4096), (100 * BS, 10)] {
        assert!(f
            .vol
            .read_later(off as u64, len, to(&tx, 0), &pool)
            .is_err());
    }
    // A staged block (the read is answered before the staging write ends).
    f.vol.read(3 * BS as u64, 10).unwrap();
    f.vol.quiesce(Duration::from_secs(30));
    assert!(f
        .vol
        .read_later(3 * BS as u64, 10, to(&tx, 0), &pool)
        .is_err());
    assert_eq!(
        f.vol.status().reads,
        1,
        "nothing counted for reads given back"
    );
}

#[test]
fn a_failed_fetch_answers_a_read_waiting_later_with_the_error() {
    let f = fixture(8, 33);
    let (pool, _hold) = busy_pool();
    let (tx, rx) = mpsc::channel();
    f.knobs.unreachable("chunks/");
    assert!(f
        .vol
        .read_later(2 * BS as u64, 512, to(&tx, 0), &pool)
        .is_ok());
    let (_, r) = rx.recv_timeout(Duration::from_secs(60)).expect("answered");
    assert!(r.is_err(), "an unreachable store gave bytes");
    f.vol.quiesce(Duration::from_secs(30));
    let st = f.vol.status();
    assert_eq!((st.fetch_errors, st.staging_write_errors), (1, 0));
    f.knobs.reachable();
    assert_eq!(
        f.vol.read(2 * BS as u64, 512).unwrap(),
        f.data[2 * BS..][..512]
    );
}

/// A disk whose staging writes to its data file take `delay` each.
fn slow_staging(seed: u64, delay: Duration) -> super::tests::Fixture {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    use crate::staging::io::OsStorage;
    let faults = FaultyStorage::new(OsStorage::shared());
    faults.inject(Rule::delay(Op::Write, "disk0.data", delay));
    super::tests::fixture_on(8, seed, Arc::new(faults))
}

#[test]
fn a_miss_is_answered_before_its_staging_write_and_a_write_to_the_block_waits_for_it() {
    let f = slow_staging(34, Duration::from_secs(3));
    let (pool, _hold) = busy_pool();
    let (tx, rx) = mpsc::channel();
    let off = BS as u64 + 100;
    assert!(f.vol.read_later(off, 4096, to(&tx, 0), &pool).is_ok());
    let (_, r) = rx.recv_timeout(Duration::from_secs(60)).expect("answered");
    assert_eq!(r.unwrap()[..], f.data[BS + 100..][..4096]);
    // Answered while the block's staging write is still held.
    assert_eq!(f.vol.status().blocks_staged, 0, "answered after staging");
    // A blocking reader of the same block also answers from the bytes,
    // without waiting for the staging write.
    assert_eq!(f.vol.read(BS as u64, 10).unwrap(), f.data[BS..BS + 10]);
    assert_eq!(
        f.vol.status().blocks_staged,
        0,
        "a reader waited for staging"
    );
    // A guest write of the whole block waits for the fill, so the
    // fetch's staging write never lands over it.
    let new = vec![0xa5u8; BS];
    f.vol.write(BS as u64, &new).unwrap();
    assert_eq!(f.vol.read(BS as u64, BS).unwrap(), new);
    let st = f.vol.status();
    assert_eq!((st.fetched_blocks, st.fetch_errors), (1, 0));
}

#[test]
fn a_failed_staging_write_after_the_answer_leaves_the_block_missing_and_it_is_fetched_again() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    use crate::staging::io::OsStorage;
    let faults = FaultyStorage::new(OsStorage::shared());
    let f = super::tests::fixture_on(8, 35, Arc::new(faults.clone()));
    faults.inject(Rule::fail(Op::Write, "disk0.data", libc::ENOSPC).times(1));
    let (pool, _hold) = busy_pool();
    let (tx, rx) = mpsc::channel();
    assert!(f
        .vol
        .read_later(2 * BS as u64, 512, to(&tx, 0), &pool)
        .is_ok());
    let (_, r) = rx.recv_timeout(Duration::from_secs(60)).expect("answered");
    // The bytes are the backup's, verified: the answer stands.
    assert_eq!(r.unwrap()[..], f.data[2 * BS..][..512]);
    f.vol.quiesce(Duration::from_secs(30));
    let st = f.vol.status();
    // Not a failed fetch: its read was answered.
    assert_eq!(
        (st.blocks_staged, st.fetch_errors, st.staging_write_errors),
        (0, 0, 1)
    );
    assert!(st.last_fetch_error.is_none());
    let e = st.last_staging_write_error.expect("kept for status");
    assert!(e.contains("No space left"), "{e}");
    assert_eq!(faults.injected(), 1);
    // Not present once the fill ended: the next read fetches it again,
    // and stages it.
    assert_eq!(
        f.vol.read(2 * BS as u64, 512).unwrap(),
        f.data[2 * BS..][..512]
    );
    f.vol.quiesce(Duration::from_secs(30));
    let st = f.vol.status();
    assert_eq!(
        (
            st.blocks_staged,
            st.fetched_blocks,
            st.fetch_errors,
            st.staging_write_errors
        ),
        (1, 1, 0, 1)
    );
}

/// A read across two blocks whose fetches' staging writes fail still gets
/// the verified bytes, as a read within one block does.
#[test]
fn a_read_across_blocks_gets_the_fetched_bytes_when_their_staging_writes_fail() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    use crate::staging::io::OsStorage;
    let faults = FaultyStorage::new(OsStorage::shared());
    let f = super::tests::fixture_on(8, 38, Arc::new(faults.clone()));
    faults.inject(Rule::fail(Op::Write, "disk0.data", libc::ENOSPC).times(2));
    let off = 2 * BS as u64 - 1000;
    let got = f.vol.read(off, 2000).unwrap();
    assert!(got[..] == f.data[off as usize..][..2000], "wrong bytes");
    f.vol.quiesce(Duration::from_secs(30));
    let st = f.vol.status();
    assert_eq!(
        (st.blocks_staged, st.fetch_errors, st.staging_write_errors),
        (0, 0, 2)
    );
}

/// A read that joined a write's fill has no bytes to answer from and goes
/// to the pool; if the pool drops that job unrun (a runtime shutting
/// down), the read no longer counts as a guest request in flight, which
/// would make a relocation copier yield to it forever.
#[test]
fn a_read_whose_pool_job_is_dropped_unrun_no_longer_counts_as_in_flight() {
    let f = fixture(16, 37);
    let (held_tx, held_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    *f.vol.claim_hook.lock() = Some(Arc::new(move |_, b| {
        if b == 1 {
            let _ = held_tx.send(());
            let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(60));
        }
    }));
    let v = f.vol.clone();
    let writer = std::thread::spawn(move || v.write(BS as u64, &vec![9; BS]));
    held_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let (tx, rx) = mpsc::channel();
    let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let d = dropped.clone();
    let drop_jobs: Spawner = Arc::new(move |job| {
        d.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        drop(job)
    });
    assert!(f
        .vol
        .read_later(BS as u64 + 100, 4096, to(&tx, 0), &drop_jobs)
        .is_ok());
    go_tx.send(()).unwrap();
    writer.join().unwrap().unwrap();
    *f.vol.claim_hook.lock() = None;
    assert_eq!(dropped.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(rx.try_recv().is_err(), "the dropped read was answered");
    assert!(
        !f.vol.guest_busy(),
        "a dropped read still counts as in flight"
    );
}

/// Readers waiting later are answered in turn by the thread that hands
/// over the bytes: one whose reply panics must not cost the others theirs.
#[test]
fn a_reply_that_panics_does_not_keep_the_other_readers_of_the_block_unanswered() {
    let f = fixture(8, 39);
    let (pool, _hold) = busy_pool();
    f.knobs.close_gate();
    let panics: ReadDone = Box::new(|_| panic!("a frontend's reply panicked"));
    let off = 2 * BS as u64;
    assert!(f.vol.read_later(off, 512, panics, &pool).is_ok());
    let (tx, rx) = mpsc::channel();
    assert!(f.vol.read_later(off + 512, 512, to(&tx, 1), &pool).is_ok());
    f.knobs.open_gate();
    let (_, r) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the second reader was never answered");
    assert_eq!(r.unwrap()[..], f.data[2 * BS + 512..][..512]);
}

#[test]
fn a_staged_read_never_waits_behind_misses_holding_the_export_points_queue() {
    let f = fixture(16, 34);
    f.vol.read(3 * BS as u64, BS).unwrap();
    f.vol.quiesce(Duration::from_secs(30));
    f.vol.set_queue(crate::placement::queue::IoQueue::new(2));
    let (pool, _hold) = busy_pool();
    f.knobs.close_gate();
    let (tx, rx) = mpsc::channel();
    // Two misses wait for their fetches, holding both slots of the queue.
    for (i, b) in [1usize, 2].into_iter().enumerate() {
        assert!(f
            .vol
            .read_later((b * BS) as u64, 4096, to(&tx, i), &pool)
            .is_ok());
    }
    let vol = f.vol.clone();
    let (hit_tx, hit_rx) = mpsc::channel();
    std::thread::spawn(move || {
        hit_tx
            .send(vol.read_bytes(3 * BS as u64 + 7, 4096))
            .unwrap()
    });
    let hit = hit_rx.recv_timeout(Duration::from_secs(1));
    f.knobs.open_gate();
    let hit = hit.expect("a read of a staged block waited for the misses' fetches");
    assert_eq!(hit.unwrap()[..], f.data[3 * BS + 7..3 * BS + 7 + 4096]);
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(30)).unwrap().1.unwrap();
    }
}
