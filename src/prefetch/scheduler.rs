//! The one fetch scheduler every repository read goes through: a queue
//! per priority class and N worker threads.
//!
//! * A worker always takes an on-demand job first (a guest is waiting).
//! * Background classes (profile, relocation, readahead) may together hold
//!   at most `background_limit` workers, so some workers are always free
//!   for a miss, and the limit shrinks when on-demand latency rises.
//! * With an export point's [`IoQueue`], profile and readahead jobs also
//!   need an async slot of that queue, taken without waiting when the job
//!   is popped (a worker never blocks on the queue while a guest request
//!   may wait for its fetch). Relocation jobs run on the copier's slot,
//!   on-demand jobs on the guest request's.
//! * A job can be promoted: it is pushed again onto a more urgent queue and
//!   whichever copy a worker pops first runs it; the other is skipped.
//! * **Fair between sessions.** Each class queue keeps one FIFO per tenant
//!   (a recovery session) and serves the tenants with queued jobs in turn,
//!   one job each ([`FairQueue`]): one VM's hundred misses never queue
//!   ahead of another VM's one. Within a tenant the order is FIFO.
//! * **Memory back when idle.** Each fetch allocates and frees chunk-sized
//!   buffers on its worker thread; glibc keeps what a thread frees in that
//!   thread's arena, so after a burst of fetches 16 workers can hold tens
//!   of MiB no one uses (measured: ~50 MiB after 64 MiB read). When the
//!   scheduler goes idle after work, at most once a second, it gives the
//!   freed memory back (`util::trim_heap`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::Serialize;

use super::backoff::Backoff;
use super::Class;
use crate::metrics::LatencyHistogram;
use crate::placement::{queue::Ticket, IoClass, IoQueue};

type Work = Box<dyn FnOnce() + Send + 'static>;

/// Least time between two heap trims.
const TRIM_INTERVAL: Duration = Duration::from_secs(1);
type Popped = (Arc<Job>, Class, Option<Ticket>);

/// One queued fetch; shared between the queue(s) and the block's slot.
pub struct Job {
    work: Mutex<Option<Work>>,
    /// Bytes it moves, for the export point's queue.
    bytes: u64,
    class: AtomicU8,
    started: AtomicBool,
    queued_at: Instant,
    /// Whose job it is (jobs of one tenant run in FIFO order; tenants take
    /// turns).
    tenant: u64,
}

/// The tenant of a session's fetches: its VM name, hashed.
pub fn tenant_of(vm: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    vm.hash(&mut h);
    h.finish()
}

/// One class's queue: a FIFO per tenant, the tenants with queued jobs
/// served round-robin. A tenant is in `turns` exactly when its FIFO is
/// non-empty (copies of promoted jobs, already started elsewhere, are
/// dropped lazily when they reach a front).
#[derive(Default)]
struct FairQueue {
    fifos: HashMap<u64, VecDeque<Arc<Job>>>,
    turns: VecDeque<u64>,
}

impl FairQueue {
    fn push_back(&mut self, job: Arc<Job>) {
        let t = job.tenant;
        let q = self.fifos.entry(t).or_default();
        if q.is_empty() {
            self.turns.push_back(t);
        }
        q.push_back(job);
    }

    /// Ahead of its tenant's other jobs (a promotion); the tenant keeps
    /// its place in the turns.
    fn push_front(&mut self, job: Arc<Job>) {
        let t = job.tenant;
        let q = self.fifos.entry(t).or_default();
        if q.is_empty() {
            self.turns.push_back(t);
        }
        q.push_front(job);
    }

    /// The job whose turn it is, without taking it.
    fn front(&mut self) -> Option<&Arc<Job>> {
        while let Some(&t) = self.turns.front() {
            let q = self
                .fifos
                .get_mut(&t)
                .expect("a tenant in turns has a FIFO");
            while q.front().is_some_and(|j| j.started.load(Ordering::Acquire)) {
                q.pop_front();
            }
            if q.is_empty() {
                self.fifos.remove(&t);
                self.turns.pop_front();
                continue;
            }
            break;
        }
        let t = *self.turns.front()?;
        self.fifos.get(&t).and_then(VecDeque::front)
    }

    /// Takes the job whose turn it is; its tenant goes to the back.
    fn pop(&mut self) -> Option<Arc<Job>> {
        self.front()?;
        let t = self.turns.pop_front().expect("front found a tenant");
        let q = self
            .fifos
            .get_mut(&t)
            .expect("a tenant in turns has a FIFO");
        let job = q.pop_front().expect("front found a job");
        if q.is_empty() {
            self.fifos.remove(&t);
        } else {
            self.turns.push_back(t);
        }
        Some(job)
    }
}

impl Job {
    pub fn class(&self) -> Class {
        Class::from_u8(self.class.load(Ordering::Acquire))
    }
}

struct State {
    queues: [FairQueue; Class::COUNT],
    /// Jobs not yet started, by their current class.
    queued: [usize; Class::COUNT],
    running: [usize; Class::COUNT],
    backoff: Backoff,
    shutdown: bool,
    /// Jobs finished since the heap was last trimmed, and when that was.
    freed: bool,
    last_trim: Option<Instant>,
}

