//! The datastore's side of export points: the figures placement decides
//! on, per point, gathered from the sessions served there; the placement
//! of a new recovery (kept staging binds a VM to the points staging where
//! it is); and what `export-points` reports.

use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

use super::{Datastore, Session};
use crate::error::{Error, ErrorKind, Result};
use crate::placement::{self, Decision, ExportPoint, PointFigures, PointSpec, Want, Weights};
use crate::staging::StagingDir;
use crate::util::human_bytes;

/// Where a new recovery should go.
#[derive(Debug, Clone, Default)]
pub struct PlaceRequest {
    /// The hypervisor that will run the VM: an address, or a name that
    /// resolves to one.
    pub host: Option<String>,
    /// `None` or `auto`: chosen by placement; else the export point named.
    pub export_point: Option<String>,
    /// Place on a named point even past the host's connection limit.
    pub force: bool,
}

/// How a daemon's export points are set up and chosen between.
#[derive(Debug, Clone)]
pub struct PlacementConfig {
    pub points: Vec<PointSpec>,
    pub max_connections_per_host: usize,
    pub weights: Weights,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            points: vec![PointSpec::default_point()],
            max_connections_per_host: placement::DEFAULT_MAX_CONNECTIONS_PER_HOST,
            weights: Weights::default(),
        }
    }
}

/// Placements decided but not served yet (see [`Reservation`]).
#[derive(Default)]
pub(super) struct Pending {
    next: u64,
    list: Vec<Placed>,
}

/// One pending placement: counted as a session of its host on its point,
/// its expected working set as taken from its point's staging room.
struct Placed {
    id: u64,
    point: Arc<ExportPoint>,
    host_ip: Option<std::net::IpAddr>,
    need: u64,
}

/// A new recovery's expected working set, and where the figure came from
/// (shown when it does not fit).
#[derive(Debug, Clone, Copy)]
pub struct Need {
    pub bytes: u64,
    pub from: Option<&'static str>,
    /// Staged ahead by prefetch (an operational profile), which stays
    /// below the staging's low watermark: admitted where it fits the
    /// limit, with a warning where it does not fit below the watermark.
    pub prefetched: bool,
}

impl From<u64> for Need {
    fn from(bytes: u64) -> Need {
        Need {
            bytes,
            from: None,
            prefetched: false,
        }
    }
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", human_bytes(self.bytes))?;
        match self.from {
            Some(from) => write!(f, ", {from}"),
            None => Ok(()),
        }
    }
}

/// `free`, for a refusal of `need` (larger): in bytes where both would
/// read the same rounded ("6.4 MiB does not fit in 6.4 MiB free").
fn less_than(free: u64, need: u64) -> String {
    match human_bytes(free) == human_bytes(need) {
        true => format!("{free} bytes (of {need} needed)"),
        false => human_bytes(free),
    }
}

/// A placement held from the decision until its session is in the table
/// (or its recovery failed): recoveries deciding meanwhile count it, so
/// they do not all pick the same point nor together pass a host's
/// connection limit. Dropping it ends it.
pub struct Reservation {
    pending: Arc<Mutex<Pending>>,
    id: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pending.lock().list.retain(|p| p.id != self.id);
    }
}

/// What `active` records of a session's placement.
#[derive(Debug, Serialize, serde::Deserialize)]
pub(super) struct PlacementRecord {
    pub(super) export_point: String,
    pub(super) host: Option<String>,
}

/// One export point's figures for `export-points` and `GET /export-points`.
#[derive(Debug, Serialize)]
pub struct PointStatus {
    pub name: String,
    pub listen: Option<std::net::IpAddr>,
    pub nfs_port: u16,
    pub nbd_port: u16,
    /// Where its new sessions stage.
    pub staging: std::path::PathBuf,
    pub sessions: Vec<String>,
    /// Hypervisor hosts using it: live TCP connections or sessions placed
    /// for them (what placement counts as a host's points).
    pub hosts: Vec<HostConnections>,
    pub queue: placement::QueueFigures,
    /// Per session with a relocation, its progress (0..1).
    pub relocations: Vec<RelocationProgress>,
    pub figures: PointFigures,
    pub predicted: placement::Prediction,
    pub urls: Vec<String>,
}

/// A hypervisor host using an export point: with a live TCP connection,
/// or a session placed for it there (it has not connected yet, say).
/// Placement counts exactly these as the host's points.
#[derive(Debug, Serialize)]
pub struct HostConnections {
    pub host: std::net::IpAddr,
    /// Live TCP connections.
    pub connections: usize,
    /// Sessions placed for it there (placements not served yet included).
    pub sessions: usize,
}

