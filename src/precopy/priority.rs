//! Under a load limit, pre-copy's reading, hashing, compressing and
//! storing run at `SCHED_IDLE`: they take only CPU time nothing else
//! wants.
//!
//! **Why.** The guest's I/O is completed by hand-offs between QEMU's
//! threads (the main loop, its I/O workers, the vCPU); measured on the
//! bench VM, the guest's `pwrite` calls stay under 0.4 ms at p99 while
//! QEMU's own latency of the same writes reaches milliseconds, the time a
//! woken QEMU thread waits for a CPU. A normal-priority thread of ours on
//! that CPU may finish its slice first (up to ~0.75 ms); a `SCHED_IDLE`
//! one is preempted at once by any woken normal thread.
//!
//! **How.** The work runs on a thread of its own that sets its policy;
//! the threads it starts (`store_chunks`' reader and workers) inherit it
//! and end with it, so no thread has to raise its priority back (which an
//! unprivileged user may not). The final round, due at the scheduled time,
//! runs at normal priority.
//!
//! **The price.** An idle-priority thread holding a kernel lock (a
//! filesystem journal handle while it writes a chunk) is run late when
//! the CPUs are saturated; such holds last a system call, and under
//! saturation the throttle halts pre-copy anyway.

/// Runs `f` with the calling thread's priority, or at `SCHED_IDLE` on a
/// thread of its own (whose threads inherit it) when `idle`.
pub(super) fn run<T: Send>(idle: bool, f: impl FnOnce() -> T + Send) -> T {
    if !idle {
        return f();
    }
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            set_idle();
            f()
        });
        t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// The calling thread's scheduling policy becomes `SCHED_IDLE` (a warning
/// if the kernel refuses; the work runs all the same).
fn set_idle() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid, initialised
    // sched_param that outlives the call, as sched_setscheduler(2) needs.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if r != 0 {
        tracing::warn!(
            "pre-copy runs at normal priority: SCHED_IDLE refused: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The calling thread's scheduling policy (`SCHED_*`).
#[cfg(test)]
pub(super) fn policy() -> i32 {
    // SAFETY: pid 0 is the calling thread; no memory is passed.
    unsafe { libc::sched_getscheduler(0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_work_and_the_threads_it_starts_run_at_sched_idle_and_the_caller_keeps_its_policy() {
        let before = policy();
        assert_eq!(before, libc::SCHED_OTHER);
        let (own, spawned) = run(true, || {
            let spawned = std::thread::spawn(policy).join().unwrap();
            (policy(), spawned)
        });
        assert_eq!((own, spawned), (libc::SCHED_IDLE, libc::SCHED_IDLE));
        assert_eq!(policy(), before);
        assert_eq!(run(false, policy), before);
        // A panic in the work reaches the caller.
        let r = std::panic::catch_unwind(|| run(true, || panic!("boom")));
        assert!(r.is_err());
    }
}
