//! One export point at run time: its spec, its staging directory, its I/O
//! queue, its fetch scheduler, and the hypervisor hosts connected to its
//! listeners.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{IoQueue, PointSpec};
use crate::prefetch::Scheduler;
use crate::staging::StagingDir;

pub struct ExportPoint {
    pub spec: PointSpec,
    /// Where its new sessions stage (`staging=`, else `--staging`); may be
    /// shared with other points.
    pub staging: Arc<StagingDir>,
    pub queue: Arc<IoQueue>,
    /// Fetches for its sessions; background ones take async slots of
    /// `queue`.
    pub sched: Arc<Scheduler>,
    conns: Arc<Mutex<BTreeMap<IpAddr, usize>>>,
}

/// A live TCP connection from a host; dropping it ends it.
pub struct Connection {
    conns: Arc<Mutex<BTreeMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut c = self.conns.lock();
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// IPv4-mapped IPv6 peers are their IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl ExportPoint {
    pub fn new(
        spec: PointSpec,
        staging: Arc<StagingDir>,
        fetches_in_flight: usize,
    ) -> Arc<ExportPoint> {
        let queue = IoQueue::new(spec.max_inflight);
        let sched = Scheduler::with_queue(
            &format!("fetch-{}", spec.name),
            fetches_in_flight,
            Some(queue.clone()),
        );
        Arc::new(ExportPoint {
            spec,
            staging,
            queue,
            sched,
            conns: Arc::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Counts a client connection (NFS or NBD) until the returned value
    /// is dropped.
    pub fn connected(&self, ip: IpAddr) -> Connection {
        let ip = canonical(ip);
        *self.conns.lock().entry(ip).or_default() += 1;
        Connection {
            conns: self.conns.clone(),
            ip,
        }
    }

    /// Hosts with at least one live connection, and how many each has.
    pub fn hosts(&self) -> Vec<(IpAddr, usize)> {
        self.conns.lock().iter().map(|(ip, n)| (*ip, *n)).collect()
    }
}
