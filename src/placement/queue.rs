//! One export point's I/O queue: every guest request to a disk of a
//! session placed there (synchronous class) and every relocation copy and
//! background fetch for those sessions (asynchronous class) passes through
//! it, so one VM's background work competes with exactly the guest I/O it
//! would meet on a hypervisor's connection to that datastore.
//!
//! * At most `max_inflight` requests run at once; the rest wait, and
//!   what waits is the queue the placement reads.
//! * A guest request served from staging alone ([`IoQueue::enter_staged`])
//!   runs at once and takes no slot: counted in flight and in completions
//!   for the figures, but apart from admission. So a staged block never
//!   waits behind misses holding the slots while the repository is slow,
//!   and misses never wait behind staged I/O, however much of it there is.
//! * Synchronous requests go first: an asynchronous one is admitted only
//!   while no synchronous request waits, and never into the last quarter
//!   of the slots, which stay free for guest I/O.
//! * Asynchronous admission can be tried without waiting
//!   ([`IoQueue::try_enter`]): a fetch worker must never block on it while
//!   a guest request waits for that worker's fetch.
//!
//! Figures for placement come from completions of the last
//! [`WINDOW`] (per-second sums, so a completion costs O(1) on the data
//! path): drain rate, mean service time, async share.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::Serialize;

/// How far back drain rate, service time and async share look.
pub const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoClass {
    /// A guest is waiting for it.
    Sync = 0,
    /// Relocation copies, prefetch, readahead.
    Async = 1,
}

pub struct IoQueue {
    max_inflight: usize,
    /// Slots an asynchronous request may never take.
    reserved: usize,
    st: Mutex<QState>,
    cv: Condvar,
    /// Called when a slot frees (the point's scheduler, which may hold
    /// background jobs the queue refused).
    on_free: OnceLock<Box<dyn Fn() + Send + Sync>>,
    origin: Instant,
}

/// Seconds of completions kept: the window plus the second in progress.
const SECONDS: usize = WINDOW.as_secs() as usize + 1;

#[derive(Default)]
struct QState {
    inflight: [usize; 2],
    inflight_bytes: [u64; 2],
    /// Staged guest requests running: no slot, not in admission.
    staged: usize,
    staged_bytes: u64,
    waiting: [usize; 2],
    waiting_bytes: [u64; 2],
    /// Completions per second since `origin`, in a ring.
    seconds: [Second; SECONDS],
    started: Option<Instant>,
}

#[derive(Default, Clone, Copy)]
struct Second {
    /// Which second since `origin` this slot holds.
    at: u64,
    requests: u64,
    bytes: [u64; 2],
    service: Duration,
}

/// What [`IoQueue::snapshot`] reports.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Default)]
pub struct QueueFigures {
    pub max_inflight: usize,
    pub queued_requests: usize,
    pub queued_bytes: u64,
    pub inflight_requests: usize,
    pub inflight_bytes: u64,
    /// Bytes completed per second over the window (0: nothing completed).
    pub drain_bytes_per_s: f64,
    /// Mean time from admission to completion of requests in the window.
    pub service_ms: f64,
    /// Asynchronous share of the bytes completed in the window (0..1).
    pub async_share: f64,
    pub completed_requests: usize,
}

/// An admitted request; completing it is dropping it.
pub struct Ticket {
    q: Arc<IoQueue>,
    class: IoClass,
    bytes: u64,
    admitted: Instant,
    /// From [`IoQueue::enter_staged`]: holds no slot.
    staged: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let service = self.admitted.elapsed();
        match self.staged {
            true => self.q.complete_staged(self.bytes, service),
            false => self.q.complete(self.class, self.bytes, service),
        }
    }
}

impl IoQueue {
    pub fn new(max_inflight: usize) -> Arc<IoQueue> {
        let max_inflight = max_inflight.max(1);
        Arc::new(IoQueue {
            max_inflight,
            reserved: (max_inflight / 4).max(1).min(max_inflight - 1),
            st: Mutex::new(QState::default()),
            cv: Condvar::new(),
            on_free: OnceLock::new(),
            origin: Instant::now(),
        })
    }

    pub fn max_inflight(&self) -> usize {
        self.max_inflight
    }

    /// Sets the callback run (without the queue's lock) whenever a
    /// request completes; one per queue.
    pub fn on_free(&self, f: Box<dyn Fn() + Send + Sync>) {
        assert!(
            self.on_free.set(f).is_ok(),
            "one on_free callback per queue"
        );
    }

    fn second(&self, t: Instant) -> u64 {
        (t - self.origin).as_secs()
    }

