//! The fetch engine every repository read of a live disk goes through: a
//! queue per priority class, a bounded number of GETs in flight on an
//! asynchronous runtime, and a few CPU threads for the rest of a fetch.
//!
//! **A job's life.** A volume submits a job (a closure) for a tenant and a
//! class. When the queues let it start, the job runs in three stages:
//! 1. *prepare*, on a CPU thread: the closure checks and takes what it
//!    needs (staging room) and returns a [`Step`]: done already, or a GET
//!    to make (a not-yet-started future from `Backend::get_async`) and
//!    what to do with its outcome;
//! 2. *GET*, on the engine's own tokio runtime (one worker thread plus a
//!    bounded blocking pool for local-directory reads): no thread waits
//!    for the store, so `max_in_flight` (default 64, `serve
//!    --fetches-in-flight`) GETs cost a handful of threads, not one each;
//!    S3 requests run on the S3 backend's runtime, which owns its
//!    connections, and the engine only awaits them;
//! 3. *finish*, on a CPU thread: verify, decompress, answer the readers,
//!    write staging, end the fill.
//!
//! The CPU threads ([`cpu`]) are about one per core and take the most
//! urgent class first, so a miss's decompression never queues behind a
//! burst of readahead. A job counts as running (and holds its export
//! point's ticket) from prepare to the end of finish.
//!
//! **Which job starts next** is decided under one lock whenever a job is
//! submitted, promoted or finished, an export point's slot frees up, or
//! every 100 ms (a relaxed backoff may admit more):
//! * On-demand jobs first (a guest is waiting), up to `max_in_flight`.
//! * Background classes (profile, relocation, readahead) may together
//!   hold at most `background_limit` of the in-flight places, so some are
//!   always free for a miss, and the limit shrinks when on-demand latency
//!   rises ([`super::backoff`]).
//! * With an export point's [`IoQueue`], profile and readahead jobs also
//!   need an async slot of that queue, taken without waiting when the job
//!   is popped (nothing ever blocks on the queue while a guest request may
//!   wait for its fetch). Relocation jobs run on the copier's slot,
//!   on-demand jobs on the guest request's.
//! * A job can be promoted: it is pushed again onto a more urgent queue and
//!   whichever copy is popped first runs it; the other is skipped. A job
//!   already started keeps its GET but its finish becomes urgent.
//! * **Fair between sessions.** Each class queue keeps one FIFO per tenant
//!   (a recovery session) and serves the tenants with queued jobs in turn,
//!   one job each ([`fair::FairQueue`]): one VM's hundred misses never
//!   queue ahead of another VM's one. Within a tenant the order is FIFO.
//!   Each block is fetched once: the volume's in-flight table keeps one
//!   job per block, whoever asked first.
//! * **Memory back when idle.** Fetches allocate and free chunk-sized
//!   buffers on the CPU and runtime threads; glibc keeps what a thread
//!   frees in that thread's arena (measured with 16 blocking workers:
//!   ~50 MiB held after 64 MiB read). When the engine goes idle after
//!   work, at most once a second, it gives the freed memory back
//!   (`util::trim_heap`).
//!
//! **Where a miss waits.** Besides the GET itself, an on-demand job can
//! wait in its class queue (every in-flight place taken) and for a CPU
//! thread (before prepare, and between its GET and finish, behind other
//! jobs' CPU work); `status` reports both waits' mean and p99, and those of
//! the GET and finish stages themselves, so a slow miss can be told from a
//! slow store.
//!
//! **Shutdown.** Dropping the scheduler stops its runtime and CPU threads;
//! jobs not finished (queued, or between stages) are dropped unrun, and
//! what they own (a volume's fetch) answers its waiters when dropped.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use parking_lot::Mutex;
use serde::Serialize;

use super::backoff::Backoff;
use super::Class;
use crate::error::{Error, ErrorKind};
use crate::metrics::LatencyHistogram;
use crate::placement::{queue::Ticket, IoClass, IoQueue};
use crate::repo::backend::{GetFuture, Got};

