//! Export points (datastores) and where a new recovery is placed.
//!
//! A daemon serves one or more export points. Each has its own listening
//! address (NFS with a portmapper on 111, NBD), its own [`IoQueue`] that
//! every guest request and every relocation copy or background fetch of
//! its sessions goes through, its own fetch scheduler, and optionally its
//! own staging directory (`staging=DIR`, e.g. on another disk; default
//! `--staging`; points may share one). Every session belongs to exactly
//! one export point, recorded in its `active` marker in the staging it
//! lives in, so a restart re-exports it at the same place, from the same
//! directory, with the same handles.
//!
//! Kept staging does not move: a VM whose kept session resumes is placed
//! only among the points staging where that session is (the datastore
//! marks the others [`PointFigures::unavailable`]; naming another point is
//! refused). Points without staging room for a new recovery are marked
//! the same way. An unavailable point is never chosen but still counts
//! for the host's connections: a host at its limit whose own points
//! cannot take a VM is refused, not given another point.
//!
//! **Placement** ([`decide`]) is a pure function of figures the datastore
//! gathers per export point ([`PointFigures`]):
//! 1. *Connection headroom*: a hypervisor mounts each datastore with one
//!    connection and may hold at most `max_connections_per_host`. While
//!    the host has headroom, the VM goes to an export point the host does
//!    not use yet, the one with the least predicted latency.
//!    Unless every such point predicts more than
//!    [`Weights::headroom_max_extra_ms`] over the best point the host
//!    already uses: a connection of its own does not help against a full
//!    queue, so rule 2 decides ([`Rule::LeastLatencyOverHeadroom`]).
//! 2. Otherwise the *least predicted latency* among the points it uses.
//! 3. Ties (within [`Weights::tie_ms`]) go to the smaller async share.
//!
//! **Predicted latency** of the next guest request on a point
//! ([`predict`]), every weight in [`Weights`] (documented in the README):
//! * `service`: the mean service time of its recent requests;
//! * `queue`: bytes queued and in flight over its measured drain rate;
//! * `future`: async bytes still to come (relocations' remaining bytes,
//!   profile prefetch not yet staged), `F`, as a utilisation
//!   `u = F / (F + drain × horizon)` of the point, costing
//!   `service × u / (1 − u)` as in an M/M/1 queue: a relocation nearly done
//!   adds little, one just started a lot;
//! * `async`: the async share `a` of its recent I/O, `service × a`: sync
//!   requests are served first, so a guest request waits for at most the
//!   async request in service (an M/M/1 term would call a point busy only
//!   with a throttled relocation saturated);
//! * `repository`: the share of the horizon its sessions' unstaged data
//!   keeps the point fetching, times the repository's fetch latency.

pub mod point;
pub mod queue;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::Serialize;

pub use point::ExportPoint;
pub use queue::{IoClass, IoQueue, QueueFigures};

use crate::error::{Error, Result};

/// Default NFS port of an export point.
pub const NFS_PORT: u16 = 2049;
/// Default NBD port of an export point.
pub const NBD_PORT: u16 = 10809;
pub const DEFAULT_MAX_INFLIGHT: usize = 64;
pub const DEFAULT_MAX_CONNECTIONS_PER_HOST: usize = 4;

/// One `--export-point NAME,listen=ADDR[,port=P][,nbd-port=P][,staging=DIR][,max-inflight=N]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PointSpec {
    pub name: String,
    /// Where NFS (and 111) and NBD listen; `None` for the default point,
    /// which serves on `--nfs` / `--nbd` as before.
    pub listen: Option<IpAddr>,
    pub nfs_port: u16,
    pub nbd_port: u16,
    /// Its own staging directory (absolute); `None`: `--staging`.
    pub staging: Option<PathBuf>,
    pub max_inflight: usize,
}

