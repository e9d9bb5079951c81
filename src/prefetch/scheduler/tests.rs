use super::*;
use std::sync::atomic::AtomicUsize;

use parking_lot::Condvar;

use crate::repo::testing::{Knobs, TestBackend};
use crate::repo::Backend;

mod engine;

type Gate = Arc<(Mutex<bool>, Condvar)>;

/// Submits a `class` job that holds its in-flight place (and a CPU thread)
/// until the gate opens.
fn blocking_job(s: &Scheduler, class: Class) -> Gate {
    let gate: Gate = Arc::new((Mutex::new(false), Condvar::new()));
    let g = gate.clone();
    s.submit(class, move || {
        let mut open = g.0.lock();
        while !*open {
            g.1.wait(&mut open);
        }
    });
    gate
}

fn open(gate: &Gate) {
    *gate.0.lock() = true;
    gate.1.notify_all();
}

/// Waits up to 5 s for the scheduler's trim count to reach `n`.
fn wait_trims(s: &Scheduler, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.inner.trims.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    s.inner.trims.load(Ordering::Relaxed)
}

#[test]
fn freed_memory_goes_back_once_the_scheduler_is_idle_never_while_it_works() {
    let s = Scheduler::new("trim", 4);
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(s.inner.trims.load(Ordering::Relaxed), 0, "nothing ran yet");
    s.submit(Class::Profile, || drop(vec![1u8; 4 << 20]));
    assert_eq!(wait_trims(&s, 1), 1, "idle after work: one trim");
    // A job finishes while another still runs: no trim until both end.
    let gate = blocking_job(&s, Class::OnDemand);
    s.submit(Class::Profile, || drop(vec![1u8; 4 << 20]));
    std::thread::sleep(TRIM_INTERVAL + Duration::from_millis(300));
    assert_eq!(
        s.inner.trims.load(Ordering::Relaxed),
        1,
        "trimmed while busy"
    );
    open(&gate);
    assert_eq!(wait_trims(&s, 2), 2);
    // Idle without new work: nothing more to give back.
    std::thread::sleep(TRIM_INTERVAL + Duration::from_millis(300));
    assert_eq!(s.inner.trims.load(Ordering::Relaxed), 2);
}

#[test]
fn on_demand_jobs_run_before_queued_background_jobs() {
    let s = Scheduler::new("t", 2);
    let order = Arc::new(Mutex::new(Vec::new()));
    // Occupy the one background slot so the queue builds up.
    let gate = blocking_job(&s, Class::Profile);
    for i in 0..20 {
        let o = order.clone();
        s.submit(Class::Readahead, move || o.lock().push(("readahead", i)));
    }
    let done = Arc::new(AtomicUsize::new(0));
    let (o, d) = (order.clone(), done.clone());
    s.submit(Class::OnDemand, move || {
        o.lock().push(("on-demand", 0));
        d.fetch_add(1, Ordering::SeqCst);
    });
    while done.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        order.lock().first(),
        Some(&("on-demand", 0)),
        "the miss ran in the reserved place while background work waited"
    );
    open(&gate);
    while s.status().queued.readahead > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_sessions_one_miss_runs_before_another_sessions_hundred_queued_misses() {
    // Two places in flight, both held, so every miss below queues.
    let s = Scheduler::new("t", 2);
    let gates: Vec<Gate> = (0..2).map(|_| blocking_job(&s, Class::OnDemand)).collect();
    while s.status().running.on_demand < 2 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let order = Arc::new(Mutex::new(Vec::new()));
    let pushed = Arc::new(parking_lot::Condvar::new());
    for i in 0..100 {
        let (o, cv) = (order.clone(), pushed.clone());
        // Two CPU threads run jobs at once, so two started in order may
        // record out of order: a job waits (briefly) for its predecessor's
        // record, which makes the record the start order when starts are
        // FIFO, and shows a job started before its predecessor otherwise.
        s.submit_for(1, Class::OnDemand, 0, move || {
            let mut g = o.lock();
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while i > 0 && !g.contains(&(1, i - 1)) && std::time::Instant::now() < deadline {
                cv.wait_until(&mut g, deadline);
            }
            g.push((1, i));
            cv.notify_all();
        });
    }
    let (o, cv) = (order.clone(), pushed.clone());
    s.submit_for(2, Class::OnDemand, 0, move || {
        o.lock().push((2, 0));
        cv.notify_all();
    });
    for g in &gates {
        open(g);
    }
    while order.lock().len() < 101 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let pos = order.lock().iter().position(|&(t, _)| t == 2).unwrap();
    assert!(
        pos <= 2,
        "session 2's miss ran {pos}th, behind session 1's queue"
    );
    // Session 1's own misses kept their order.
    let ones: Vec<i32> = order
        .lock()
        .iter()
        .filter(|x| x.0 == 1)
        .map(|x| x.1)
        .collect();
    assert_eq!(ones, (0..100).collect::<Vec<_>>());
}