mod cpu;
mod fair;

use fair::FairQueue;

/// A job's first stage (see the module doc).
type Work = Box<dyn FnOnce() -> Step + Send + 'static>;

/// Least time between two heap trims.
const TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// How often the engine looks at its queues without being asked.
const TICK: Duration = Duration::from_millis(100);
/// Local-directory reads at once (the runtime's blocking pool).
const LOCAL_READERS: usize = 16;

/// What a job's prepare stage decided.
pub enum Step {
    /// Nothing to fetch: the job has answered its waiters.
    Done,
    /// Await `request`, then run `then` with its outcome on a CPU thread.
    Get {
        request: GetFuture,
        then: Box<dyn FnOnce(Got) + Send + 'static>,
    },
}

/// A job that needs no GET (tests, and work that is purely local).
impl From<()> for Step {
    fn from((): ()) -> Step {
        Step::Done
    }
}

/// One queued fetch; shared between the queue(s) and the block's slot.
pub struct Job {
    work: Mutex<Option<Work>>,
    /// Bytes it moves, for the export point's queue.
    bytes: u64,
    /// Its class while queued; once started, how urgent its finish is.
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

/// A started job: what its finish gives back.
struct Running {
    job: Arc<Job>,
    /// The class it was counted under when it started.
    class: Class,
    ticket: Option<Ticket>,
    started: Instant,
    /// Time its stages waited for a CPU thread so far.
    cpu_wait: Duration,
}

type Popped = (Arc<Job>, Class, Option<Ticket>);

impl Job {
    pub fn class(&self) -> Class {
        Class::from_u8(self.class.load(Ordering::Acquire))
    }
}

struct State {
    max_in_flight: usize,
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

    /// Nothing runs or waits.
    fn is_idle(&self) -> bool {
        self.running.iter().chain(&self.queued).all(|&n| n == 0)
    }

    /// True (once) when work finished and nothing runs or waits, at most
    /// once a second: time to give freed memory back.
    fn trim_due(&mut self, now: Instant) -> bool {
        let idle = self.is_idle();
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
        if self.running.iter().sum::<usize>() >= self.max_in_flight {
            return None;
        }
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
    max_in_flight: usize,
    cpu: Arc<cpu::CpuPool>,
    rt: tokio::runtime::Handle,
    /// Wakes the engine's tick task early (a freed export-point slot).
    wake: tokio::sync::Notify,
    /// GETs being awaited now.
    gets: AtomicUsize,
    /// Queue wait plus fetch time of on-demand jobs.
    on_demand_latency: LatencyHistogram,
    /// On-demand jobs' time queued before they started.
    on_demand_queue_wait: LatencyHistogram,
    /// On-demand jobs' time waiting for a CPU thread (both stages).
    on_demand_cpu_wait: LatencyHistogram,
    /// On-demand jobs' GET stage: from the GET's start until its outcome
    /// is queued for finish (the store, and a local read's wait for a
    /// blocking thread).
    on_demand_get: LatencyHistogram,
    /// On-demand jobs' finish stage on its CPU thread: verify, decompress,
    /// write staging, answer the waiters.
    on_demand_finish: LatencyHistogram,
    /// The backoff's smoothed on-demand fetch time, readable without the
    /// state lock: every guest read asks for it (readahead sizing).
    latency_us: AtomicU64,
    /// Heap trims so far (see the module doc).
    trims: AtomicU64,
}

/// Shared by every volume of an export point.
pub struct Scheduler {
    inner: Arc<Inner>,
    /// Owned here, not by `Inner`: its tasks hold `Inner`.
    rt: Option<tokio::runtime::Runtime>,
}

/// The scheduler's figures for `status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SchedulerStatus {
    /// Jobs that may run at once (GETs in flight at most).
    pub max_in_flight: usize,
    /// GETs being awaited now.
    pub gets_in_flight: usize,
    pub cpu_threads: usize,
    pub background_limit: usize,
    pub queued: ClassCounts,
    pub running: ClassCounts,
    pub on_demand_fetches: u64,
    pub on_demand_latency_mean_ms: f64,
    pub on_demand_latency_p99_ms: f64,
    /// Of that latency: time queued (every in-flight place taken).
    pub on_demand_queue_wait_mean_ms: f64,
    pub on_demand_queue_wait_p99_ms: f64,
    /// Of that latency: time waiting for a CPU thread (prepare, finish).
    pub on_demand_cpu_wait_mean_ms: f64,
    pub on_demand_cpu_wait_p99_ms: f64,
    /// Of that latency: the GET stage (see [`Inner::on_demand_get`]).
    pub on_demand_get_mean_ms: f64,
    pub on_demand_get_p99_ms: f64,
    /// Of that latency: the finish stage's own work.
    pub on_demand_finish_mean_ms: f64,
    pub on_demand_finish_p99_ms: f64,
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
    /// At most `max_in_flight` jobs at once; at least a quarter of them
    /// (and at least one) stay reserved for on-demand fetches.
    pub fn new(name: &str, max_in_flight: usize) -> Arc<Scheduler> {
        Self::with_queue(name, max_in_flight, None)
    }