impl PointSpec {
    /// The export point a daemon without `--export-point` has.
    pub fn default_point() -> PointSpec {
        PointSpec {
            name: "default".into(),
            listen: None,
            nfs_port: NFS_PORT,
            nbd_port: NBD_PORT,
            staging: None,
            max_inflight: DEFAULT_MAX_INFLIGHT,
        }
    }

    pub fn parse(s: &str) -> Result<PointSpec> {
        let bad = |why: String| Error::invalid(format!("--export-point {s:?}: {why}"));
        let mut parts = s.split(',');
        let name = parts.next().unwrap_or_default().trim();
        crate::util::validate_name("export point name", name).map_err(|e| bad(e.to_string()))?;
        let mut spec = PointSpec {
            name: name.into(),
            ..PointSpec::default_point()
        };
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| bad(format!("{p:?} is not KEY=VALUE")))?;
            match k {
                "listen" => {
                    let ip = v
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse()
                        .map_err(|_| bad(format!("listen={v} is not an IP address")))?;
                    spec.listen = Some(ip);
                }
                "port" => spec.nfs_port = v.parse().map_err(|_| bad(format!("bad port {v:?}")))?,
                "nbd-port" => {
                    spec.nbd_port = v.parse().map_err(|_| bad(format!("bad nbd-port {v:?}")))?
                }
                "staging" => {
                    let dir = PathBuf::from(v);
                    if !dir.is_absolute() {
                        return Err(bad(format!("staging={v} must be an absolute path")));
                    }
                    spec.staging = Some(dir);
                }
                "max-inflight" => {
                    spec.max_inflight = v
                        .parse()
                        .ok()
                        .filter(|&n: &usize| n >= 2)
                        .ok_or_else(|| bad(format!("max-inflight={v} must be a number ≥ 2")))?
                }
                _ => {
                    return Err(bad(format!(
                        "unknown key {k:?} (listen, port, nbd-port, staging, max-inflight)"
                    )))
                }
            }
        }
        if spec.listen.is_none() {
            return Err(bad("listen=ADDR is required".into()));
        }
        // One listener per port: NFS (and the portmapper on 111) and NBD.
        if spec.nfs_port == spec.nbd_port || spec.nbd_port == 111 {
            return Err(bad(format!(
                "nbd-port {} is taken by this point's own {}: give NFS and NBD different ports",
                spec.nbd_port,
                if spec.nbd_port == 111 {
                    "portmapper (111)"
                } else {
                    "NFS port"
                }
            )));
        }
        Ok(spec)
    }

    pub fn nfs_addr(&self) -> Option<SocketAddr> {
        self.listen.map(|ip| SocketAddr::new(ip, self.nfs_port))
    }

    pub fn nbd_addr(&self) -> Option<SocketAddr> {
        self.listen.map(|ip| SocketAddr::new(ip, self.nbd_port))
    }
}

/// Checks a set of export points: unique names, one point per address.
pub fn check_points(points: &[PointSpec]) -> Result<()> {
    for (i, a) in points.iter().enumerate() {
        for b in &points[..i] {
            if a.name == b.name {
                return Err(Error::invalid(format!(
                    "export point {} is given twice",
                    a.name
                )));
            }
            if let (Some(addr), true) = (a.listen, a.listen == b.listen) {
                return Err(Error::invalid(format!(
                    "export points {} and {} both listen on {}: each needs its own address (a hypervisor tells datastores apart by address, and port 111 is per address)",
                    b.name,
                    a.name,
                    addr
                )));
            }
        }
    }
    Ok(())
}

