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
//! **The tail** (`p99=MS`). A mean hides what a guest feels: copying in
//! bursts can leave the mean under its limit while one request in fifty
//! waits milliseconds. With a p99 limit the source also counts requests
//! slower than it (QEMU's own latency histograms, set by
//! `block-latency-histogram-set` with the limit as a bin edge on drives
//! that have none and removed at the job's end; a drive that already has
//! one, someone else's, is read as it is, at its first edge at or above
//! the limit; a session's volumes keep their own histogram). The figure is
//! the share of requests over the limit in the last [`TAIL_SAMPLES`]
//! samples, against a budget of [`TAIL_BUDGET_PCT`] (the definition of a
//! p99). It drives both the level and a **pace**: chunks are spaced to an
//! adaptive byte rate that grows by [`PACE_STEP`] after each sample with
//! no slow request and halves after a sample with slow ones while the
//! window is over [`TAIL_SETPOINT_PCT`] (AIMD, as TCP does with losses),
//! so pre-copy settles at the rate the guest's tail tolerates instead of
//! alternating bursts at full speed with halts. The setpoint sits below
//! the budget: a pace that backed off only at the budget would hold the
//! guest's p99 *at* the limit on average, over it half the time.
//!
//! **Gate,** consulted before every chunk read: *copying* reads freely
//! (paced, under a p99 limit);
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
/// Samples the tail figure looks back over (4 s).
const TAIL_SAMPLES: usize = 16;
/// Share of requests allowed over the p99 limit, percent.
const TAIL_BUDGET_PCT: f64 = 1.0;
/// Share over the limit above which the pace backs off, percent.
const TAIL_SETPOINT_PCT: f64 = 0.75;
/// Fewer requests than this in the window count as this many: a guest
/// that made five requests has no p99 worth halting for.
const TAIL_MIN_REQUESTS: u64 = 200;
/// The pace's first rate, its additive step per clean sample and its
/// floor, bytes per second.
const PACE_START: f64 = 16e6;
const PACE_STEP: f64 = 4e6;
const PACE_MIN: f64 = 1e6;
/// A pause checks whether to go on at least this often.
pub(super) const PAUSE_SLICE: Duration = Duration::from_millis(50);

/// `--load-limit latency=MS,p99=MS,queue=N,cpu=PCT` (any of them).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct LoadLimit {
    /// Mean guest I/O latency, ms.
    pub latency_ms: Option<f64>,
    /// Mean requests in flight.
    pub queue: Option<f64>,
    /// Guest CPU busy, percent (needs the guest agent).
    pub cpu_pct: Option<f64>,
    /// p99 guest I/O latency, ms: at most 1% of requests may be slower.
    pub p99_ms: Option<f64>,
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
                "p99" => l.p99_ms = Some(v),
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
    /// Share of requests over the p99 limit in the last few seconds,
    /// percent (with a p99 limit, where the source can tell).
    pub slow_pct: Option<f64>,
    /// The pace pre-copy keeps under a p99 limit, MB/s.
    pub pace_mb_s: Option<f64>,
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

/// A load source's counters, all monotonic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoCounts {
    /// Guest requests completed so far.
    pub ops: u64,
    /// The nanoseconds they spent in flight.
    pub time_ns: u64,
    /// Requests, and those slower than the `over` asked for; `None` where
    /// the source keeps no latency histogram or none was asked for.
    pub tail: Option<(u64, u64)>,
}

/// Where a throttle's I/O figures come from.
pub trait LoadSource {
    /// The counters now; with `over`, also the requests slower than it
    /// (from the same reading: one QMP round trip per sample, since every
    /// query runs in QEMU's main loop beside the guest's I/O).
    fn io(&mut self, over: Option<Duration>) -> Result<IoCounts>;

    /// Gives back what [`Self::io`] set up in the source to count slow
    /// requests.
    fn release_tail(&mut self, over: Duration) {
        let _ = over;
    }
}

impl LoadSource for Qmp {
    fn io(&mut self, over: Option<Duration>) -> Result<IoCounts> {
        let r = self.execute("query-blockstats", None)?;
        let st = self.block_stats_of(&r)?;
        let ops = st
            .iter()
            .map(|d| d.rd_operations + d.wr_operations + d.flush_operations)
            .sum();
        let time_ns = (st.iter())
            .map(|d| d.rd_total_time_ns + d.wr_total_time_ns + d.flush_total_time_ns)
            .sum();
        let tail = match over {
            Some(o) => Some(crate::qemu::histogram::requests_over(self, &r, o)?),
            None => None,
        };
        Ok(IoCounts { ops, time_ns, tail })
    }