impl State {
    fn background_running(&self) -> usize {
        self.running[1..].iter().sum()
    }

    /// True (once) when work finished and nothing runs or waits, at most
    /// once a second: time to give freed memory back.
    fn trim_due(&mut self, now: Instant) -> bool {
        let idle = self.running.iter().chain(&self.queued).all(|&n| n == 0);
        let due = self
            .last_trim
            .is_none_or(|t| now.duration_since(t) >= TRIM_INTERVAL);
        if !(self.freed && idle && due) {
            return false;
        }
        self.freed = false;
        self.last_trim = Some(now);
        true
    }

    /// Pops the most urgent runnable job, skipping copies of jobs that a
    /// promotion already ran; with it, the async slot it needs.
    fn pop(&mut self, now: Instant, io: Option<&Arc<IoQueue>>) -> Option<Popped> {
        for c in Class::ALL {
            if c != Class::OnDemand && self.background_running() >= self.backoff.limit(now) {
                return None;
            }
            let q = &mut self.queues[c as usize];
            let Some(front) = q.front() else { continue };
            let ticket = match (io, c) {
                (Some(io), Class::Profile | Class::Readahead) => {
                    match io.try_enter(IoClass::Async, front.bytes) {
                        Some(t) => Some(t),
                        // Guest I/O has the point; relocation jobs (on
                        // the copier's slot) may still run.
                        None => continue,
                    }
                }
                _ => None,
            };
            let job = q.pop().expect("front exists");
            job.started.store(true, Ordering::Release);
            let class = job.class();
            self.queued[class as usize] -= 1;
            self.running[class as usize] += 1;
            return Some((job, class, ticket));
        }
        None
    }
}

struct Inner {
    state: Mutex<State>,
    /// The export point's queue, if any.
    io: Option<Arc<IoQueue>>,
    cv: Condvar,
    workers: usize,
    /// Queue wait plus fetch time of on-demand jobs.
    on_demand_latency: LatencyHistogram,
    /// The backoff's smoothed on-demand fetch time, readable without the
    /// state lock: every guest read asks for it (readahead sizing).
    latency_us: AtomicU64,
    /// Heap trims so far (see the module doc).
    trims: AtomicU64,
}

/// Shared by every volume of a daemon.
pub struct Scheduler {
    inner: Arc<Inner>,
}

/// The scheduler's figures for `status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SchedulerStatus {
    pub workers: usize,
    pub background_limit: usize,
    pub queued: ClassCounts,
    pub running: ClassCounts,
    pub on_demand_fetches: u64,
    pub on_demand_latency_mean_ms: f64,
    pub on_demand_latency_p99_ms: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct ClassCounts {
    pub on_demand: usize,
    pub profile: usize,
    pub relocation: usize,
    pub readahead: usize,
}

impl ClassCounts {
    fn from(a: &[usize; Class::COUNT]) -> Self {
        ClassCounts {
            on_demand: a[0],
            profile: a[1],
            relocation: a[2],
            readahead: a[3],
        }
    }
}

impl Scheduler {
    /// `workers` threads; at least a quarter of them (and at least one)
    /// stay reserved for on-demand fetches.
    pub fn new(name: &str, workers: usize) -> Arc<Scheduler> {
        Self::with_queue(name, workers, None)
    }

