//! Pre-copy backs off when the guest is busy.
//!
//! **Load.** Every [`SAMPLE`], a [`LoadSource`] gives the requests the
//! guest completed and the time they spent in flight (for a running VM
//! `query-blockstats` of its drives; for a recovered one, the session
//! uploader's, the session's own volumes' guest request figures):
//! over the interval, their mean latency (time / requests) and the mean
//! queue depth (time / wall time, Little's law). No QEMU option is needed
//! (timed stats need `stats-intervals` at start). Where a guest agent
//! socket is given, `guest-get-cpustats` adds the guest's busy CPU share.
//! Each figure is a moving average (EWMA, weight [`ALPHA`] per sample); the
//! *level* is the largest ratio of a figure to its limit.
//!
//! **Gate,** consulted before every chunk read: *copying* reads freely;
//! *throttled* (level ≥ 1) sleeps [`THROTTLED_DUTY`]× the time each read
//! took after it (pre-copy counts a chunk's whole cost: its read and the
//! wait for it to be stored), so pre-copy keeps the disk a tenth of the
//! time it would;
//! *halted* (level ≥ [`HALT`]) reads nothing until the level is below 1.
//! Going back to copying needs the level below [`RESUME`] (hysteresis: a
//! guest hovering at its limit does not flip the gate each sample). The
//! state, the load and why are published in the job's status.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::qemu::guest_agent::GuestAgent;
use crate::qemu::qmp::Qmp;

pub const SAMPLE: Duration = Duration::from_millis(250);
const ALPHA: f64 = 0.5;
const THROTTLED_DUTY: u32 = 9;
const RESUME: f64 = 0.8;
const HALT: f64 = 1.25;

/// `--load-limit latency=MS,queue=N,cpu=PCT` (any of them).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct LoadLimit {
    /// Mean guest I/O latency, ms.
    pub latency_ms: Option<f64>,
    /// Mean requests in flight.
    pub queue: Option<f64>,
    /// Guest CPU busy, percent (needs the guest agent).
    pub cpu_pct: Option<f64>,
}

impl LoadLimit {
    pub fn parse(s: &str) -> Result<LoadLimit> {
        let bad = || {
            Error::invalid(format!(
                "--load-limit {s:?}: expected latency=MS,queue=N,cpu=PCT (any of them, each more than 0)"
            ))
        };
        let mut l = LoadLimit::default();
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(bad)?;
            let v: f64 = v
                .trim_end_matches("ms")
                .trim_end_matches('%')
                .parse()
                .map_err(|_| bad())?;
            if !(v.is_finite() && v > 0.0) {
                return Err(bad());
            }
            match k {
                "latency" => l.latency_ms = Some(v),
                "queue" => l.queue = Some(v),
                "cpu" => l.cpu_pct = Some(v),
                _ => return Err(bad()),
            }
        }
        Ok(l)
    }
}

/// The guest's load as last measured (moving averages).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Load {
    pub latency_ms: f64,
    pub queue_depth: f64,
    pub cpu_pct: Option<f64>,
    /// The largest ratio to a limit (0 without limits).
    pub level: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Gate {
    #[default]
    Copying,
    Throttled,
    Halted,
}

/// Where a throttle's I/O figures come from.
pub trait LoadSource {
    /// Guest requests completed so far, and the nanoseconds they spent in
    /// flight (both monotonic).
    fn io(&mut self) -> Result<(u64, u64)>;
}

impl LoadSource for Qmp {
    fn io(&mut self) -> Result<(u64, u64)> {
        let st = self.block_stats()?;
        let ops = st
            .iter()
            .map(|d| d.rd_operations + d.wr_operations + d.flush_operations)
            .sum();
        let time_ns = (st.iter())
            .map(|d| d.rd_total_time_ns + d.wr_total_time_ns + d.flush_total_time_ns)
            .sum();
        Ok((ops, time_ns))
    }
}

impl Gate {
    /// As a job's `state` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Gate::Copying => "copying",
            Gate::Throttled => "throttled",
            Gate::Halted => "halted",
        }
    }
}

/// Counters of one sample.
#[derive(Clone, Copy)]
struct Counters {
    at: Instant,
    ops: u64,
    time_ns: u64,
    /// Guest CPU (busy, total) jiffies.
    cpu: Option<(u64, u64)>,
}

