//! A log-linear latency histogram: fixed memory, mergeable, ≤ 0.4 % error.
//!
//! Values below 128 get one bucket each; above that every power of two is
//! split into 128 linear sub-buckets (HdrHistogram's layout with 7 bits of
//! precision). A bucket spans at most 1/128 of its lower bound and quantiles
//! report its midpoint, so the relative error is at most 1/256. The whole
//! `u64` range fits in 7424 counters, so recording never allocates or fails.

use alloc::vec;
use alloc::vec::Vec;

const SUB_BITS: u32 = 7;
const SUB: usize = 1 << SUB_BITS;
/// 128 exact buckets plus 128 per power of two from 2^7 to 2^63.
pub const BUCKETS: usize = SUB + (64 - SUB_BITS as usize) * SUB;

fn index(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros();
    let shift = exp - SUB_BITS;
    let sub = (v >> shift) as usize - SUB;
    SUB + shift as usize * SUB + sub
}

/// Smallest and largest value that land in bucket `idx`.
fn bounds(idx: usize) -> (u64, u64) {
    if idx < SUB {
        return (idx as u64, idx as u64);
    }
    let shift = (idx - SUB) / SUB;
    let sub = (idx - SUB) % SUB;
    let lo = ((SUB + sub) as u64) << shift;
    (lo, lo + ((1u64 << shift) - 1))
}

#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    min: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            count: 0,
            min: u64::MAX,
            max: 0,
            sum: 0,
        }
    }

    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += u128::from(v);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Largest recorded value (exact), 0 if empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Smallest recorded value (exact), 0 if empty.
    pub fn min(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    pub fn reset(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.count = 0;
        self.min = u64::MAX;
        self.max = 0;
        self.sum = 0;
    }

    /// Adds `other`'s samples to this histogram.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    /// The value at quantile `q` (0..=1): the sample of rank ⌈q·n⌉ within
    /// the bucket error. 0 for an empty histogram.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        let rank = libm::ceil(q * self.count as f64) as u64;
        let rank = rank.clamp(1, self.count);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = bounds(i);
                let mid = lo + (hi - lo) / 2;
                return mid.clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::bench::WyRand;

    #[test]
    fn index_bounds_roundtrip() {
        for v in (0..5000u64).chain([u64::MAX, u64::MAX / 3, 1 << 40, (1 << 40) - 1]) {
            let i = index(v);
            assert!(i < BUCKETS);
            let (lo, hi) = bounds(i);
            assert!(lo <= v && v <= hi, "{v} {lo} {hi}");
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    fn exact(sorted: &[u64], q: f64) -> u64 {
        let n = sorted.len() as u64;
        let rank = (libm::ceil(q * n as f64) as u64).clamp(1, n);
        sorted[(rank - 1) as usize]
    }

    #[test]
    fn quantiles_within_one_percent() {
        let mut rng = WyRand::new(42);
        for dist in 0..3 {
            let mut h = Histogram::new();
            let mut v = Vec::new();
            for _ in 0..100_000 {
                let x = match dist {
                    0 => rng.next_u64() % 1_000_000,
                    // Heavy tail: exponentials of a uniform.
                    1 => libm::exp(rng.next_f64() * 25.0) as u64,
                    _ => 1000 + rng.next_u64() % 50,
                };
                h.record(x);
                v.push(x);
            }
            v.sort_unstable();
            for q in [0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0] {
                let want = exact(&v, q) as f64;
                let got = h.quantile(q) as f64;
                let err = if want == 0.0 {
                    got
                } else {
                    (got - want).abs() / want
                };
                assert!(err <= 0.01, "dist {dist} q {q}: {got} vs {want}");
            }
            assert_eq!(h.max(), *v.last().unwrap());
            assert_eq!(h.min(), v[0]);
        }
    }

    #[test]
    fn merge_equals_combined() {
        let (mut a, mut b, mut all) = (Histogram::new(), Histogram::new(), Histogram::new());
        for i in 0..10_000u64 {
            let x = i * i % 77_777;
            if i % 3 == 0 {
                a.record(x)
            } else {
                b.record(x)
            }
            all.record(x);
        }
        a.merge(&b);
        assert_eq!(a.count(), all.count());
        for q in [0.5, 0.99, 0.999] {
            assert_eq!(a.quantile(q), all.quantile(q));
        }
        a.reset();
        assert_eq!((a.count(), a.quantile(0.5), a.max(), a.min()), (0, 0, 0, 0));
    }
}
