//! Latency summaries: HdrHistograms over the samples whose *scheduled* send
//! time falls in a window, and per-bucket series for the plots.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::load::Sample;

/// Percentiles of one window, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Nanoseconds since the run's epoch.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Window {
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Window {
    pub fn contains(&self, t: u64) -> bool {
        t >= self.start_ns && t <= self.end_ns
    }

    pub fn secs(&self) -> f64 {
        self.end_ns.saturating_sub(self.start_ns) as f64 / 1e9
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant digits; values are clamped into range.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|e| unreachable!("constant histogram bounds are valid: {e}"))
}

/// Summary of the samples sent (as scheduled) inside `w`.
pub fn summarize(samples: &[Sample], w: Window) -> Summary {
    let mut h = new_hist();
    for s in samples.iter().filter(|s| w.contains(s.sched_ns)) {
        h.saturating_record((s.latency_ns / 1000).max(1));
    }
    from_hist(&h)
}

/// The worst latency of each consecutive window of `len` within `w`
/// (whole windows only), sent at times in that window.
pub fn window_maxima(samples: &[Sample], w: Window, len: Window) -> Vec<f64> {
    let step = len.end_ns.saturating_sub(len.start_ns);
    if step == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut start = w.start_ns;
    while start + step <= w.end_ns {
        let end = start + step;
        let max = samples
            .iter()
            .filter(|s| s.sched_ns >= start && s.sched_ns < end)
            .map(|s| (s.latency_ns / 1000).max(1) as f64)
            .fold(0.0, f64::max);
        out.push(max);
        start = end;
    }
    out
}

fn from_hist(h: &Histogram<u64>) -> Summary {
    if h.is_empty() {
        return Summary::default();
    }
    Summary {
        count: h.len(),
        p50_us: h.value_at_quantile(0.5) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
        p999_us: h.value_at_quantile(0.999) as f64,
        max_us: h.max() as f64,
    }
}

/// One point of the latency-over-time plot.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Bucket {
    /// Start of the bucket, seconds since the run's epoch.
    pub t_s: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// p99 and max per `bucket_ms` of scheduled send time.
pub fn series(samples: &[Sample], bucket_ms: u64) -> Vec<Bucket> {
    let width = bucket_ms.max(1) * 1_000_000;
    let mut out = Vec::new();
    let mut i = 0;
    while i < samples.len() {
        let b = samples[i].sched_ns / width;
        let mut h = new_hist();
        while i < samples.len() && samples[i].sched_ns / width == b {
            h.saturating_record((samples[i].latency_ns / 1000).max(1));
            i += 1;
        }
        let s = from_hist(&h);
        out.push(Bucket {
            t_s: (b * width) as f64 / 1e9,
            p99_us: s.p99_us,
            max_us: s.max_us,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(sched_ms: u64, lat_us: u64) -> Sample {
        Sample {
            sched_ns: sched_ms * 1_000_000,
            latency_ns: lat_us * 1000,
        }
    }

    #[test]
    fn window_selects_by_scheduled_time() {
        let v = [s(1, 10), s(5, 1000), s(9, 20)];
        let w = Window {
            start_ns: 4_000_000,
            end_ns: 6_000_000,
        };
        let sum = summarize(&v, w);
        assert_eq!(sum.count, 1);
        assert!((sum.max_us - 1000.0).abs() < 2.0);
        assert_eq!(summarize(&[], w), Summary::default());
    }

    #[test]
    fn equal_windows_cut_whole_windows_and_take_each_worst() {
        let ms = |a: u64, b: u64| Window {
            start_ns: a * 1_000_000,
            end_ns: b * 1_000_000,
        };
        let v = [s(0, 5), s(3, 40), s(4, 7), s(9, 90), s(10, 1), s(12, 500)];
        // 0-4, 4-8, 8-12 (12 itself is past the last whole window).
        assert_eq!(
            window_maxima(&v, ms(0, 13), ms(20, 24)),
            vec![40.0, 7.0, 90.0]
        );
        assert!(
            window_maxima(&v, ms(0, 3), ms(20, 24)).is_empty(),
            "no whole window"
        );
        assert!(
            window_maxima(&v, ms(0, 13), ms(5, 5)).is_empty(),
            "zero length"
        );
    }

    #[test]
    fn series_buckets() {
        let v = [s(1, 10), s(2, 30), s(120, 5)];
        let b = series(&v, 100);
        assert_eq!(b.len(), 2);
        assert!((b[0].max_us - 30.0).abs() < 1.0);
        assert!((b[1].t_s - 0.1).abs() < 1e-9);
    }
}