    fn release_tail(&mut self, over: Duration) {
        if let Err(e) = crate::qemu::histogram::remove_ours(self, over) {
            tracing::warn!("removing pre-copy's latency histograms: {e}");
        }
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
    /// Requests, and those over the p99 limit.
    tail: Option<(u64, u64)>,
}

/// The last samples' (requests, slow requests), for the tail figure.
#[derive(Default)]
struct TailWindow {
    samples: std::collections::VecDeque<(u64, u64)>,
}

impl TailWindow {
    fn push(&mut self, requests: u64, slow: u64) {
        if self.samples.len() == TAIL_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((requests, slow));
    }

    /// Percent of the window's requests over the limit.
    fn slow_pct(&self) -> f64 {
        let (n, s) = (self.samples.iter()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        s as f64 * 100.0 / n.max(TAIL_MIN_REQUESTS) as f64
    }
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
    tail: TailWindow,
    /// Bytes per second chunks are spaced to (under a p99 limit).
    pace: Option<f64>,
    /// The source keeps no histogram: said once.
    tail_blind: bool,
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
            tail: TailWindow::default(),
            pace: None,
            tail_blind: false,
        }
    }

    /// The p99 limit as a duration, if there is one.
    fn p99_limit(&self) -> Option<Duration> {
        let ms = self.limit?.p99_ms?;
        Some(Duration::from_secs_f64(ms / 1000.0))
    }