/// Every weight of the prediction, in one place.
#[derive(Debug, Clone, Serialize)]
pub struct Weights {
    pub queue: f64,
    pub future: f64,
    pub async_share: f64,
    pub repository: f64,
    /// How far ahead future async work counts (a new VM's boot and warm-up).
    pub horizon_s: f64,
    /// Drain rate assumed when less was measured, when weighing future
    /// and unstaged bytes against what the point can do in the horizon.
    pub min_drain_bytes_per_s: f64,
    /// Drain rate assumed for the queue term when less was measured: the
    /// queue is divided by what the point really drained (a point stuck
    /// behind slow misses drains a few MB/s), floored only so that a point
    /// that served almost nothing does not predict seconds for one request.
    pub min_queue_drain_bytes_per_s: f64,
    /// With headroom, an unused point is still passed over when it predicts
    /// more than this over the best point the host already uses: a new
    /// connection does not help against a point whose queue is full.
    pub headroom_max_extra_ms: f64,
    /// Service time assumed for a point that has served nothing yet (no
    /// guess above what a busy point measured).
    pub idle_service_ms: f64,
    /// The least time one request is assumed to take when weighing
    /// queueing behind future and async work.
    pub reference_service_ms: f64,
    /// Utilisations are capped here (the M/M/1 term grows without bound).
    pub max_utilisation: f64,
    /// Predictions closer than this are a tie.
    pub tie_ms: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            queue: 1.0,
            future: 1.0,
            async_share: 1.0,
            repository: 1.0,
            horizon_s: 60.0,
            min_drain_bytes_per_s: 50e6,
            min_queue_drain_bytes_per_s: 1e6,
            headroom_max_extra_ms: 10.0,
            idle_service_ms: 0.0,
            reference_service_ms: 0.5,
            max_utilisation: 0.99,
            tie_ms: 0.05,
        }
    }
}

/// What the datastore knows of one export point when placing.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PointFigures {
    pub name: String,
    pub queue: QueueFigures,
    /// Sessions placed here.
    pub sessions: usize,
    /// Bytes relocations running here still have to copy.
    pub relocation_remaining_bytes: u64,
    /// Bytes of applied profiles not staged yet.
    pub profile_remaining_bytes: u64,
    /// Bytes of its sessions' disks not staged yet (holes excluded).
    pub unstaged_bytes: u64,
    /// The repository's mean fetch latency (daemon-wide).
    pub repo_fetch_ms: f64,
    /// The host being placed uses this point (a live TCP peer or a
    /// session placed for it).
    pub host_connected: bool,
    /// Why this point cannot take this recovery (set by the datastore: its
    /// staging has no room, the VM's kept staging is elsewhere). It still
    /// counts for the host's connections; it is never chosen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

/// The parts of a prediction, in ms.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Prediction {
    pub service_ms: f64,
    pub queue_ms: f64,
    pub future_ms: f64,
    pub async_ms: f64,
    pub repository_ms: f64,
    pub latency_ms: f64,
}

fn mm1(service_ms: f64, u: f64, w: &Weights) -> f64 {
    let u = u.clamp(0.0, w.max_utilisation);
    service_ms * u / (1.0 - u)
}

/// The predicted latency of the next guest request on a point.
pub fn predict(f: &PointFigures, w: &Weights) -> Prediction {
    let q = &f.queue;
    let service = if q.completed_requests == 0 {
        w.idle_service_ms
    } else {
        q.service_ms.max(0.001)
    };
    let drain = q.drain_bytes_per_s.max(w.min_drain_bytes_per_s);
    let queue_drain = q.drain_bytes_per_s.max(w.min_queue_drain_bytes_per_s);
    let queue_ms = w.queue * 1000.0 * (q.queued_bytes + q.inflight_bytes) as f64 / queue_drain;
    let future_bytes = (f.relocation_remaining_bytes + f.profile_remaining_bytes) as f64;
    // Queueing behind future or async work costs at least a typical
    // request's time, also on a point that has not served one yet.
    let unit = service.max(w.reference_service_ms);
    let future_u = future_bytes / (future_bytes + drain * w.horizon_s);
    let future_ms = w.future * mm1(unit, future_u, w);
    // Sync requests go first, so a guest request waits for at most the
    // async request in service, found in about the async share of slots.
    // (Not an M/M/1 term: a point busy only with async work is not full.)
    let async_ms = w.async_share * q.async_share.clamp(0.0, 1.0) * unit;
    let unstaged = f.unstaged_bytes as f64;
    let repo_share = unstaged / (unstaged + drain * w.horizon_s);
    let repository_ms = w.repository * repo_share * f.repo_fetch_ms;
    Prediction {
        service_ms: service,
        queue_ms,
        future_ms,
        async_ms,
        repository_ms,
        latency_ms: service + queue_ms + future_ms + async_ms + repository_ms,
    }
}