    /// A scheduler whose background fetches take async slots of `io`.
    pub fn with_queue(name: &str, workers: usize, io: Option<Arc<IoQueue>>) -> Arc<Scheduler> {
        let workers = workers.max(2);
        let reserved = (workers / 4).max(1);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                queues: Default::default(),
                queued: [0; Class::COUNT],
                running: [0; Class::COUNT],
                backoff: Backoff::new(workers - reserved),
                shutdown: false,
                freed: false,
                last_trim: None,
            }),
            io: io.clone(),
            cv: Condvar::new(),
            workers,
            on_demand_latency: LatencyHistogram::default(),
            latency_us: AtomicU64::new(0),
            trims: AtomicU64::new(0),
        });
        for i in 0..workers {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker(&inner))
                .expect("spawn fetch worker");
        }
        if let Some(io) = io {
            // A freed slot may admit a queued background job.
            let weak = Arc::downgrade(&inner);
            io.on_free(Box::new(move || {
                if let Some(i) = weak.upgrade() {
                    i.cv.notify_one();
                }
            }));
        }
        Arc::new(Scheduler { inner })
    }

    /// Queues `work` in `class`; the returned job can later be promoted.
    pub fn submit(&self, class: Class, work: impl FnOnce() + Send + 'static) -> Arc<Job> {
        self.submit_sized(class, 0, work)
    }

    /// `submit` for a job that moves `bytes` (what it costs the queue).
    pub fn submit_sized(
        &self,
        class: Class,
        bytes: u64,
        work: impl FnOnce() + Send + 'static,
    ) -> Arc<Job> {
        self.submit_for(0, class, bytes, work)
    }

    /// `submit_sized` on behalf of `tenant` (a session): tenants with
    /// queued jobs in a class take turns.
    pub fn submit_for(
        &self,
        tenant: u64,
        class: Class,
        bytes: u64,
        work: impl FnOnce() + Send + 'static,
    ) -> Arc<Job> {
        let job = Arc::new(Job {
            tenant,
            bytes,
            work: Mutex::new(Some(Box::new(work))),
            class: AtomicU8::new(class as u8),
            started: AtomicBool::new(false),
            queued_at: Instant::now(),
        });
        let mut st = self.inner.state.lock();
        st.queued[class as usize] += 1;
        st.queues[class as usize].push_back(job.clone());
        drop(st);
        self.wake(class);
        job
    }

    /// Moves a queued job to a more urgent class (a guest now waits for
    /// the block a prefetch queued). A started job is left alone: joining
    /// it is the fastest way to the data.
    pub fn promote(&self, job: &Arc<Job>, to: Class) {
        let mut st = self.inner.state.lock();
        let from = job.class();
        if to >= from || job.started.load(Ordering::Acquire) {
            return;
        }
        job.class.store(to as u8, Ordering::Release);
        st.queued[from as usize] -= 1;
        st.queued[to as usize] += 1;
        // The copy left in the old queue is skipped when popped.
        st.queues[to as usize].push_front(job.clone());
        drop(st);
        self.wake(to);
    }

    fn wake(&self, class: Class) {
        if class == Class::OnDemand {
            // Any idle worker may take it.
            self.inner.cv.notify_all();
        } else {
            self.inner.cv.notify_one();
        }
    }

    /// Jobs queued in `class` and not yet started.
    pub fn queued(&self, class: Class) -> usize {
        self.inner.state.lock().queued[class as usize]
    }

    /// A smoothed on-demand fetch latency (for readahead sizing).
    pub fn fetch_latency(&self) -> Duration {
        Duration::from_micros(self.inner.latency_us.load(Ordering::Relaxed))
    }

    pub fn status(&self) -> SchedulerStatus {
        let st = self.inner.state.lock();
        let h = &self.inner.on_demand_latency;
        SchedulerStatus {
            workers: self.inner.workers,
            background_limit: st.backoff.limit(Instant::now()),
            queued: ClassCounts::from(&st.queued),
            running: ClassCounts::from(&st.running),
            on_demand_fetches: h.count(),
            on_demand_latency_mean_ms: h.mean_us() / 1000.0,
            on_demand_latency_p99_ms: h.quantile_us(0.99) / 1000.0,
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.inner.state.lock().shutdown = true;
        self.inner.cv.notify_all();
    }
}

fn worker(inner: &Inner) {
    loop {
        let (job, class, ticket) = {
            let mut st = inner.state.lock();
            loop {
                if st.shutdown {
                    return;
                }
                let now = Instant::now();
                if let Some(j) = st.pop(now, inner.io.as_ref()) {
                    break j;
                }
                if st.trim_due(now) {
                    parking_lot::MutexGuard::unlocked(&mut st, crate::util::trim_heap);
                    inner.trims.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // A timeout lets a relaxed backoff limit admit queued work.
                inner.cv.wait_for(&mut st, Duration::from_millis(100));
            }
        };
        let work = job.work.lock().take();
        let started = Instant::now();
        if let Some(w) = work {
            // A panicking job must not take its worker (and the accounting
            // below) with it; the job itself answers its waiters.
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(w)) {
                tracing::error!(
                    "a {class:?} fetch job panicked: {}",
                    crate::util::panic_message(&p)
                );
            }
        }
        drop(ticket);
        let now = Instant::now();
        let mut st = inner.state.lock();
        st.running[class as usize] -= 1;
        st.freed = true;
        if class == Class::OnDemand {
            st.backoff.observe(now - started, now);
            let us = st.backoff.latency().as_micros() as u64;
            inner.latency_us.store(us, Ordering::Relaxed);
            inner.on_demand_latency.record(now - job.queued_at);
        }
        drop(st);
        // A background slot may have freed up.
        inner.cv.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    type Gate = Arc<(Mutex<bool>, Condvar)>;

    /// Submits a `class` job that holds its worker until the gate opens.
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
            "the miss ran on the reserved worker while background work waited"
        );
        open(&gate);
        while s.status().queued.readahead > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_sessions_one_miss_runs_before_another_sessions_hundred_queued_misses() {
        // Two workers, both held, so every miss below queues.
        let s = Scheduler::new("t", 2);
        let gates: Vec<Gate> = (0..2).map(|_| blocking_job(&s, Class::OnDemand)).collect();
        while s.status().running.on_demand < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let order = Arc::new(Mutex::new(Vec::new()));
        for i in 0..100 {
            let o = order.clone();
            s.submit_for(1, Class::OnDemand, 0, move || o.lock().push((1, i)));
        }
        let o = order.clone();
        s.submit_for(2, Class::OnDemand, 0, move || o.lock().push((2, 0)));
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
}