    /// A scheduler whose background fetches take async slots of `io`.
    /// Its threads are named `{name}-io` (the runtime) and `{name}-cpuN`.
    pub fn with_queue(
        name: &str,
        max_in_flight: usize,
        io: Option<Arc<IoQueue>>,
    ) -> Arc<Scheduler> {
        let max_in_flight = max_in_flight.max(2);
        let reserved = (max_in_flight / 4).max(1);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(LOCAL_READERS)
            .thread_name(format!("{name}-io"))
            .enable_all()
            .build()
            .expect("start the fetch engine's runtime");
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                max_in_flight,
                queues: Default::default(),
                queued: [0; Class::COUNT],
                running: [0; Class::COUNT],
                backoff: Backoff::new(max_in_flight - reserved),
                shutdown: false,
                freed: false,
                last_trim: None,
            }),
            io: io.clone(),
            max_in_flight,
            cpu: cpu::CpuPool::start(name, cpu::CpuPool::default_threads()),
            rt: rt.handle().clone(),
            wake: tokio::sync::Notify::new(),
            gets: AtomicUsize::new(0),
            on_demand_latency: LatencyHistogram::default(),
            on_demand_queue_wait: LatencyHistogram::default(),
            on_demand_cpu_wait: LatencyHistogram::default(),
            on_demand_get: LatencyHistogram::default(),
            on_demand_finish: LatencyHistogram::default(),
            latency_us: AtomicU64::new(0),
            trims: AtomicU64::new(0),
        });
        rt.spawn(tick(inner.clone()));
        if let Some(io) = io {
            // A freed slot may admit a queued background job.
            let weak = Arc::downgrade(&inner);
            io.on_free(Box::new(move || {
                if let Some(i) = weak.upgrade() {
                    i.wake.notify_one();
                }
            }));
        }
        Arc::new(Scheduler {
            inner,
            rt: Some(rt),
        })
    }

    /// Queues `work` in `class`; the returned job can later be promoted.
    pub fn submit<S: Into<Step>>(
        &self,
        class: Class,
        work: impl FnOnce() -> S + Send + 'static,
    ) -> Arc<Job> {
        self.submit_sized(class, 0, work)
    }

    /// `submit` for a job that moves `bytes` (what it costs the queue).
    pub fn submit_sized<S: Into<Step>>(
        &self,
        class: Class,
        bytes: u64,
        work: impl FnOnce() -> S + Send + 'static,
    ) -> Arc<Job> {
        self.submit_for(0, class, bytes, work)
    }

    /// `submit_sized` on behalf of `tenant` (a session): tenants with
    /// queued jobs in a class take turns.
    pub fn submit_for<S: Into<Step>>(
        &self,
        tenant: u64,
        class: Class,
        bytes: u64,
        work: impl FnOnce() -> S + Send + 'static,
    ) -> Arc<Job> {
        let job = Arc::new(Job {
            tenant,
            bytes,
            work: Mutex::new(Some(Box::new(move || work().into()))),
            class: AtomicU8::new(class as u8),
            started: AtomicBool::new(false),
            queued_at: Instant::now(),
        });
        let mut st = self.inner.state.lock();
        st.queued[class as usize] += 1;
        st.queues[class as usize].push_back(job.clone());
        drop(st);
        self.inner.start_ready();
        job
    }

    /// Moves a queued job to a more urgent class (a guest now waits for
    /// the block a prefetch queued). A started job keeps its place (joining
    /// it is the fastest way to the data) but its finish becomes urgent.
    pub fn promote(&self, job: &Arc<Job>, to: Class) {
        let mut st = self.inner.state.lock();
        let from = job.class();
        if to >= from {
            return;
        }
        job.class.store(to as u8, Ordering::Release);
        if job.started.load(Ordering::Acquire) {
            return;
        }
        st.queued[from as usize] -= 1;
        st.queued[to as usize] += 1;
        // The copy left in the old queue is skipped when popped.
        st.queues[to as usize].push_front(job.clone());
        drop(st);
        self.inner.start_ready();
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
        let (q, c) = (
            &self.inner.on_demand_queue_wait,
            &self.inner.on_demand_cpu_wait,
        );
        SchedulerStatus {
            max_in_flight: self.inner.max_in_flight,
            gets_in_flight: self.inner.gets.load(Ordering::Relaxed),
            cpu_threads: self.inner.cpu.threads(),
            background_limit: st.backoff.limit(Instant::now()),
            queued: ClassCounts::from(&st.queued),
            running: ClassCounts::from(&st.running),
            on_demand_fetches: h.count(),
            on_demand_latency_mean_ms: h.mean_us() / 1000.0,
            on_demand_latency_p99_ms: h.quantile_us(0.99) / 1000.0,
            on_demand_queue_wait_mean_ms: q.mean_us() / 1000.0,
            on_demand_queue_wait_p99_ms: q.quantile_us(0.99) / 1000.0,
            on_demand_cpu_wait_mean_ms: c.mean_us() / 1000.0,
            on_demand_cpu_wait_p99_ms: c.quantile_us(0.99) / 1000.0,
            on_demand_get_mean_ms: self.inner.on_demand_get.mean_us() / 1000.0,
            on_demand_get_p99_ms: self.inner.on_demand_get.quantile_us(0.99) / 1000.0,
            on_demand_finish_mean_ms: self.inner.on_demand_finish.mean_us() / 1000.0,
            on_demand_finish_p99_ms: self.inner.on_demand_finish.quantile_us(0.99) / 1000.0,
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // Queued jobs' work is taken out and dropped here: a volume's
        // fetch and its slot refer to each other through the job, so
        // waiting for the queues to be dropped would never drop them.
        let unrun: Vec<Work> = {
            let mut st = self.inner.state.lock();
            st.shutdown = true;
            let jobs: Vec<Arc<Job>> = st.queues.iter_mut().flat_map(FairQueue::take_all).collect();
            jobs.iter().filter_map(|j| j.work.lock().take()).collect()
        };
        drop(unrun);
        self.inner.cpu.shutdown();
        if let Some(rt) = self.rt.take() {
            // Never blocks, so a drop on any thread (even a runtime's) is safe.
            rt.shutdown_background();
        }
    }
}

