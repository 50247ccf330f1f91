//! Helpers for the in-guest load generator (`mode=bench`).
//!
//! The kernel runs the workload against the store directly (no network), and
//! prints one JSON line per time window, so a snapshot's effect on the
//! guest's throughput and tail latency can be read off a timeline.

use alloc::string::String;
use core::fmt::{self, Write};

pub use super::hist::Histogram;
use super::probe::ticks_to_us;

/// Key distribution of the workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dist {
    Uniform,
    /// YCSB zipfian with this theta.
    Zipfian(f64),
}

/// Workload options, parsed from `key=value` pairs on the kernel command line.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    pub keys: u64,
    pub value_size: usize,
    /// Fraction of operations that are SETs, 0..=1.
    pub write_ratio: f64,
    pub dist: Dist,
    pub duration_s: u64,
    pub window_ms: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            keys: 100_000,
            value_size: 64,
            write_ratio: 0.5,
            dist: Dist::Uniform,
            duration_s: 10,
            window_ms: 1000,
        }
    }
}

/// Why an option string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptError {
    UnknownKey(String),
    BadValue(String),
}

impl fmt::Display for OptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptError::UnknownKey(k) => write!(f, "unknown bench option '{k}'"),
            OptError::BadValue(k) => write!(f, "bad value for bench option '{k}'"),
        }
    }
}

pub const DEFAULT_THETA: f64 = 0.99;

impl BenchOptions {
    /// Parses whitespace-separated `key=value` pairs over the defaults.
    /// Pairs this module does not know but the kernel does (e.g. `mode=`) are
    /// skipped by listing them in `ignore`.
    pub fn parse(s: &str, ignore: &[&str]) -> Result<BenchOptions, OptError> {
        let mut o = BenchOptions::default();
        let mut theta = None;
        let mut zipf = matches!(o.dist, Dist::Zipfian(_));
        for pair in s.split_ascii_whitespace() {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let bad = || OptError::BadValue(String::from(k));
            match k {
                "keys" => o.keys = v.parse().ok().filter(|&n| n > 0).ok_or_else(bad)?,
                "value_size" => o.value_size = v.parse().map_err(|_| bad())?,
                "write_ratio" => {
                    o.write_ratio = v
                        .parse()
                        .ok()
                        .filter(|r| (0.0..=1.0).contains(r))
                        .ok_or_else(bad)?
                }
                "dist" => {
                    zipf = match v {
                        "uniform" => false,
                        "zipfian" | "zipf" => true,
                        _ => return Err(bad()),
                    }
                }
                "theta" => {
                    theta = Some(
                        v.parse::<f64>()
                            .ok()
                            .filter(|t| *t > 0.0 && *t < 1.0)
                            .ok_or_else(bad)?,
                    )
                }
                "duration_s" => o.duration_s = v.parse().map_err(|_| bad())?,
                "window_ms" => o.window_ms = v.parse().ok().filter(|&n| n > 0).ok_or_else(bad)?,
                _ if ignore.contains(&k) => {}
                _ => return Err(OptError::UnknownKey(String::from(k))),
            }
        }
        o.dist = if zipf {
            Dist::Zipfian(theta.unwrap_or(DEFAULT_THETA))
        } else {
            Dist::Uniform
        };
        Ok(o)
    }
}

/// wyrand: a tiny, fast PRNG with good statistical quality (not crypto).
#[derive(Debug, Clone)]
pub struct WyRand(u64);

