//! The fetch engine's CPU stage: a few plain threads (about one per core)
//! that run the parts of a fetch that compute or touch local files —
//! deciding what to GET, then verifying, decompressing and writing
//! staging — most urgent class first, FIFO within a class. Their number
//! does not depend on how many GETs are in flight.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::super::Class;

pub(super) type Task = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct Queues {
    tasks: [VecDeque<Task>; Class::COUNT],
    shutdown: bool,
}

pub(super) struct CpuPool {
    q: Mutex<Queues>,
    cv: Condvar,
    threads: usize,
}

impl CpuPool {
    /// `threads` named `{name}-cpu{i}`.
    pub(super) fn start(name: &str, threads: usize) -> Arc<CpuPool> {
        let pool = Arc::new(CpuPool {
            q: Mutex::default(),
            cv: Condvar::new(),
            threads: threads.max(1),
        });
        for i in 0..pool.threads {
            let p = pool.clone();
            std::thread::Builder::new()
                .name(format!("{name}-cpu{i}"))
                .spawn(move || p.run())
                .expect("spawn a fetch CPU thread");
        }
        pool
    }

    /// The default size: the cores, at least two (so one long task never
    /// holds up every other fetch), at most 16.
    pub(super) fn default_threads() -> usize {
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, 16)
    }

    pub(super) fn threads(&self) -> usize {
        self.threads
    }

    /// Queues `task` behind the tasks of classes as urgent as `class`.
    /// After shutdown the task is dropped unrun (what it owns answers its
    /// waiters when dropped).
    pub(super) fn push(&self, class: Class, task: Task) {
        let mut q = self.q.lock();
        if q.shutdown {
            drop(q);
            drop(task);
            return;
        }
        q.tasks[class as usize].push_back(task);
        drop(q);
        self.cv.notify_one();
    }

    /// Threads end; queued tasks are dropped unrun.
    pub(super) fn shutdown(&self) {
        let dropped: Vec<Task> = {
            let mut q = self.q.lock();
            q.shutdown = true;
            q.tasks.iter_mut().flat_map(std::mem::take).collect()
        };
        self.cv.notify_all();
        drop(dropped);
    }

    fn next(&self) -> Option<Task> {
        let mut q = self.q.lock();
        loop {
            if q.shutdown {
                return None;
            }
            if let Some(t) = q.tasks.iter_mut().find_map(VecDeque::pop_front) {
                return Some(t);
            }
            self.cv.wait(&mut q);
        }
    }

    fn run(&self) {
        while let Some(task) = self.next() {
            // A panicking task must not take its thread with it; the
            // engine's tasks answer their own waiters and accounting.
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(task)) {
                tracing::error!(
                    "a fetch CPU task panicked: {}",
                    crate::util::panic_message(&p)
                );
            }
        }
    }
}
