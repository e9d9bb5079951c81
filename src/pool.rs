//! A fixed pool of named worker threads fed by a crossbeam channel: the
//! FUSE I/O workers that wait for fetches (reads spanning blocks, first
//! writes) so FUSE event threads never do.
//! (Fetches themselves run on the fetch engine, `prefetch::scheduler`.)

use crossbeam_channel::{unbounded, Sender};

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct WorkerPool {
    tx: Sender<Job>,
}

impl WorkerPool {
    pub fn new(name: &str, threads: usize) -> Self {
        let (tx, rx) = unbounded::<Job>();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    for job in rx {
                        // A panicking job drops its reply (fuser answers EIO);
                        // the worker lives on.
                        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
                        {
                            tracing::error!(
                                "a worker job panicked: {}",
                                crate::util::panic_message(&p)
                            );
                        }
                    }
                })
                .expect("spawn worker thread");
        }
        WorkerPool { tx }
    }

    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        // Workers live as long as the sender; a send can only fail after
        // every worker panicked, in which case running inline is the best
        // remaining option.
        if let Err(e) = self.tx.send(Box::new(job)) {
            (e.into_inner())();
        }
    }
}
