//! A histogram that takes no lock: one atomic counter per bucket and one for the sum.
//!
//! prometheus-client's own `Histogram` keeps its buckets behind a mutex that every
//! `observe` takes; on the request path that is a lock per request shared by every worker.
//! Here an observation is a bucket search over a fixed table and two relaxed atomic additions.
//! A scrape reads the counters one by one, so it may see an observation's bucket and not yet
//! its sum; the count is the buckets' total, so `_count` always equals the `+Inf` bucket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds: from 100 µs (the proxy's own share of a warm
/// request) to a minute (a slow IAM call or a long download). A last bucket, `+Inf`, takes the
/// rest.
pub const BOUNDS_US: [u64; 18] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

const BUCKETS: usize = BOUNDS_US.len() + 1;

/// Durations, in seconds when exposed.
#[derive(Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; BUCKETS],
    /// The sum of the observations, in microseconds: an integer, so adding is one atomic
    /// addition rather than a compare-and-swap loop on a float.
    sum_us: AtomicU64,
}

/// What a scrape reads from a [`Histogram`].
pub struct Snapshot {
    /// `(upper bound in seconds, observations in this bucket)`, the last bound infinite
    /// (which the encoder writes as `+Inf`).
    pub buckets: [(f64, u64); BUCKETS],
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    #[inline]
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BOUNDS_US.partition_point(|&b| b < us);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut buckets = [(f64::INFINITY, 0u64); BUCKETS];
        let mut count = 0u64;
        for (i, (slot, n)) in buckets.iter_mut().zip(&self.buckets).enumerate() {
            if let Some(&b) = BOUNDS_US.get(i) {
                slot.0 = b as f64 / 1e6;
            }
            slot.1 = n.load(Ordering::Relaxed);
            count = count.wrapping_add(slot.1);
        }
        Snapshot {
            buckets,
            count,
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }

    pub fn count(&self) -> u64 {
        self.buckets
            .iter()
            .fold(0u64, |n, b| n.wrapping_add(b.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::default();
        // On a bound, just past it, below the first, past the last.
        for us in [100, 101, 1, 60_000_000, 60_000_001, 2_000_000] {
            h.observe(Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 6);
        assert_eq!(h.count(), 6);
        let at = |bound: f64| s.buckets.iter().find(|b| b.0 == bound).unwrap().1;
        assert_eq!(at(0.0001), 2, "1 µs and 100 µs");
        assert_eq!(at(0.00025), 1, "101 µs");
        assert_eq!(at(2.5), 1);
        assert_eq!(at(60.0), 1);
        assert_eq!(
            s.buckets[BUCKETS - 1],
            (f64::INFINITY, 1),
            "+Inf takes the rest"
        );
        let sum = (100 + 101 + 1 + 60_000_000 + 60_000_001 + 2_000_000) as f64 / 1e6;
        assert!((s.sum_seconds - sum).abs() < 1e-9, "{}", s.sum_seconds);
    }
}