    fn admissible(&self, st: &QState, class: IoClass) -> bool {
        let total = st.inflight[0] + st.inflight[1];
        match class {
            IoClass::Sync => total < self.max_inflight,
            IoClass::Async => {
                st.waiting[IoClass::Sync as usize] == 0 && total < self.max_inflight - self.reserved
            }
        }
    }

    fn admit(self: &Arc<Self>, st: &mut QState, class: IoClass, bytes: u64) -> Ticket {
        st.inflight[class as usize] += 1;
        st.inflight_bytes[class as usize] += bytes;
        st.started.get_or_insert_with(Instant::now);
        Ticket {
            q: self.clone(),
            class,
            bytes,
            admitted: Instant::now(),
            staged: false,
        }
    }

    /// A guest request served from staging alone: runs at once, holds no
    /// slot (see the module doc).
    pub fn enter_staged(self: &Arc<Self>, bytes: u64) -> Ticket {
        let mut st = self.st.lock();
        st.staged += 1;
        st.staged_bytes += bytes;
        st.started.get_or_insert_with(Instant::now);
        Ticket {
            q: self.clone(),
            class: IoClass::Sync,
            bytes,
            admitted: Instant::now(),
            staged: true,
        }
    }

    /// Waits for a slot of `class`.
    pub fn enter(self: &Arc<Self>, class: IoClass, bytes: u64) -> Ticket {
        let mut st = self.st.lock();
        if st.waiting[0] + st.waiting[1] == 0 && self.admissible(&st, class) {
            return self.admit(&mut st, class, bytes);
        }
        st.waiting[class as usize] += 1;
        st.waiting_bytes[class as usize] += bytes;
        // Synchronous waiters are served before asynchronous ones: an
        // async waiter yields while any sync request waits.
        while !self.admissible(&st, class) {
            self.cv.wait(&mut st);
        }
        st.waiting[class as usize] -= 1;
        st.waiting_bytes[class as usize] -= bytes;
        let t = self.admit(&mut st, class, bytes);
        drop(st);
        // Another waiter may fit too (several slots freed at once).
        self.cv.notify_all();
        t
    }

    /// A slot of `class` if one is free now.
    pub fn try_enter(self: &Arc<Self>, class: IoClass, bytes: u64) -> Option<Ticket> {
        let mut st = self.st.lock();
        let idle = st.waiting[class as usize] == 0;
        (idle && self.admissible(&st, class)).then(|| self.admit(&mut st, class, bytes))
    }

    fn complete(&self, class: IoClass, bytes: u64, service: Duration) {
        let mut st = self.st.lock();
        st.inflight[class as usize] -= 1;
        st.inflight_bytes[class as usize] -= bytes;
        self.count_completion(&mut st, class, bytes, service);
        let waiters = st.waiting[0] + st.waiting[1] > 0;
        drop(st);
        if waiters {
            self.cv.notify_all();
        }
        if let Some(f) = self.on_free.get() {
            f();
        }
    }

    /// A staged request ends: it freed no slot, so nobody is woken.
    fn complete_staged(&self, bytes: u64, service: Duration) {
        let mut st = self.st.lock();
        st.staged -= 1;
        st.staged_bytes -= bytes;
        self.count_completion(&mut st, IoClass::Sync, bytes, service);
    }

    /// Adds a completion to the figures' current second.
    fn count_completion(&self, st: &mut QState, class: IoClass, bytes: u64, service: Duration) {
        let sec = self.second(Instant::now());
        let slot = &mut st.seconds[sec as usize % SECONDS];
        if slot.at != sec {
            *slot = Second {
                at: sec,
                ..Default::default()
            };
        }
        slot.requests += 1;
        slot.bytes[class as usize] += bytes;
        slot.service += service;
    }

