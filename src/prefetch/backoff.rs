//! How many in-flight places background fetches may hold, driven by on-demand
//! fetch latency: halve when it rises well above its recent best, grow by
//! one while it stays near it (AIMD, as in TCP congestion control). Prefetch
//! must never make the guest slower than no prefetch at all.

use std::time::{Duration, Instant};

/// On-demand latency this far above its baseline means background
/// fetches compete with the guest.
const RISE: f64 = 1.5;
/// Below this, there is room for one more background fetch.
const CALM: f64 = 1.2;
/// With no on-demand fetch for this long, background may use all it has.
const IDLE: Duration = Duration::from_millis(500);
/// The baseline creeps up per sample so a repository that became slower
/// for good stops counting as congestion after a few hundred fetches.
const BASELINE_CREEP: f64 = 1.002;

#[derive(Debug)]
pub struct Backoff {
    max: usize,
    limit: usize,
    ewma_us: Option<f64>,
    baseline_us: f64,
    last_change: Option<Instant>,
    last_sample: Option<Instant>,
}

impl Backoff {
    pub fn new(max: usize) -> Backoff {
        Backoff {
            max: max.max(1),
            limit: max.max(1),
            ewma_us: None,
            baseline_us: f64::MAX,
            last_change: None,
            last_sample: None,
        }
    }

    fn idle(&self, now: Instant) -> bool {
        self.last_sample.is_none_or(|t| now - t > IDLE)
    }

    /// Background fetches allowed at once now.
    pub fn limit(&self, now: Instant) -> usize {
        if self.idle(now) {
            self.max
        } else {
            self.limit
        }
    }

    /// The smoothed on-demand fetch time (zero before the first fetch).
    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.ewma_us.unwrap_or(0.0) as u64)
    }

    /// Feeds one on-demand fetch time taken at `now`.
    pub fn observe(&mut self, took: Duration, now: Instant) {
        if self.idle(now) {
            self.limit = self.max;
        }
        self.last_sample = Some(now);
        let sample = took.as_micros() as f64;
        let ewma = match self.ewma_us {
            Some(e) => 0.75 * e + 0.25 * sample,
            None => sample,
        };
        self.ewma_us = Some(ewma);
        self.baseline_us = (self.baseline_us * BASELINE_CREEP).min(ewma);
        // One decision per smoothed fetch time: the effect of the last
        // change must show in the samples before the next.
        let period = Duration::from_micros(ewma as u64).max(Duration::from_millis(5));
        if self.last_change.is_some_and(|t| now - t < period) {
            return;
        }
        let before = self.limit;
        if ewma > RISE * self.baseline_us {
            self.limit = (self.limit / 2).max(1);
        } else if ewma < CALM * self.baseline_us {
            self.limit = (self.limit + 1).min(self.max);
        }
        if self.limit != before {
            self.last_change = Some(now);
            tracing::debug!(
                limit = self.limit,
                ewma_ms = ewma / 1000.0,
                baseline_ms = self.baseline_us / 1000.0,
                "background fetch limit"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(b: &mut Backoff, t: &mut Instant, ms: u64, n: usize) {
        for _ in 0..n {
            *t += Duration::from_millis(ms.max(5) + 1);
            b.observe(Duration::from_millis(ms), *t);
        }
    }

    #[test]
    fn rising_on_demand_latency_halves_background_down_to_one() {
        let mut b = Backoff::new(12);
        let mut t = Instant::now();
        feed(&mut b, &mut t, 10, 20);
        assert_eq!(b.limit(t), 12);
        feed(&mut b, &mut t, 40, 30);
        assert_eq!(b.limit(t), 1);
    }

    #[test]
    fn latency_back_at_baseline_lets_background_grow_again() {
        let mut b = Backoff::new(8);
        let mut t = Instant::now();
        feed(&mut b, &mut t, 10, 10);
        feed(&mut b, &mut t, 50, 30);
        assert_eq!(b.limit(t), 1);
        feed(&mut b, &mut t, 10, 100);
        assert_eq!(b.limit(t), 8);
    }

    #[test]
    fn without_on_demand_fetches_background_may_use_every_worker() {
        let mut b = Backoff::new(6);
        let mut t = Instant::now();
        feed(&mut b, &mut t, 10, 5);
        feed(&mut b, &mut t, 60, 20);
        assert_eq!(b.limit(t), 1);
        assert_eq!(b.limit(t + IDLE + Duration::from_millis(1)), 6);
    }
}
