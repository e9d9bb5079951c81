//! One class's queue, fair between tenants (see the scheduler's module doc).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Job;

/// One class's queue: a FIFO per tenant, the tenants with queued jobs
/// served round-robin. A tenant is in `turns` exactly when its FIFO is
/// non-empty (copies of promoted jobs, already started elsewhere, are
/// dropped lazily when they reach a front).
#[derive(Default)]
pub(super) struct FairQueue {
    pub(super) fifos: HashMap<u64, VecDeque<Arc<Job>>>,
    pub(super) turns: VecDeque<u64>,
}

impl FairQueue {
    pub(super) fn push_back(&mut self, job: Arc<Job>) {
        let t = job.tenant;
        let q = self.fifos.entry(t).or_default();
        if q.is_empty() {
            self.turns.push_back(t);
        }
        q.push_back(job);
    }

    /// Ahead of its tenant's other jobs (a promotion); the tenant keeps
    /// its place in the turns.
    pub(super) fn push_front(&mut self, job: Arc<Job>) {
        let t = job.tenant;
        let q = self.fifos.entry(t).or_default();
        if q.is_empty() {
            self.turns.push_back(t);
        }
        q.push_front(job);
    }

    /// The job whose turn it is, without taking it.
    pub(super) fn front(&mut self) -> Option<&Arc<Job>> {
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

    /// Empties the queue (shutdown).
    pub(super) fn take_all(&mut self) -> Vec<Arc<Job>> {
        self.turns.clear();
        std::mem::take(&mut self.fifos)
            .into_values()
            .flatten()
            .collect()
    }

    /// Takes the job whose turn it is; its tenant goes to the back.
    pub(super) fn pop(&mut self) -> Option<Arc<Job>> {
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