#[derive(Debug, Serialize)]
pub struct RelocationProgress {
    pub vm: String,
    /// As older readers know it: an unfinished cancel stays `Failed` or
    /// `NotResumed`, with `cancel_unfinished` beside it.
    pub state: String,
    pub progress: f64,
    pub bytes_remaining: u64,
    /// A cancel that could not finish: the command that finishes it (as
    /// in `status`, `RelocationStatus::cancel_unfinished`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_unfinished: Option<String>,
    /// With it: not even the cancel's mark was written, so a restart
    /// resumes the copy (`RelocationStatus::cancel_unmarked`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_unmarked: bool,
}

/// The address a `--host` names.
pub fn resolve_host(host: &str) -> Result<std::net::IpAddr> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(placement::point::canonical(ip));
    }
    use std::net::ToSocketAddrs;
    (host, 0)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .map(|a| placement::point::canonical(a.ip()))
        .ok_or_else(|| {
            Error::invalid(format!(
                "host {host:?} is neither an address nor a name that resolves"
            ))
        })
}

impl Datastore {
    /// Chooses the export point for a new recovery of `vm` (see
    /// `placement`). A VM whose kept staging resumes from `kept` goes only
    /// to a point that stages there (its data does not move); when no
    /// point does any more, to any point, reading on from `kept`. The
    /// placement is reserved until the returned guard is dropped, which
    /// the caller does once the session is in the table (or has failed).
    pub fn place(
        &self,
        vm: &str,
        req: &PlaceRequest,
        kept: Option<&Arc<StagingDir>>,
        need: impl Into<Need>,
    ) -> Result<(Decision, Reservation)> {
        let need = need.into();
        let ip = req.host.as_deref().map(resolve_host).transpose()?;
        // One at a time from the figures to the reservation, so the next
        // placement sees this one.
        let _placing = self.placing.lock();
        let want = match req.export_point.as_deref() {
            None | Some("auto") => Want::Auto,
            Some(n) => Want::Named {
                name: n.into(),
                force: req.force,
            },
        };
        let mut figures = self.point_figures(ip);
        let mut note = None;
        if let Some(kept) = kept {
            let there: Vec<&str> = self
                .points
                .iter()
                .filter(|p| Arc::ptr_eq(&p.staging, kept))
                .map(|p| p.name())
                .collect();
            if let Want::Named { name, .. } = &want {
                if !there.is_empty() && self.point(name).is_some() && !there.contains(&&**name) {
                    return Err(Error::busy(format!(
                        "VM {vm} has kept staging under {} (export point {}); recover it there, or release --discard {vm} first",
                        kept.root().display(),
                        there.join(" or ")
                    )));
                }
            }
            if there.is_empty() {
                tracing::warn!(vm, staging = %kept.root().display(), "no export point stages where this VM's kept staging is; placing it anywhere, its data stays there");
            } else {
                // Still candidates: a point the host uses counts for its
                // connections whether or not it can take this VM.
                for f in figures
                    .iter_mut()
                    .filter(|f| !there.contains(&f.name.as_str()))
                {
                    f.unavailable = Some(format!(
                        "the VM's kept staging is under {}",
                        kept.root().display()
                    ));
                }
                note = Some(format!(
                    "kept staging under {}: only the export points staging there were considered",
                    kept.root().display()
                ));
            }
        }
        if kept.is_none() && self.admit(vm, need, &want, &mut figures)? {
            note = Some(format!(
                "points whose staging has no room for its expected working set ({need}) were not considered"
            ));
        }
        let mut d = placement::decide(
            figures,
            &want,
            req.host.clone(),
            self.placement.max_connections_per_host,
            &self.placement.weights,
        )?;
        d.note = note;
        let point = self.point(&d.chosen).expect("decided among ours").clone();
        let reservation = self.reserve(point, ip, if kept.is_some() { 0 } else { need.bytes });
        tracing::info!(vm, host = ?req.host, chosen = %d.chosen, rule = ?d.rule, "placed a recovery");
        Ok((d, reservation))
    }

    /// Holds a decided placement until the guard is dropped. Kept staging
    /// is counted already: its `need` is 0.
    fn reserve(
        &self,
        point: Arc<ExportPoint>,
        host_ip: Option<std::net::IpAddr>,
        need: u64,
    ) -> Reservation {
        let mut p = self.pending.lock();
        p.next += 1;
        let id = p.next;
        p.list.push(Placed {
            id,
            point,
            host_ip,
            need,
        });
        Reservation {
            pending: self.pending.clone(),
            id,
        }
    }

