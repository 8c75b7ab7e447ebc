//! Latency histogram: constant memory, fixed relative precision, cheap to record into from
//! the I/O loop and to merge across queues.

use std::time::Duration;

/// Linear sub-buckets per power of two: values are kept to within 1/16 (about 6%).
const SUB_BUCKETS: u64 = 16;
const SUB_BITS: u32 = SUB_BUCKETS.trailing_zeros();
/// Values below SUB_BUCKETS get exact buckets; every power of two from there to 2^63 gets
/// SUB_BUCKETS more.
const BUCKETS: usize = ((64 - SUB_BITS) as usize + 1) * SUB_BUCKETS as usize;

/// A histogram of durations in nanoseconds.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB_BUCKETS {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros();
    let sub = (ns >> (exp - SUB_BITS)) & (SUB_BUCKETS - 1);
    ((exp - SUB_BITS + 1) as u64 * SUB_BUCKETS + sub) as usize
}

/// The middle of the range of values that fall in `bucket`.
fn bucket_value(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < SUB_BUCKETS {
        return bucket;
    }
    let group = bucket / SUB_BUCKETS;
    let sub = bucket % SUB_BUCKETS;
    let shift = (group - 1) as u32;
    let low = (SUB_BUCKETS + sub) << shift;
    low + ((1u64 << shift) >> 1)
}

impl Histogram {
    /// Records one duration.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(ns)] += 1;
        self.total += 1;
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }

    /// The value below which a fraction `q` (0..=1) of the recorded durations fall, to within
    /// the bucket precision; `None` when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Duration::from_nanos(bucket_value(bucket)));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_within_precision() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([1 << 40, u64::MAX / 3, u64::MAX]) {
            let b = bucket_of(ns);
            assert!(b < BUCKETS);
            assert!(b >= last || ns > 100_000, "bucket order at {ns}");
            last = b;
            let v = bucket_value(b);
            let err = v.abs_diff(ns) as f64;
            assert!(err <= ns as f64 / 16.0 + 1.0, "{ns} -> bucket {b} -> {v}");
        }
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let within = |q: f64, expect_us: f64| {
            let got = h.quantile(q).unwrap().as_secs_f64() * 1e6;
            assert!(
                (got - expect_us).abs() <= expect_us / 16.0 + 0.001,
                "q{q}: {got} vs {expect_us}"
            );
        };
        within(0.5, 500.0);
        within(0.99, 990.0);
        within(1.0, 1000.0);
        within(0.0, 1.0);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        for _ in 0..99 {
            a.record(Duration::from_micros(10));
        }
        b.record(Duration::from_millis(50));
        a.merge(&b);
        assert!(a.quantile(0.99).unwrap() < Duration::from_micros(11));
        assert!(a.quantile(0.999).unwrap() > Duration::from_millis(45));
    }
}