/// Which rule chose.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// Named by the caller.
    Forced,
    /// The only export point there is.
    Only,
    /// The host could open another connection: a point it does not use yet.
    ConnectionHeadroom,
    /// The least predicted latency among the points the host uses (or all
    /// points, when it uses none and has no headroom).
    LeastLatency,
    /// The host had headroom, but every point it does not use yet
    /// predicts more than `headroom_max_extra_ms` over the best one it uses.
    LeastLatencyOverHeadroom,
    /// Within `tie_ms` of the best: the smaller async share.
    TieAsyncShare,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Rule::Forced => "forced (--export-point NAME)",
            Rule::Only => "only export point",
            Rule::ConnectionHeadroom => {
                "connection headroom: a point the host is not connected to yet, least loaded"
            }
            Rule::LeastLatency => "least predicted latency among the points the host uses",
            Rule::LeastLatencyOverHeadroom => {
                "least predicted latency among the points the host uses: every point it does not use yet predicts much more"
            }
            Rule::TieAsyncShare => "tie on predicted latency: smaller async share",
        })
    }
}

/// One candidate's row in `--explain`.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub figures: PointFigures,
    pub prediction: Prediction,
    /// Whether the rule that chose considered this point.
    pub eligible: bool,
    /// Why it was not considered (set for every point not eligible).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_eligible: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub chosen: String,
    pub rule: Rule,
    pub host: Option<String>,
    pub host_connections: usize,
    pub max_connections_per_host: usize,
    pub candidates: Vec<Candidate>,
    /// Why some points were not candidates (set by the caller).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Where the request wants the VM.
#[derive(Debug, Clone, PartialEq)]
pub enum Want {
    Auto,
    Named { name: String, force: bool },
}