    pub fn snapshot(&self) -> QueueFigures {
        let st = self.st.lock();
        // The clock is read under the lock, so after that of every
        // completion recorded; `complete` reads it before taking the lock,
        // so a slot ahead of ours (if ever) is skipped, never subtracted.
        let now = Instant::now();
        let sec = self.second(now);
        let recent = st.seconds.iter().filter(|s| {
            s.requests > 0 && sec.checked_sub(s.at).is_some_and(|d| d < WINDOW.as_secs())
        });
        let (mut requests, mut bytes, mut service) = (0u64, [0u64; 2], Duration::ZERO);
        for s in recent {
            requests += s.requests;
            bytes[0] += s.bytes[0];
            bytes[1] += s.bytes[1];
            service += s.service;
        }
        let all = bytes[0] + bytes[1];
        // Over the window, or since the first request if that is shorter.
        let span = st
            .started
            .map(|s| (now - s).min(WINDOW))
            .unwrap_or(WINDOW)
            .as_secs_f64()
            .max(0.1);
        QueueFigures {
            max_inflight: self.max_inflight,
            queued_requests: st.waiting[0] + st.waiting[1],
            queued_bytes: st.waiting_bytes[0] + st.waiting_bytes[1],
            inflight_requests: st.inflight[0] + st.inflight[1] + st.staged,
            inflight_bytes: st.inflight_bytes[0] + st.inflight_bytes[1] + st.staged_bytes,
            drain_bytes_per_s: all as f64 / span,
            service_ms: if requests == 0 {
                0.0
            } else {
                service.as_secs_f64() * 1000.0 / requests as f64
            },
            async_share: if all == 0 {
                0.0
            } else {
                bytes[IoClass::Async as usize] as f64 / all as f64
            },
            completed_requests: requests as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn staged_requests_never_wait_for_slots_and_never_keep_a_miss_from_one() {
        let q = IoQueue::new(2);
        let misses: Vec<_> = (0..2).map(|_| q.enter(IoClass::Sync, 4096)).collect();
        // Every slot held by misses: a staged request still runs.
        let staged: Vec<_> = (0..100).map(|_| q.enter_staged(4096)).collect();
        let f = q.snapshot();
        assert_eq!(f.inflight_requests, 102);
        drop(misses);
        // A hundred staged requests in flight: a miss still gets a slot.
        assert!(q.try_enter(IoClass::Sync, 4096).is_some());
        drop(staged);
        assert_eq!(q.snapshot().completed_requests, 103);
    }

    #[test]
    fn requests_beyond_max_inflight_wait_and_show_as_queued() {
        let q = IoQueue::new(2);
        let a = q.enter(IoClass::Sync, 4096);
        let b = q.enter(IoClass::Sync, 4096);
        let q2 = q.clone();
        let t = std::thread::spawn(move || drop(q2.enter(IoClass::Sync, 1 << 20)));
        while q.snapshot().queued_requests == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let f = q.snapshot();
        assert_eq!((f.queued_bytes, f.inflight_bytes), (1 << 20, 8192));
        drop(a);
        t.join().unwrap();
        drop(b);
        let f = q.snapshot();
        assert_eq!((f.queued_requests, f.inflight_requests), (0, 0));
        assert_eq!(f.completed_requests, 3);
        assert!(f.drain_bytes_per_s > 0.0);
    }

    #[test]
    fn async_requests_never_take_the_reserved_slots_nor_pass_a_waiting_guest() {
        let q = IoQueue::new(4); // one slot reserved for guest I/O
        let held: Vec<Ticket> = (0..3)
            .map(|_| q.try_enter(IoClass::Async, 1).expect("a free async slot"))
            .collect();
        assert!(
            q.try_enter(IoClass::Async, 1).is_none(),
            "the last slot is the guest's"
        );
        let g = q.enter(IoClass::Sync, 1);
        // Now full: a guest request waits, and async may not pass it.
        let q2 = q.clone();
        let order = Arc::new(AtomicUsize::new(0));
        let o = order.clone();
        let sync = std::thread::spawn(move || {
            let _t = q2.enter(IoClass::Sync, 1);
            o.fetch_add(1, Ordering::SeqCst);
        });
        while q.snapshot().queued_requests == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(held);
        assert!(q.try_enter(IoClass::Async, 1).is_none() || order.load(Ordering::SeqCst) == 1);
        sync.join().unwrap();
        drop(g);
        assert!(q.try_enter(IoClass::Async, 1).is_some());
    }

    #[test]
    fn a_second_written_by_a_completion_after_the_snapshot_read_the_clock_is_ignored() {
        let q = IoQueue::new(8);
        // A completion on another thread read the clock after snapshot()
        // did and wrote its second first.
        let ahead = q.second(Instant::now()) + 1;
        q.st.lock().seconds[ahead as usize % SECONDS] = Second {
            at: ahead,
            requests: 1,
            bytes: [4096, 0],
            service: Duration::from_millis(1),
        };
        let f = q.snapshot();
        assert_eq!((f.completed_requests, f.drain_bytes_per_s), (0, 0.0));
    }

    #[test]
    fn async_share_and_service_time_come_from_recent_completions() {
        let q = IoQueue::new(8);
        drop(q.enter(IoClass::Sync, 1000));
        {
            let _t = q.enter(IoClass::Async, 3000);
            std::thread::sleep(Duration::from_millis(20));
        }
        let f = q.snapshot();
        assert!((f.async_share - 0.75).abs() < 1e-9, "{f:?}");
        assert!(f.service_ms >= 10.0, "{f:?}");
    }
}