/// Starts what the queues allow every `TICK` or when woken, and trims the
/// heap when idle; ends at shutdown.
async fn tick(inner: Arc<Inner>) {
    loop {
        let woken = inner.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if !inner.start_ready() {
            return;
        }
        let trim = inner.state.lock().trim_due(Instant::now());
        if trim {
            let i = inner.clone();
            tokio::task::spawn_blocking(move || {
                crate::util::trim_heap();
                i.trims.fetch_add(1, Ordering::Relaxed);
            });
        }
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

impl Inner {
    /// Starts every job the queues allow now; false after shutdown. Only
    /// hands work to the CPU threads, so any thread may call it.
    fn start_ready(self: &Arc<Self>) -> bool {
        loop {
            let popped = {
                let mut st = self.state.lock();
                if st.shutdown {
                    return false;
                }
                st.pop(Instant::now(), self.io.as_ref())
            };
            let Some((job, class, ticket)) = popped else {
                return true;
            };
            let started = Instant::now();
            if class == Class::OnDemand {
                self.on_demand_queue_wait.record(started - job.queued_at);
            }
            let run = Running {
                job,
                class,
                ticket,
                started,
                cpu_wait: Duration::ZERO,
            };
            let me = self.clone();
            self.cpu.push(class, Box::new(move || me.prepare(run)));
        }
    }

    /// Stage 1, on a CPU thread.
    fn prepare(self: &Arc<Self>, mut run: Running) {
        run.cpu_wait += run.started.elapsed();
        let work = run.job.work.lock().take();
        let step = match work {
            None => Step::Done,
            Some(w) => {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(w)).unwrap_or_else(|p| {
                    // The job itself answers its waiters (what it owns
                    // does when dropped).
                    tracing::error!(
                        "a {:?} fetch job panicked: {}",
                        run.class,
                        crate::util::panic_message(&p)
                    );
                    Step::Done
                })
            }
        };
        match step {
            Step::Done => self.finish(run),
            Step::Get { request, then } => {
                self.gets.fetch_add(1, Ordering::Relaxed);
                let me = self.clone();
                let get_at = Instant::now();
                self.rt.spawn(async move {
                    let got = std::panic::AssertUnwindSafe(request)
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|p| {
                            Err(Error::new(
                                ErrorKind::Io,
                                format!(
                                    "repository read failed: internal error ({})",
                                    crate::util::panic_message(&p)
                                ),
                            ))
                        });
                    me.gets.fetch_sub(1, Ordering::Relaxed);
                    let got_at = Instant::now();
                    let mut run = run;
                    // Promoted while its GET ran: its finish is urgent.
                    let urgency = run.job.class();
                    if urgency == Class::OnDemand {
                        me.on_demand_get.record(got_at - get_at);
                    }
                    let m = me.clone();
                    me.cpu.push(
                        urgency,
                        Box::new(move || {
                            let began = Instant::now();
                            run.cpu_wait += began - got_at;
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                then(got)
                            }));
                            if run.class == Class::OnDemand {
                                m.on_demand_finish.record(began.elapsed());
                            }
                            if let Err(p) = r {
                                tracing::error!(
                                    "a {:?} fetch job panicked: {}",
                                    run.class,
                                    crate::util::panic_message(&p)
                                );
                            }
                            m.finish(run);
                        }),
                    );
                });
            }
        }
    }

    /// The end of a job: accounting, then whatever may start now.
    fn finish(self: &Arc<Self>, run: Running) {
        let Running {
            job,
            class,
            ticket,
            started,
            cpu_wait,
        } = run;
        drop(ticket);
        let now = Instant::now();
        let mut st = self.state.lock();
        st.running[class as usize] -= 1;
        st.freed = true;
        if class == Class::OnDemand {
            st.backoff.observe(now - started, now);
            let us = st.backoff.latency().as_micros() as u64;
            self.latency_us.store(us, Ordering::Relaxed);
            self.on_demand_latency.record(now - job.queued_at);
            self.on_demand_cpu_wait.record(cpu_wait);
        }
        let idle = st.is_idle();
        drop(st);
        if idle {
            // The tick task gives memory back (see the module doc).
            self.wake.notify_one();
        } else {
            self.start_ready();
        }
    }
}

#[cfg(test)]
mod tests;