/// Chooses an export point (see the module docs).
pub fn decide(
    points: Vec<PointFigures>,
    want: &Want,
    host: Option<String>,
    max_conn: usize,
    w: &Weights,
) -> Result<Decision> {
    if points.is_empty() {
        return Err(Error::invalid("the daemon serves no export point"));
    }
    let used = points.iter().filter(|p| p.host_connected).count();
    let headroom = host.is_some() && used < max_conn;
    let mut candidates: Vec<Candidate> = points
        .into_iter()
        .map(|f| Candidate {
            prediction: predict(&f, w),
            figures: f,
            eligible: false,
            not_eligible: None,
        })
        .collect();
    let decision = |chosen: String, rule: Rule, candidates: Vec<Candidate>| Decision {
        chosen,
        rule,
        host: host.clone(),
        host_connections: used,
        max_connections_per_host: max_conn,
        candidates,
        note: None,
    };
    if let Want::Named { name, force } = want {
        let Some(c) = candidates.iter_mut().find(|c| &c.figures.name == name) else {
            let names: Vec<&str> = candidates.iter().map(|c| c.figures.name.as_str()).collect();
            return Err(Error::not_found(format!(
                "no export point {name:?} (this daemon serves: {})",
                names.join(", ")
            )));
        };
        if let Some(why) = &c.figures.unavailable {
            return Err(Error::busy(format!(
                "export point {name} cannot take it: {why}"
            )));
        }
        if host.is_some() && !c.figures.host_connected && !headroom && !force {
            return Err(Error::busy(format!(
                "host {} already uses {used} export point(s), its limit (--max-connections-per-host {max_conn}); placing it on {name} needs one more connection (pass --force to place it anyway)",
                host.as_deref().unwrap_or_default()
            )));
        }
        c.eligible = true;
        for c in candidates.iter_mut().filter(|c| &c.figures.name != name) {
            c.not_eligible = Some(
                c.figures
                    .unavailable
                    .clone()
                    .unwrap_or_else(|| format!("not the point named (--export-point {name})")),
            );
        }
        return Ok(decision(name.clone(), Rule::Forced, candidates));
    }
    if candidates.len() == 1 && candidates[0].figures.unavailable.is_none() {
        candidates[0].eligible = true;
        let name = candidates[0].figures.name.clone();
        return Ok(decision(name, Rule::Only, candidates));
    }
    let best_of = |connected: bool| {
        candidates
            .iter()
            .filter(|c| c.figures.unavailable.is_none() && c.figures.host_connected == connected)
            .map(|c| c.prediction.latency_ms)
            .fold(f64::INFINITY, f64::min)
    };
    let (best_fresh, best_used) = (best_of(false), best_of(true));
    let rule = if !(headroom && best_fresh.is_finite()) {
        Rule::LeastLatency
    } else if best_fresh > best_used + w.headroom_max_extra_ms {
        Rule::LeastLatencyOverHeadroom
    } else {
        Rule::ConnectionHeadroom
    };
    let h = host.as_deref().unwrap_or_default();
    for c in candidates.iter_mut() {
        c.not_eligible = if let Some(u) = &c.figures.unavailable {
            Some(u.clone())
        } else {
            match rule {
                Rule::ConnectionHeadroom if c.figures.host_connected => Some(format!(
                    "host {h} uses it already and may open another connection: a point it does not use yet is preferred"
                )),
                Rule::ConnectionHeadroom => None,
                _ if used == 0 || c.figures.host_connected => None,
                Rule::LeastLatencyOverHeadroom => Some(format!(
                    "host {h} does not use it, and the best point it does not use predicts {best_fresh:.3} ms, over {:.3} ms more than the best it uses ({best_used:.3} ms)",
                    w.headroom_max_extra_ms
                )),
                _ => Some(format!(
                    "host {h} does not use it and already uses {used} export point(s), its limit (--max-connections-per-host {max_conn})"
                )),
            }
        };
        c.eligible = c.not_eligible.is_none();
    }
    if !candidates.iter().any(|c| c.eligible) {
        let why: Vec<String> = candidates
            .iter()
            .filter_map(|c| {
                let u = c.figures.unavailable.as_deref()?;
                Some(format!("export point {}: {u}", c.figures.name))
            })
            .collect();
        return Err(match &host {
            Some(h) if !headroom && used > 0 => Error::busy(format!(
                "host {h} already uses {used} export point(s), its limit (--max-connections-per-host {max_conn}), and none of them can take it ({}); name another with --export-point NAME --force to place it anyway",
                why.join("; ")
            )),
            _ => Error::busy(format!("no export point can take it ({})", why.join("; "))),
        });
    }
    let best = candidates
        .iter()
        .filter(|c| c.eligible)
        .map(|c| c.prediction.latency_ms)
        .fold(f64::INFINITY, f64::min);
    let tied: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.eligible && c.prediction.latency_ms <= best + w.tie_ms)
        .collect();
    let pick = tied
        .iter()
        .min_by(|a, b| {
            a.figures
                .queue
                .async_share
                .total_cmp(&b.figures.queue.async_share)
                .then(a.prediction.latency_ms.total_cmp(&b.prediction.latency_ms))
                .then(a.figures.name.cmp(&b.figures.name))
        })
        .expect("at least one eligible point");
    let by_latency = tied
        .iter()
        .min_by(|a, b| a.prediction.latency_ms.total_cmp(&b.prediction.latency_ms))
        .expect("at least one");
    let rule = if tied.len() > 1 && pick.figures.name != by_latency.figures.name {
        Rule::TieAsyncShare
    } else {
        rule
    };
    let chosen = pick.figures.name.clone();
    Ok(decision(chosen, rule, candidates))
}

#[cfg(test)]
mod tests;
