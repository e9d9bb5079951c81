//! The engine with real GETs: a local repository directory behind the
//! test backend, whose injected latency is a timer (asynchronous reads).

use super::*;

/// `n` objects of 4 KiB under `chunks/` (the keys the latency knob slows).
fn objects(n: usize) -> (tempfile::TempDir, Arc<TestBackend>, Knobs, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let knobs = Knobs::default();
    let b = Arc::new(TestBackend::new(dir.path(), knobs.clone()));
    // A local backend makes directories only in a repository (its repo.json).
    b.put("repo.json", b"{}").unwrap();
    let keys: Vec<String> = (0..n)
        .map(|i| format!("chunks/{:02x}/{i:06}", i % 256))
        .collect();
    for (i, k) in keys.iter().enumerate() {
        b.put(k, &vec![i as u8; 4096]).unwrap();
    }
    (dir, b, knobs, keys)
}

/// Completions, in order: (tenant, index, bytes ok).
type Log = Arc<Mutex<Vec<(u64, usize, bool)>>>;

/// A job that GETs `key` and logs its completion.
fn get_job(
    s: &Scheduler,
    b: &Arc<TestBackend>,
    tenant: u64,
    class: Class,
    key: &str,
    i: usize,
    log: &Log,
) {
    let (b, key, log) = (b.clone(), key.to_string(), log.clone());
    s.submit_for(tenant, class, 4096, move || Step::Get {
        request: b.get_async(&key, 1 << 20),
        then: Box::new(move |got: Got| {
            let ok = got.unwrap().is_some_and(|d| d == vec![i as u8; 4096]);
            log.lock().push((tenant, i, ok));
        }),
    });
}

fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Threads of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with(prefix))
        .count()
}

#[test]
fn ninety_six_gets_are_in_flight_at_once_on_a_handful_of_threads() {
    const IN_FLIGHT: usize = 96;
    let (_dir, b, knobs, keys) = objects(2 * IN_FLIGHT);
    knobs.chunk_delay(400);
    let s = Scheduler::new("inflt", IN_FLIGHT);
    let log: Log = Arc::default();
    for (i, k) in keys.iter().enumerate() {
        get_job(&s, &b, 0, Class::OnDemand, k, i, &log);
    }
    wait_for("a full engine", 30, || {
        knobs.chunk_reads_in_flight() as usize >= IN_FLIGHT
    });
    let threads = threads_named("inflt");
    let cpu = s.status().cpu_threads;
    assert_eq!(s.status().gets_in_flight, IN_FLIGHT);
    assert!(
        threads <= 1 + LOCAL_READERS + cpu && threads < IN_FLIGHT / 3,
        "{threads} engine threads for {IN_FLIGHT} GETs in flight"
    );
    wait_for("every GET", 60, || log.lock().len() == keys.len());
    assert!(
        log.lock().iter().all(|&(_, _, ok)| ok),
        "a GET read wrong bytes"
    );
    assert_eq!(
        knobs.peak_chunk_reads_in_flight() as usize,
        IN_FLIGHT,
        "never more GETs than the setting"
    );
    assert!(
        threads_named("inflt") <= 1 + LOCAL_READERS + cpu,
        "threads grew with the work done"
    );
}

#[test]
fn a_sessions_one_get_is_served_ahead_of_another_sessions_hundred_queued_gets() {
    let (_dir, b, knobs, keys) = objects(101);
    knobs.chunk_delay(50);
    let s = Scheduler::new("fairget", 4);
    let log: Log = Arc::default();
    for (i, k) in keys[..100].iter().enumerate() {
        get_job(&s, &b, 1, Class::OnDemand, k, i, &log);
    }
    get_job(&s, &b, 2, Class::OnDemand, &keys[100], 100, &log);
    wait_for("every GET", 60, || log.lock().len() == 101);
    let log = log.lock();
    assert!(log.iter().all(|&(_, _, ok)| ok));
    let pos = log.iter().position(|&(t, _, _)| t == 2).unwrap();
    // The four GETs already running, then a round of four started in
    // turns (session 1, session 2, ...) that may finish in any order;
    // without turns it would be 100th.
    assert!(
        pos <= 7,
        "session 2's GET finished {pos}th, behind session 1's queue"
    );
    let ones: Vec<usize> = log.iter().filter(|x| x.0 == 1).map(|x| x.1).collect();
    assert_eq!(ones.len(), 100);
}