pub struct Throttle {
    limit: Option<LoadLimit>,
    agent: Option<GuestAgent>,
    last: Option<Counters>,
    pub load: Option<Load>,
    pub gate: Gate,
    pub why: String,
    /// Time spent throttled or halted.
    pub held: Duration,
}

impl Throttle {
    pub fn new(limit: Option<LoadLimit>, agent: Option<GuestAgent>) -> Throttle {
        Throttle {
            limit,
            agent,
            last: None,
            load: None,
            gate: Gate::Copying,
            why: String::new(),
            held: Duration::ZERO,
        }
    }

    /// Gives the guest agent up (the final backup freezes through it).
    pub fn release_agent(&mut self) {
        self.agent = None;
    }

    /// Takes a sample if one is due; updates the load and the gate.
    pub fn sample(&mut self, q: &mut dyn LoadSource) -> Result<()> {
        if self.last.is_some_and(|l| l.at.elapsed() < SAMPLE) {
            return Ok(());
        }
        let now = self.counters(q)?;
        if let Some(prev) = self.last.replace(now) {
            self.update(prev, now);
        }
        Ok(())
    }

    fn counters(&mut self, q: &mut dyn LoadSource) -> Result<Counters> {
        let (ops, time_ns) = q.io()?;
        let cpu = match self.agent.as_mut().map(cpu_jiffies) {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                tracing::warn!("guest CPU load unknown, the guest agent failed: {e}");
                self.agent = None;
                None
            }
            None => None,
        };
        Ok(Counters {
            at: Instant::now(),
            ops,
            time_ns,
            cpu,
        })
    }

    fn update(&mut self, a: Counters, b: Counters) {
        let wall = (b.at - a.at).as_nanos().max(1) as f64;
        let ops = b.ops.saturating_sub(a.ops);
        let time = b.time_ns.saturating_sub(a.time_ns) as f64;
        let latency_ms = match ops {
            0 => 0.0,
            n => time / n as f64 / 1e6,
        };
        let queue_depth = time / wall;
        let cpu_pct = match (a.cpu, b.cpu) {
            (Some((ab, at)), Some((bb, bt))) if bt > at => {
                Some(bb.saturating_sub(ab) as f64 * 100.0 / (bt - at) as f64)
            }
            _ => None,
        };
        let avg = |old: f64, new: f64| old + ALPHA * (new - old);
        let mut l = match self.load {
            Some(o) => Load {
                latency_ms: avg(o.latency_ms, latency_ms),
                queue_depth: avg(o.queue_depth, queue_depth),
                cpu_pct: match (o.cpu_pct, cpu_pct) {
                    (Some(x), Some(y)) => Some(avg(x, y)),
                    (_, y) => y,
                },
                level: 0.0,
            },
            None => Load {
                latency_ms,
                queue_depth,
                cpu_pct,
                level: 0.0,
            },
        };
        let (level, why) = self.level(&l);
        l.level = level;
        self.load = Some(l);
        self.gate = match self.gate {
            _ if level >= HALT => Gate::Halted,
            Gate::Halted if level >= 1.0 => Gate::Halted,
            Gate::Copying if level < 1.0 => Gate::Copying,
            Gate::Throttled | Gate::Halted if level < RESUME => Gate::Copying,
            _ => Gate::Throttled,
        };
        self.why = match self.gate {
            Gate::Copying => String::new(),
            _ => why,
        };
    }

    /// The largest ratio to a limit, and which figure it is.
    fn level(&self, l: &Load) -> (f64, String) {
        let Some(lim) = self.limit else {
            return (0.0, String::new());
        };
        let mut best = (0.0, String::new());
        let mut consider = |v: f64, limit: Option<f64>, what: &str, unit: &str| {
            if let Some(m) = limit {
                if v / m > best.0 {
                    best = (
                        v / m,
                        format!("guest {what} {v:.1}{unit} (limit {m}{unit})"),
                    );
                }
            }
        };
        consider(l.latency_ms, lim.latency_ms, "I/O latency", " ms");
        consider(l.queue_depth, lim.queue, "queue depth", "");
        if let Some(c) = l.cpu_pct {
            consider(c, lim.cpu_pct, "CPU busy", "%");
        }
        best
    }

    /// Before a chunk read: waits while halted (sampling), unless `go_on`
    /// says to stop waiting (a stop, or the scheduled backup is due).
    pub fn before_read(&mut self, q: &mut dyn LoadSource, go_on: &dyn Fn() -> bool) -> Result<()> {
        self.before_read_watched(q, go_on, &mut |_| {})
    }

    /// [`Self::before_read`], showing each sample to `watch` (a status
    /// that must say "halted" while it waits).
    pub fn before_read_watched(
        &mut self,
        q: &mut dyn LoadSource,
        go_on: &dyn Fn() -> bool,
        watch: &mut dyn FnMut(&Throttle),
    ) -> Result<()> {
        self.sample(q)?;
        watch(self);
        while self.gate == Gate::Halted && go_on() {
            std::thread::sleep(SAMPLE);
            self.held += SAMPLE;
            self.sample(q)?;
            watch(self);
        }
        Ok(())
    }

    /// After a chunk read that took `took`: throttled, leave the guest
    /// `THROTTLED_DUTY` times as long.
    pub fn after_read(&mut self, took: Duration) {
        if self.gate == Gate::Throttled {
            let pause = took * THROTTLED_DUTY;
            std::thread::sleep(pause);
            self.held += pause;
        }
    }
}