#[test]
fn fair_queue_takes_tenants_in_turn_and_skips_copies_of_started_jobs() {
    let job = |tenant: u64| {
        Arc::new(Job {
            work: Mutex::new(None),
            bytes: 0,
            class: AtomicU8::new(0),
            started: AtomicBool::new(false),
            queued_at: Instant::now(),
            tenant,
        })
    };
    let mut q = FairQueue::default();
    let a: Vec<_> = (0..3).map(|_| job(1)).collect();
    let b = job(2);
    for j in &a {
        q.push_back(j.clone());
    }
    q.push_back(b.clone());
    a[1].started.store(true, Ordering::Release); // ran from another queue
    let got: Vec<u64> = std::iter::from_fn(|| q.pop()).map(|j| j.tenant).collect();
    assert_eq!(got, vec![1, 2, 1], "a1 skipped; tenants alternate");
    assert!(q.fifos.is_empty() && q.turns.is_empty());
}

#[test]
fn a_promoted_job_runs_once_and_ahead_of_its_old_class() {
    let s = Scheduler::new("t", 2);
    let gate = blocking_job(&s, Class::Relocation);
    let runs = Arc::new(AtomicUsize::new(0));
    let mut jobs = vec![];
    for _ in 0..10 {
        let r = runs.clone();
        jobs.push(s.submit(Class::Readahead, move || {
            r.fetch_add(1, Ordering::SeqCst);
        }));
    }
    assert_eq!(s.queued(Class::Readahead), 10);
    s.promote(&jobs[9], Class::OnDemand);
    assert_eq!(s.queued(Class::Readahead), 9);
    // The background slot is still held, so only the promoted job can run.
    while runs.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    open(&gate);
    while runs.load(Ordering::SeqCst) < 10 {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(runs.load(Ordering::SeqCst), 10, "no job ran twice");
    assert_eq!(s.status().queued, ClassCounts::default());
}

#[test]
fn background_fetches_wait_for_a_free_async_slot_and_relocation_fetches_do_not() {
    let io = IoQueue::new(4); // three async slots at most
    let s = Scheduler::with_queue("t", 4, Some(io.clone()));
    // Guest requests fill the point.
    let guests: Vec<_> = (0..4).map(|_| io.enter(IoClass::Sync, 4096)).collect();
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    s.submit_sized(Class::Profile, 65536, move || {
        r.fetch_add(1, Ordering::SeqCst);
    });
    let r = ran.clone();
    s.submit_sized(Class::Relocation, 65536, move || {
        r.fetch_add(10, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        ran.load(Ordering::SeqCst),
        10,
        "only the relocation fetch (on its copier's slot) ran"
    );
    drop(guests);
    while ran.load(Ordering::SeqCst) != 11 {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        io.snapshot().inflight_requests,
        0,
        "the profile job's slot was given back"
    );
}

/// Waits up to 10 s until nothing runs or waits.
fn wait_idle(s: &Scheduler) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.inner.state.lock().is_idle() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(s.inner.state.lock().is_idle(), "jobs still running");
}

#[test]
fn status_reports_how_long_a_miss_waited_for_an_in_flight_place() {
    // Two places, both held: the third miss queues until one frees.
    let s = Scheduler::new("qwait", 2);
    let gates = [
        blocking_job(&s, Class::OnDemand),
        blocking_job(&s, Class::OnDemand),
    ];
    s.submit(Class::OnDemand, || ());
    std::thread::sleep(Duration::from_millis(150));
    gates.iter().for_each(open);
    wait_idle(&s);
    let st = s.status();
    assert!(
        st.on_demand_queue_wait_p99_ms >= 120.0,
        "queue wait p99 {} ms",
        st.on_demand_queue_wait_p99_ms
    );
    assert!(st.on_demand_queue_wait_mean_ms > 0.0);
}

#[test]
fn status_reports_how_long_a_miss_waited_for_a_cpu_thread() {
    // Every CPU thread busy with a held job; places are plenty, so the
    // next miss starts at once but its prepare waits for a thread.
    let s = Scheduler::new("cwait", 64);
    let gates: Vec<Gate> = (0..s.inner.cpu.threads())
        .map(|_| blocking_job(&s, Class::OnDemand))
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    s.submit(Class::OnDemand, || ());
    std::thread::sleep(Duration::from_millis(150));
    gates.iter().for_each(open);
    wait_idle(&s);
    let st = s.status();
    assert!(
        st.on_demand_cpu_wait_p99_ms >= 120.0,
        "CPU wait p99 {} ms",
        st.on_demand_cpu_wait_p99_ms
    );
    assert!(
        st.on_demand_queue_wait_p99_ms < 100.0,
        "it did not queue: {} ms",
        st.on_demand_queue_wait_p99_ms
    );
}
