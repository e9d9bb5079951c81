//! Defects of issue 10 that hung a thread: overlapping writes that
//! deadlocked, a panicking fetch that never answered its waiters, a fetch
//! still running when its volume closed. Each runs under a time limit.

use super::tests::fixture;
use super::*;
use parking_lot::Condvar;
use std::time::Instant;

const BS: usize = 65536;

/// Runs `f` on a thread and fails the test if it has not finished within
/// `limit` (a deadlock); the stuck thread is left behind.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}: deadlock"))
}

#[test]
fn overlapping_writes_that_each_cover_one_block_and_part_of_another_never_deadlock() {
    // Write B covers all of block 0 and the first half of block 1; write A
    // covers the second half of block 0 and all of block 1. Forced order:
    // B is done with block 0 before A starts, and A is done with block 1
    // before B goes on to block 1 (or, when A rightly waits for B's block
    // 0 and cannot get there, after 2 s). Claiming every fully covered
    // block first and waiting on the partly covered ones afterwards
    // deadlocks here: B holds 0 and waits for A's 1, A holds 1 and waits
    // for B's 0.
    let f = fixture(4, 11);
    let half = BS as u64 / 2;
    let (a_off, b_off) = (half, 0u64);
    let b_done_with_0 = Arc::new((Mutex::new(false), Condvar::new()));
    let a_done_with_1 = Arc::new((Mutex::new(false), Condvar::new()));
    let (b0, a1) = (b_done_with_0.clone(), a_done_with_1.clone());
    *f.vol.claim_hook.lock() = Some(Arc::new(move |off, b| {
        let signal = |c: &(Mutex<bool>, Condvar)| {
            *c.0.lock() = true;
            c.1.notify_all();
        };
        match (off, b) {
            (o, 0) if o == b_off => {
                signal(&b0);
                let mut g = a1.0.lock();
                let deadline = Instant::now() + Duration::from_secs(2);
                while !*g && Instant::now() < deadline {
                    a1.1.wait_until(&mut g, deadline);
                }
            }
            (o, 1) if o == a_off => signal(&a1),
            _ => {}
        }
    }));
    let vol = f.vol.clone();
    within(
        Duration::from_secs(30),
        "two overlapping writes",
        move || {
            let b = {
                let vol = vol.clone();
                std::thread::spawn(move || vol.write(b_off, &vec![2u8; BS + half as usize]))
            };
            let mut g = b_done_with_0.0.lock();
            while !*g {
                b_done_with_0.1.wait(&mut g);
            }
            drop(g);
            let a = std::thread::spawn(move || vol.write(a_off, &vec![1u8; BS + half as usize]));
            a.join().unwrap().unwrap();
            b.join().unwrap().unwrap();
        },
    );
    *f.vol.claim_hook.lock() = None;
    // Each byte holds one of the writes that covered it.
    let got = f.vol.read(0, 2 * BS).unwrap();
    for (j, &g) in got.iter().enumerate() {
        let (in_a, in_b) = (j as u64 >= half, (j as u64) < BS as u64 + half);
        assert!((in_a && g == 1) || (in_b && g == 2), "byte {j} is {g}");
    }
}

#[test]
fn many_overlapping_writes_at_half_block_offsets_all_complete() {
    let pairs = 300usize;
    let f = fixture(2 * pairs, 18);
    let vol = f.vol.clone();
    within(Duration::from_secs(60), "overlapping writes", move || {
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let half = BS as u64 / 2;
        let spawn = |who: u8| {
            let (vol, barrier) = (vol.clone(), barrier.clone());
            std::thread::spawn(move || {
                for i in 0..pairs as u64 {
                    barrier.wait();
                    let base = 2 * i * BS as u64;
                    let off = if who == 0 { base + half } else { base };
                    vol.write(off, &vec![who + 1; BS + half as usize]).unwrap();
                }
            })
        };
        let (a, b) = (spawn(0), spawn(1));
        a.join().unwrap();
        b.join().unwrap();
    });
}

#[test]
fn a_panicking_fetch_answers_its_waiters_with_an_error_and_the_next_fetch_works() {
    let f = fixture(8, 13);
    f.knobs.panic_next_chunk();
    let vol = f.vol.clone();
    let r = within(
        Duration::from_secs(20),
        "a read whose fetch panicked",
        move || vol.read(BS as u64, 10),
    );
    let e = r.expect_err("the read fails");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(e.to_string().contains("internal error"), "{e}");
    // The worker survived and the block is fetched on the next read.
    assert_eq!(f.vol.read(BS as u64, 10).unwrap(), f.data[BS..BS + 10]);
    // The waiter wakes before the worker has finished its bookkeeping.
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.vol.sched.status().running.on_demand != 0 {
        assert!(
            Instant::now() < deadline,
            "the scheduler's accounting never recovered"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn after_close_a_running_fetch_never_lands_in_staging() {
    let f = fixture(8, 14);
    f.knobs.close_gate();
    let vol = f.vol.clone();
    let reader = std::thread::spawn(move || vol.read(BS as u64, 10));
    while f.vol.status().fetches_in_flight == 0 {
        std::thread::yield_now();
    }
    // The fetch is past its start and blocked in the repository read.
    let vol = f.vol.clone();
    within(Duration::from_secs(5), "close", move || vol.close());
    f.knobs.open_gate();
    assert!(
        reader.join().unwrap().is_err(),
        "the released disk's read fails"
    );
    f.vol.quiesce(Duration::from_secs(10));
    let staged = std::fs::read(f.staging.join("disk0.data")).unwrap();
    assert!(
        staged[BS..2 * BS].iter().all(|&b| b == 0),
        "a released volume's fetch wrote into staging"
    );
}