/// Busy and total jiffies over every guest CPU (`guest-get-cpustats`).
fn cpu_jiffies(a: &mut GuestAgent) -> Result<(u64, u64)> {
    let r = a.execute("guest-get-cpustats", None, Duration::from_secs(5))?;
    let (mut busy, mut total) = (0u64, 0u64);
    for c in r.as_array().into_iter().flatten() {
        let n = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
        let idle = n("idle") + n("iowait");
        let b = n("user") + n("nice") + n("system") + n("irq") + n("softirq") + n("steal");
        busy += b;
        total += b + idle;
    }
    Ok((busy, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(at: Instant, ops: u64, time_ns: u64) -> Counters {
        Counters {
            at,
            ops,
            time_ns,
            cpu: None,
        }
    }

    #[test]
    fn load_limits_parse_and_bad_ones_are_one_line_errors() {
        let l = LoadLimit::parse("latency=5ms,queue=2").unwrap();
        assert_eq!(l.latency_ms, Some(5.0));
        assert_eq!(l.queue, Some(2.0));
        assert_eq!(l.cpu_pct, None);
        assert_eq!(LoadLimit::parse("cpu=80%").unwrap().cpu_pct, Some(80.0));
        for bad in ["latency", "latency=0", "speed=3", "queue=-1", "latency=x"] {
            let e = LoadLimit::parse(bad).unwrap_err();
            assert!(e.to_string().contains("expected latency=MS"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_gate_throttles_above_the_limit_halts_well_above_and_resumes_only_below_it_with_hysteresis(
    ) {
        let lim = LoadLimit::parse("latency=10").unwrap();
        let mut t = Throttle::new(Some(lim), None);
        let t0 = Instant::now();
        let mut ns = 0;
        let mut step = |t: &mut Throttle, i: u64, latency_ms: f64| {
            // 100 requests per sample at this latency.
            let a = counters(t0 + SAMPLE * i as u32, i * 100, ns);
            ns += (latency_ms * 1e6) as u64 * 100;
            let b = counters(t0 + SAMPLE * (i + 1) as u32, (i + 1) * 100, ns);
            t.update(a, b);
            t.gate
        };
        assert_eq!(step(&mut t, 0, 2.0), Gate::Copying);
        // The moving average climbs over the limit: throttled, then halted
        // well above it.
        let mut seen = vec![];
        for i in 1..12 {
            seen.push(step(&mut t, i, 12.0));
        }
        for i in 12..16 {
            seen.push(step(&mut t, i, 40.0));
        }
        assert_eq!(seen[10], Gate::Throttled, "{seen:?}");
        assert_eq!(seen.last(), Some(&Gate::Halted));
        assert!(t.why.contains("I/O latency"), "{}", t.why);
        // Falling: halted until below the limit, then throttled until
        // below 80% of it, then copying.
        let mut seen = vec![];
        for i in 16..34 {
            seen.push((step(&mut t, i, 1.0), t.load.unwrap().level));
        }
        for (g, level) in &seen {
            match g {
                Gate::Halted => assert!(*level >= 1.0, "{seen:?}"),
                Gate::Throttled => assert!(*level >= RESUME, "{seen:?}"),
                Gate::Copying => assert!(*level < RESUME, "{seen:?}"),
            }
        }
        assert_eq!(seen.last().unwrap().0, Gate::Copying);
        // No limit: never held back.
        let mut free = Throttle::new(None, None);
        assert_eq!(step(&mut free, 40, 500.0), Gate::Copying);
    }
}