impl WyRand {
    pub fn new(seed: u64) -> WyRand {
        WyRand(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        (t as u64) ^ ((t >> 64) as u64)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n) (n > 0), by multiply-shift (negligible bias).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// ζ(n, θ) = Σ_{i=1..n} i^-θ. Summed exactly up to 10^5 terms; the rest by
/// Euler–Maclaurin, so a 100M-key setup does not take seconds.
pub fn zeta(n: u64, theta: f64) -> f64 {
    const EXACT: u64 = 100_000;
    let m = n.min(EXACT);
    let mut s = 0.0;
    for i in 1..=m {
        s += libm::pow(i as f64, -theta);
    }
    if n > m {
        // Σ_{i=m+1..n} f(i) ≈ ∫_m^n f + (f(n) - f(m))/2 - (f'(n) - f'(m))/12
        // with f(x) = x^-θ; the error is far below f64 noise for m = 10^5.
        let (mf, nf) = (m as f64, n as f64);
        let f = |x: f64| libm::pow(x, -theta);
        let df = |x: f64| -theta * libm::pow(x, -theta - 1.0);
        let integral = (libm::pow(nf, 1.0 - theta) - libm::pow(mf, 1.0 - theta)) / (1.0 - theta);
        s += integral + (f(nf) - f(mf)) / 2.0 + (df(nf) - df(mf)) / 12.0;
    }
    s
}

/// YCSB's zipfian generator (Gray et al.): item 0 is the most popular.
#[derive(Debug, Clone)]
pub struct Zipfian {
    items: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
    half_pow_theta: f64,
}

impl Zipfian {
    /// `items` ≥ 1, 0 < `theta` < 1.
    pub fn new(items: u64, theta: f64) -> Zipfian {
        let items = items.max(1);
        let zetan = zeta(items, theta);
        let zeta2 = zeta(2, theta);
        let eta = if items > 1 {
            (1.0 - libm::pow(2.0 / items as f64, 1.0 - theta)) / (1.0 - zeta2 / zetan)
        } else {
            0.0
        };
        Zipfian {
            items,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta,
            half_pow_theta: 1.0 + libm::pow(0.5, theta),
        }
    }

    pub fn theta(&self) -> f64 {
        self.theta
    }

    /// A rank in [0, items).
    pub fn next(&mut self, rng: &mut WyRand) -> u64 {
        let u = rng.next_f64();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < self.half_pow_theta {
            return 1.min(self.items - 1);
        }
        let r = self.items as f64 * libm::pow(self.eta * u - self.eta + 1.0, self.alpha);
        (r as u64).min(self.items - 1)
    }
}

/// Spreads zipfian ranks over the key space so the hot keys are not
/// neighbours (YCSB's "scrambled zipfian"), via an FNV-style hash.
pub fn scramble(rank: u64, items: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in rank.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % items.max(1)
}

/// One window of the timeline.
pub struct Window<'a> {
    /// End of the window, ms since the run started.
    pub t_ms: u64,
    pub ops: u64,
    /// Per-operation latencies recorded in this window, in ticks.
    pub latencies: &'a Histogram,
    /// Longest gap between two operations in this window, in ticks.
    pub max_stall_ticks: u64,
}

/// Writes one JSON line (with trailing `\n`) for `w`.
pub fn write_window_json(out: &mut impl Write, w: &Window<'_>, ticks_per_us: u64) -> fmt::Result {
    let us = |t: u64| ticks_to_us(t, ticks_per_us);
    writeln!(
        out,
        "{{\"t_ms\":{},\"ops\":{},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1},\"max_stall_us\":{:.1}}}",
        w.t_ms,
        w.ops,
        us(w.latencies.quantile(0.5)),
        us(w.latencies.quantile(0.99)),
        us(w.latencies.quantile(0.999)),
        us(w.latencies.max()),
        us(w.max_stall_ticks)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn parse_options() {
        let o = BenchOptions::parse(
            "mode=bench keys=500 value_size=32 write_ratio=0.25 dist=zipfian duration_s=3 window_ms=50",
            &["mode"],
        )
        .unwrap();
        assert_eq!(
            o,
            BenchOptions {
                keys: 500,
                value_size: 32,
                write_ratio: 0.25,
                dist: Dist::Zipfian(0.99),
                duration_s: 3,
                window_ms: 50
            }
        );
        let o = BenchOptions::parse("dist=zipfian theta=0.5", &[]).unwrap();
        assert_eq!(o.dist, Dist::Zipfian(0.5));
        assert_eq!(
            BenchOptions::parse("", &[]).unwrap(),
            BenchOptions::default()
        );
        assert_eq!(
            BenchOptions::parse("write_ratio=1.5", &[]),
            Err(OptError::BadValue("write_ratio".into()))
        );
        assert_eq!(
            BenchOptions::parse("keys=0", &[]),
            Err(OptError::BadValue("keys".into()))
        );
        assert_eq!(
            BenchOptions::parse("dist=normal", &[]),
            Err(OptError::BadValue("dist".into()))
        );
        assert_eq!(
            BenchOptions::parse("mode=x", &[]),
            Err(OptError::UnknownKey("mode".into()))
        );
    }

    #[test]
    fn rng_uniformity() {
        let mut r = WyRand::new(1);
        let mut buckets = [0u32; 10];
        for _ in 0..100_000 {
            buckets[r.below(10) as usize] += 1;
            let f = r.next_f64();
            assert!((0.0..1.0).contains(&f));
        }
        for b in buckets {
            assert!((9_500..10_500).contains(&b), "{b}");
        }
    }

    #[test]
    fn zeta_approximation() {
        let n = 1_000_000u64;
        let mut exact = 0.0;
        for i in 1..=n {
            exact += libm::pow(i as f64, -0.99);
        }
        let approx = zeta(n, 0.99);
        assert!((approx - exact).abs() / exact < 1e-9, "{approx} {exact}");
    }

    #[test]
    fn zipf_skew_matches_theory() {
        let items = 1000u64;
        let theta = 0.99;
        let mut z = Zipfian::new(items, theta);
        let mut rng = WyRand::new(7);
        let n = 1_000_000;
        let mut counts = vec![0u32; items as usize];
        for _ in 0..n {
            counts[z.next(&mut rng) as usize] += 1;
        }
        let zn = zeta(items, theta);
        // The first two ranks are exact in YCSB's generator; the tail is an
        // approximation, so compare it more loosely.
        for (rank, tol) in [(0usize, 0.02), (1, 0.03), (9, 0.25), (99, 0.35)] {
            let p = libm::pow((rank + 1) as f64, -theta) / zn;
            let got = f64::from(counts[rank]) / n as f64;
            assert!((got - p).abs() / p < tol, "rank {rank}: {got} vs {p}");
        }
        // Skew: the top 1% of items get far more than 1% of accesses.
        let top: u32 = counts[..10].iter().sum();
        assert!(f64::from(top) / n as f64 > 0.35);
        // Monotone-ish: head beats tail.
        assert!(counts[0] > counts[10] * 5);
        assert!(counts.iter().all(|&c| c < n as u32));
    }

    #[test]
    fn scramble_in_range() {
        for r in 0..1000 {
            assert!(scramble(r, 17) < 17);
        }
        assert_ne!(scramble(0, 1 << 40), scramble(1, 1 << 40));
    }

    #[test]
    fn window_json() {
        let mut h = Histogram::new();
        for t in [10u64, 20, 30, 40] {
            h.record(t);
        }
        let mut s = String::new();
        let w = Window {
            t_ms: 100,
            ops: 4,
            latencies: &h,
            max_stall_ticks: 90,
        };
        write_window_json(&mut s, &w, 10).unwrap();
        assert_eq!(
            s,
            "{\"t_ms\":100,\"ops\":4,\"p50_us\":2.0,\"p99_us\":4.0,\"p999_us\":4.0,\"max_us\":4.0,\"max_stall_us\":9.0}\n"
        );
    }
}