    /// Admission under bounded staging: a new recovery is considered only
    /// at points whose staging has room (see `Budget::room`) for `need`,
    /// its expected working set (the others are marked unavailable);
    /// refused in one line when none has. True if any point was marked.
    fn admit(
        &self,
        vm: &str,
        need: Need,
        want: &Want,
        figures: &mut [PointFigures],
    ) -> Result<bool> {
        let mut refused = vec![];
        // What would make room, once per staging that has none.
        let mut hints: Vec<String> = vec![];
        for f in figures.iter_mut() {
            let room = self.point(&f.name).and_then(|p| {
                let r = p.staging.budget().room()?;
                Some((
                    r.saturating_sub(self.pending_need(&p.staging)),
                    p.staging.clone(),
                ))
            });
            if let Some((r, st)) = room.filter(|(r, _)| *r < need.bytes) {
                let hint = st.budget().raise_hint();
                if !hints.contains(&hint) {
                    hints.push(hint);
                }
                let free = format!(
                    "staging {}: {} free of its limit",
                    st.root().display(),
                    less_than(r, need.bytes)
                );
                refused.push((f.name.clone(), format!("export point {} ({free})", f.name)));
                f.unavailable = Some(free);
            }
        }
        let named_full = match want {
            Want::Named { name, .. } => refused.iter().any(|(n, _)| n == name),
            Want::Auto => false,
        };
        if figures.iter().all(|f| f.unavailable.is_some()) || named_full {
            let why: Vec<String> = refused.into_iter().map(|(_, w)| w).collect();
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "VM {vm} was not recovered: its expected working set ({need}) does not fit in {}; release a session with --discard (a relocated one once it has cut over), drop kept staging, or {}",
                    why.join(", "),
                    hints.join(", or ")
                ),
            ));
        }
        Ok(!refused.is_empty())
    }

    /// A warning for a recovery admitted at `point` whose profile does
    /// not fit below its staging's low watermark, where prefetch stops
    /// (see `Budget::reserve_speculative`): admitted all the same (it fits
    /// the limit), its prefetch stages only part of its profile.
    pub(super) fn prefetch_shortfall(
        &self,
        vm: &str,
        need: Need,
        point: &ExportPoint,
    ) -> Option<String> {
        if !need.prefetched {
            return None;
        }
        let room = point.staging.budget().prefetch_room()?;
        // This recovery's own placement is among the pending ones.
        let others = self.pending_need(&point.staging).saturating_sub(need.bytes);
        let room = room.saturating_sub(others);
        (room < need.bytes).then(|| {
            format!(
                "VM {vm}'s operational profile ({}) does not fit below the low watermark of staging {} ({} free there, 80 % of its limit, where prefetch stops): its prefetch stages part of it, the rest is fetched when read; raise the staging's limit to prefetch all of it",
                human_bytes(need.bytes),
                point.staging.root().display(),
                human_bytes(room)
            )
        })
    }

    /// Staging room taken by placements not served yet, in `staging`.
    fn pending_need(&self, staging: &Arc<StagingDir>) -> u64 {
        let pending = self.pending.lock();
        let mine = pending
            .list
            .iter()
            .filter(|p| Arc::ptr_eq(&p.point.staging, staging));
        mine.map(|p| p.need).sum()
    }

    /// Every export point's figures, as seen by a recovery for host `ip`;
    /// placements not served yet count as sessions of their host.
    pub fn point_figures(&self, ip: Option<std::net::IpAddr>) -> Vec<PointFigures> {
        self.points_with_hosts(ip)
            .into_iter()
            .map(|(f, _)| f)
            .collect()
    }

    /// Every export point's figures and the hosts using it; a point counts
    /// as connected for `ip` exactly when `ip` is among its hosts, so that
    /// `export-points` and `recover --explain` agree.
    fn points_with_hosts(
        &self,
        ip: Option<std::net::IpAddr>,
    ) -> Vec<(PointFigures, Vec<HostConnections>)> {
        // Before the table: a reservation is dropped only after its session
        // is in it, so a recovery is counted at least once.
        let pending: Vec<(Arc<ExportPoint>, Option<std::net::IpAddr>)> = {
            let p = self.pending.lock();
            p.list
                .iter()
                .map(|p| (p.point.clone(), p.host_ip))
                .collect()
        };
        let sessions = self.sessions();
        let repo_fetch_ms = repo_fetch_ms(&sessions);
        self.points
            .iter()
            .map(|p| {
                let mine: Vec<&Arc<Session>> = sessions
                    .iter()
                    .filter(|s| Arc::ptr_eq(&s.point, p))
                    .collect();
                let reserved: Vec<Option<std::net::IpAddr>> = pending
                    .iter()
                    .filter(|(q, _)| Arc::ptr_eq(q, p))
                    .map(|(_, h)| *h)
                    .collect();
                let mut hosts: std::collections::BTreeMap<std::net::IpAddr, HostConnections> = p
                    .hosts()
                    .into_iter()
                    .map(|(host, connections)| {
                        let h = HostConnections {
                            host,
                            connections,
                            sessions: 0,
                        };
                        (host, h)
                    })
                    .collect();
                let placed = mine.iter().filter_map(|s| s.host_ip);
                for host in placed.chain(reserved.iter().flatten().copied()) {
                    let h = hosts.entry(host).or_insert(HostConnections {
                        host,
                        connections: 0,
                        sessions: 0,
                    });
                    h.sessions += 1;
                }
                let mut f = PointFigures {
                    name: p.name().into(),
                    queue: p.queue.snapshot(),
                    sessions: mine.len() + reserved.len(),
                    repo_fetch_ms,
                    host_connected: ip
                        .is_some_and(|ip| hosts.contains_key(&placement::point::canonical(ip))),
                    ..Default::default()
                };
                for s in mine {
                    if let Some(r) = s.relocation.lock().as_ref() {
                        let st = r.status();
                        if st.state.is_running() {
                            f.relocation_remaining_bytes +=
                                st.bytes_total.saturating_sub(st.bytes_done);
                        }
                    }
                    for d in &s.disks {
                        f.unstaged_bytes += d.unstaged_bytes();
                        f.profile_remaining_bytes += d.profile_remaining_bytes();
                    }
                }
                (f, hosts.into_values().collect())
            })
            .collect()
    }

    /// `export-points`: every export point with its figures.
    pub fn point_status(&self) -> Vec<PointStatus> {
        let figures = self.points_with_hosts(None);
        let urls = self.urls.read();
        self.points
            .iter()
            .zip(figures)
            .map(|(p, (f, hosts))| {
                let sessions = self.sessions_at(p.name());
                let relocations = sessions
                    .iter()
                    .filter_map(|s| {
                        // As `status` has it: one a restart did not reopen
                        // (an unfinished cancel among them) too.
                        let st =
                            (s.relocation.lock().as_ref().map(|r| r.status())).or_else(|| {
                                s.relocation_not_resumed.lock().as_ref().map(|h| h.status())
                            })?;
                        Some(RelocationProgress {
                            vm: s.vm.clone(),
                            state: format!("{:?}", st.state),
                            progress: st.bytes_done as f64 / st.bytes_total.max(1) as f64,
                            bytes_remaining: st.bytes_total.saturating_sub(st.bytes_done),
                            cancel_unfinished: st.cancel_unfinished,
                            cancel_unmarked: st.cancel_unmarked,
                        })
                    })
                    .collect();
                let u = urls.get(p.name()).cloned().unwrap_or_default();
                PointStatus {
                    name: p.name().into(),
                    listen: p.spec.listen,
                    nfs_port: p.spec.nfs_port,
                    nbd_port: p.spec.nbd_port,
                    staging: p.staging.root().to_path_buf(),
                    sessions: sessions.iter().map(|s| s.vm.clone()).collect(),
                    hosts,
                    queue: f.queue,
                    relocations,
                    predicted: placement::predict(&f, &self.placement.weights),
                    figures: f,
                    urls: u.nfs.into_iter().chain(u.nbd).collect(),
                }
            })
            .collect()
    }
}

/// The repository's mean fetch latency over every disk served, weighted by
/// fetches (0 before any).
fn repo_fetch_ms(sessions: &[Arc<Session>]) -> f64 {
    let (mut n, mut sum) = (0u64, 0.0);
    for d in sessions.iter().flat_map(|s| s.disks.iter()) {
        let c = d.stats.fetch_latency.count();
        n += c;
        sum += d.stats.fetch_latency.mean_us() * c as f64;
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64 / 1000.0
    }
}

#[cfg(test)]
mod less_than_tests {
    #[test]
    fn a_refusal_shows_bytes_where_the_rounded_figures_would_read_the_same() {
        assert_eq!(
            super::less_than(6_710_886, 6_750_208),
            "6710886 bytes (of 6750208 needed)"
        );
        assert_eq!(super::less_than(1 << 20, 16 << 20), "1.0 MiB");
    }
}