    /// Gives back the histograms the tail figure set up in `q`.
    pub fn release_tail(&mut self, q: &mut dyn LoadSource) {
        if let Some(over) = self.p99_limit() {
            q.release_tail(over);
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
        let io = q.io(self.p99_limit())?;
        let cpu = match self.agent.as_mut().map(cpu_jiffies) {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                tracing::warn!("guest CPU load unknown, the guest agent failed: {e}");
                self.agent = None;
                None
            }
            None => None,
        };
        if self.p99_limit().is_some() && io.tail.is_none() && !self.tail_blind {
            tracing::warn!(
                "the p99 limit is not applied: this load source keeps no latency histogram"
            );
            self.tail_blind = true;
        }
        Ok(Counters {
            at: Instant::now(),
            ops: io.ops,
            time_ns: io.time_ns,
            cpu,
            tail: io.tail,
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
        let slow_pct = match (a.tail, b.tail) {
            (Some((an, asl)), Some((bn, bsl))) => {
                let slow = bsl.saturating_sub(asl);
                self.tail.push(bn.saturating_sub(an), slow);
                let pct = self.tail.slow_pct();
                self.adapt_pace(slow, pct);
                Some(pct)
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
                slow_pct,
                pace_mb_s: self.pace.map(|r| r / 1e6),
                level: 0.0,
            },
            None => Load {
                latency_ms,
                queue_depth,
                cpu_pct,
                slow_pct,
                pace_mb_s: self.pace.map(|r| r / 1e6),
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

    /// AIMD on the tail: after a sample with slow requests while the
    /// window is over the setpoint, halve the pace; after a clean one, add a
    /// step. (Slow requests already counted do not halve it again as they
    /// age through the window.)
    fn adapt_pace(&mut self, sample_slow: u64, window_pct: f64) {
        let r = self.pace.get_or_insert(PACE_START);
        if sample_slow > 0 && window_pct > TAIL_SETPOINT_PCT {
            *r = (*r / 2.0).max(PACE_MIN);
        } else if sample_slow == 0 {
            *r += PACE_STEP;
        }
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
        if let (Some(p), Some(ms)) = (l.slow_pct, lim.p99_ms) {
            let what = format!("requests over {ms} ms");
            consider(p, Some(TAIL_BUDGET_PCT), &what, "%");
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

    /// After a chunk of `bytes` that cost `took`: throttled, leave the
    /// guest `THROTTLED_DUTY` times as long; under a p99 limit, space
    /// chunks to the pace. The pause ends early once `go_on` says no (a
    /// stop, or the backup is due: a slow pace must not delay it).
    pub fn after_read(&mut self, took: Duration, bytes: u64, go_on: &dyn Fn() -> bool) {
        let mut pause = Duration::ZERO;
        if self.gate == Gate::Throttled {
            pause = took * THROTTLED_DUTY;
        }
        if let Some(rate) = self.pace {
            let due = Duration::from_secs_f64(bytes as f64 / rate);
            pause = pause.max(due.saturating_sub(took));
        }
        let end = Instant::now() + pause;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if left.is_zero() || !go_on() {
                break;
            }
            std::thread::sleep(left.min(PAUSE_SLICE));
        }
        self.held += pause.saturating_sub(end.saturating_duration_since(Instant::now()));
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
            tail: None,
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

    /// One sample of `n` requests, `slow` of them over the limit.
    fn tail_step(t: &mut Throttle, t0: Instant, i: u32, n: u64, slow: u64, acc: &mut (u64, u64)) {
        let mut a = counters(t0 + SAMPLE * i, 0, 0);
        a.tail = Some(*acc);
        acc.0 += n;
        acc.1 += slow;
        let mut b = counters(t0 + SAMPLE * (i + 1), 0, 0);
        b.tail = Some(*acc);
        t.update(a, b);
    }

    #[test]
    fn under_a_p99_limit_the_pace_halves_on_slow_requests_over_budget_and_grows_while_clean() {
        let lim = LoadLimit::parse("p99=0.3").unwrap();
        assert_eq!(lim.p99_ms, Some(0.3));
        let mut t = Throttle::new(Some(lim), None);
        let (t0, mut acc) = (Instant::now(), (0, 0));
        // Clean samples: additive growth from the start rate.
        for i in 0..4 {
            tail_step(&mut t, t0, i, 50, 0, &mut acc);
        }
        assert_eq!(t.pace, Some(PACE_START + 4.0 * PACE_STEP));
        assert_eq!(t.gate, Gate::Copying);
        // 4 slow of 250 in the window (1.6%): halved once, and halted (the
        // share is over 1.25× the budget).
        tail_step(&mut t, t0, 4, 50, 4, &mut acc);
        assert_eq!(t.pace, Some((PACE_START + 4.0 * PACE_STEP) / 2.0));
        assert_eq!(t.gate, Gate::Halted, "{}", t.why);
        assert!(t.why.contains("over 0.3 ms"), "{}", t.why);
        let l = t.load.unwrap();
        assert!((l.slow_pct.unwrap() - 1.6).abs() < 1e-9, "{l:?}");
        // The slow requests age in the window without halving it again;
        // once they have left it, the gate opens and the pace grows.
        let halved = t.pace.unwrap();
        for i in 5..5 + TAIL_SAMPLES as u32 {
            tail_step(&mut t, t0, i, 50, 0, &mut acc);
        }
        assert_eq!(t.gate, Gate::Copying);
        assert!(t.pace.unwrap() > halved);
    }

    #[test]
    fn the_pace_backs_off_between_the_setpoint_and_the_budget_while_the_gate_stays_open() {
        let mut t = Throttle::new(Some(LoadLimit::parse("p99=0.3").unwrap()), None);
        let (t0, mut acc) = (Instant::now(), (0, 0));
        tail_step(&mut t, t0, 0, 500, 0, &mut acc);
        let before = t.pace.unwrap();
        // 4 slow of 1000 (0.4%): under the setpoint, the pace is left.
        tail_step(&mut t, t0, 1, 500, 4, &mut acc);
        assert_eq!(t.pace, Some(before));
        // 9 slow of 1500 (0.6%): still under it.
        tail_step(&mut t, t0, 2, 500, 5, &mut acc);
        assert_eq!(t.pace, Some(before));
        // 14 slow of 2000 (0.7%)... then 18 of 2500 (0.72%), 23 of 3000
        // (0.77%): over the setpoint, under the budget: the pace halves,
        // the gate stays open.
        tail_step(&mut t, t0, 3, 500, 5, &mut acc);
        tail_step(&mut t, t0, 4, 500, 4, &mut acc);
        assert_eq!(t.pace, Some(before));
        tail_step(&mut t, t0, 5, 500, 5, &mut acc);
        assert_eq!(t.pace, Some(before / 2.0));
        assert_eq!(t.gate, Gate::Copying, "{}", t.why);
    }

    #[test]
    fn one_slow_request_of_a_nearly_idle_guest_does_not_halt_pre_copy() {
        let mut t = Throttle::new(Some(LoadLimit::parse("p99=1").unwrap()), None);
        let (t0, mut acc) = (Instant::now(), (0, 0));
        tail_step(&mut t, t0, 0, 3, 1, &mut acc);
        assert_eq!(t.gate, Gate::Copying);
        assert!((t.load.unwrap().slow_pct.unwrap() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn chunks_are_spaced_to_the_pace() {
        let mut t = Throttle::new(Some(LoadLimit::parse("p99=1").unwrap()), None);
        t.pace = Some(1e6);
        let t0 = Instant::now();
        // 20 kB at 1 MB/s is 20 ms; the chunk already cost 5 of them.
        t.after_read(Duration::from_millis(5), 20_000, &|| true);
        let slept = t0.elapsed();
        assert!(slept >= Duration::from_millis(15), "{slept:?}");
        assert!(slept < Duration::from_millis(500), "{slept:?}");
        assert!(t.held >= Duration::from_millis(14), "{:?}", t.held);
        // A 2 MB chunk at 1 MB/s would wait 2 s; a stop ends it at once.
        let t0 = Instant::now();
        let stop_at = t0 + Duration::from_millis(100);
        t.after_read(Duration::ZERO, 2_000_000, &|| Instant::now() < stop_at);
        let slept = t0.elapsed();
        assert!(slept < Duration::from_millis(1000), "{slept:?}");
    }
}
