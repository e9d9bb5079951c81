//! Lock-free counters and a log-bucketed latency histogram, cheap enough
//! for the data path and good enough for mean and p99 in `status`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const BUCKETS: usize = 128;
/// Buckets per doubling: 4 gives ~19% resolution.
const STEPS: f64 = 4.0;

pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let idx = (((us + 1) as f64).log2() * STEPS) as usize;
        self.buckets[idx.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn mean_us(&self) -> f64 {
        let n = self.count();
        if n == 0 {
            0.0
        } else {
            self.sum_us.load(Ordering::Relaxed) as f64 / n as f64
        }
    }

    /// Recorded latencies in buckets that start at or above `d` (a bucket
    /// straddling `d` counts as fast: ~19% resolution).
    pub fn count_over(&self, d: Duration) -> u64 {
        let us = d.as_micros() as f64;
        (self.buckets.iter().enumerate())
            .filter(|(i, _)| 2f64.powf(*i as f64 / STEPS) - 1.0 >= us)
            .map(|(_, b)| b.load(Ordering::Relaxed))
            .sum()
    }

    /// Upper bound of the bucket holding quantile `q` (0..1), in µs.
    pub fn quantile_us(&self, q: f64) -> f64 {
        let n = self.count();
        if n == 0 {
            return 0.0;
        }
        let target = ((n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= target {
                return 2f64.powf((i as f64 + 1.0) / STEPS) - 1.0;
            }
        }
        f64::MAX
    }
}

/// A named monotonically increasing counter.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_lands_near_the_slow_tail() {
        let h = LatencyHistogram::default();
        for _ in 0..990 {
            h.record(Duration::from_micros(100));
        }
        for _ in 0..10 {
            h.record(Duration::from_millis(20));
        }
        let p50 = h.quantile_us(0.5);
        let p99 = h.quantile_us(0.99);
        let p999 = h.quantile_us(0.999);
        assert!((100.0..130.0).contains(&p50), "p50 {p50}");
        assert!(p99 < 130.0, "p99 {p99}");
        assert!((20_000.0..24_000.0).contains(&p999), "p999 {p999}");
        assert!((h.mean_us() - 299.0).abs() < 1.0);
    }

    #[test]
    fn only_buckets_wholly_over_a_threshold_count_as_over_it() {
        let h = LatencyHistogram::default();
        for _ in 0..90 {
            h.record(Duration::from_micros(100));
        }
        for _ in 0..7 {
            h.record(Duration::from_millis(2));
        }
        h.record(Duration::from_micros(260));
        assert_eq!(h.count_over(Duration::from_millis(1)), 7);
        assert_eq!(h.count_over(Duration::from_micros(150)), 8);
        assert_eq!(h.count_over(Duration::from_millis(5)), 0);
    }
}