#[test]
fn an_on_demand_get_overtakes_queued_background_gets() {
    let (_dir, b, knobs, keys) = objects(61);
    knobs.chunk_delay(50);
    // Eight in flight: background may hold six, two stay for misses.
    let s = Scheduler::new("odget", 8);
    let log: Log = Arc::default();
    for (i, k) in keys[..60].iter().enumerate() {
        get_job(&s, &b, 1, Class::Readahead, k, i, &log);
    }
    wait_for("background GETs under way", 30, || {
        knobs.chunk_reads_in_flight() >= 6
    });
    assert_eq!(
        s.status().running.readahead,
        6,
        "two places kept for misses"
    );
    let t0 = Instant::now();
    get_job(&s, &b, 1, Class::OnDemand, &keys[60], 60, &log);
    wait_for("the miss", 30, || log.lock().iter().any(|x| x.1 == 60));
    let took = t0.elapsed();
    let before = log.lock().len() - 1;
    assert!(
        before <= 12,
        "{before} background GETs finished before the miss"
    );
    assert!(
        took < Duration::from_millis(50 * 8),
        "the miss took {took:?}: it waited for the background queue"
    );
    wait_for("every GET", 60, || log.lock().len() == 61);
    assert!(log.lock().iter().all(|&(_, _, ok)| ok));
}

#[test]
fn jobs_left_when_the_engine_stops_are_dropped_so_their_owners_answer() {
    let (_dir, b, knobs, keys) = objects(8);
    knobs.close_gate();
    let s = Scheduler::new("stop", 2);
    /// Counts its drops: what a volume's fetch does to answer its waiters.
    struct Owner(Arc<AtomicUsize>);
    impl Drop for Owner {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicUsize::new(0));
    for k in &keys {
        let (b, k, owner) = (b.clone(), k.clone(), Owner(dropped.clone()));
        s.submit(Class::OnDemand, move || Step::Get {
            request: b.get_async(&k, 1 << 20),
            then: Box::new(move |_| drop(owner)),
        });
    }
    wait_for("two gated GETs", 30, || knobs.chunk_reads_in_flight() == 2);
    drop(s);
    // Two GETs were under way, six jobs queued: all eight owners go.
    wait_for("every owner dropped", 30, || {
        dropped.load(Ordering::SeqCst) == 8
    });
    knobs.open_gate();
}

#[test]
fn status_splits_a_misss_time_into_its_get_and_its_finish() {
    let (_dir, b, knobs, keys) = objects(1);
    knobs.chunk_delay(200);
    let s = Scheduler::new("stages", 4);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (b2, key, d) = (b.clone(), keys[0].clone(), done.clone());
    s.submit(Class::OnDemand, move || Step::Get {
        request: b2.get_async(&key, 1 << 20),
        then: Box::new(move |got: Got| {
            assert!(got.unwrap().is_some());
            // The finish's own work: verify, stage, answer.
            std::thread::sleep(Duration::from_millis(150));
            d.store(true, std::sync::atomic::Ordering::Release);
        }),
    });
    wait_for("the miss", 30, || {
        done.load(std::sync::atomic::Ordering::Acquire)
    });
    wait_for("its accounting", 30, || s.status().on_demand_fetches == 1);
    let st = s.status();
    assert!(
        (180.0..1000.0).contains(&st.on_demand_get_p99_ms),
        "GET stage {} ms",
        st.on_demand_get_p99_ms
    );
    assert!(
        (130.0..1000.0).contains(&st.on_demand_finish_p99_ms),
        "finish stage {} ms",
        st.on_demand_finish_p99_ms
    );
    assert!(st.on_demand_latency_p99_ms >= st.on_demand_get_p99_ms);
}
