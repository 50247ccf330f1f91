//! Command line and the validated plan it turns into.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

use crate::error::{BenchError, Result};
use crate::guest_bench::GuestBenchConfig;
use crate::kv_run::Common;

const MODES: [&str; 4] = ["async-fork", "fork", "stop-the-world", "sync-wp"];

#[derive(Debug, Parser)]
#[command(
    name = "snapvm-bench",
    version,
    about = "Snapshot latency under load: snapvm's snapshot modes vs QEMU and native Redis"
)]
pub struct Args {
    /// The snapvm binary (default: `snapvm` next to this binary).
    #[arg(long)]
    pub snapvm: Option<PathBuf>,
    /// Guest sizes: 256M, 1G, ... (comma-separated).
    #[arg(long, default_value = "1G,2G,4G")]
    pub sizes: String,
    /// Page backings to measure: on (THP), off (4 KiB), or both.
    #[arg(long, default_value = "on,off")]
    pub hugepages: String,
    /// Snapshot modes; async-fork:N sets its workers.
    #[arg(
        long,
        default_value = "async-fork:1,async-fork:2,async-fork:4,fork,stop-the-world,sync-wp"
    )]
    pub modes: String,
    /// Requests per second (open loop, all connections together).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Client connections.
    #[arg(long, default_value_t = 4)]
    pub conns: usize,
    /// Fraction of SETs in the load (the rest are GETs).
    #[arg(long, default_value_t = 0.5)]
    pub write_ratio: f64,
    /// Value size in bytes (DEBUG POPULATE and SETs). 512 B fills a guest
    /// with 5x fewer keys than 100 B, so populating 4 GiB takes seconds.
    #[arg(long, default_value_t = 512)]
    pub value_size: usize,
    /// Fraction of guest RAM the dataset fills.
    #[arg(long, default_value_t = 0.6)]
    pub fill: f64,
    /// Seconds of load before the no-snapshot window.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_s: f64,
    /// Seconds of the no-snapshot window.
    #[arg(long, default_value_t = 3.0)]
    pub baseline_s: f64,
    /// Seconds of load after the snapshot completed.
    #[arg(long, default_value_t = 1.0)]
    pub tail_s: f64,
    /// Give up on a snapshot after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub snapshot_timeout_s: u64,
    /// Bucket width of the latency-over-time plots.
    #[arg(long, default_value_t = 50)]
    pub bucket_ms: u64,
    /// Guest size for the mode=bench comparison with QEMU ("none" to skip).
    #[arg(long, default_value = "1G")]
    pub guest_bench_size: String,
    /// Snapshot modes for the mode=bench comparison (default: --modes).
    #[arg(long)]
    pub guest_bench_modes: Option<String>,
    /// Window of the guest's mode=bench JSON lines, ms.
    #[arg(long, default_value_t = 100)]
    pub guest_window_ms: u64,
    /// QEMU binary ("none" to skip QEMU).
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// redis-server binary ("none" to skip native Redis).
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
    /// Where snapshots and temporary files go (a fresh directory inside,
    /// removed at the end; snapshots are deleted after each run).
    #[arg(long, default_value = "/var/tmp")]
    pub work_dir: PathBuf,
    /// Where the JSON and the PNGs go.
    #[arg(long, default_value = "docs/bench")]
    pub out_dir: PathBuf,
    /// Name of the JSON file in --out-dir.
    #[arg(long, default_value = "snapshot-latency.json")]
    pub json_name: String,
    /// Write the table into this Markdown file between marker comments.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Skip the PNG plots.
    #[arg(long)]
    pub no_plots: bool,
    /// snapvm's --snapshot-memory-budget (staging memory for write faults
    /// during a snapshot), e.g. 256M or 8M; fork runs are unaffected.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    pub memory_budget: String,
    /// Draw the latency-over-time grids for every size (default: the
    /// largest size only).
    #[arg(long)]
    pub all_plots: bool,
    /// Measure nothing: re-render the plots, the JSON (into --out-dir) and
    /// the Markdown from a JSON file an earlier run wrote.
    #[arg(long, value_name = "JSON")]
    pub from_json: Option<PathBuf>,
    /// TTF font for plot text.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    pub font: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub common: Common,
    pub sizes_mib: Vec<u64>,
    pub backings: Vec<bool>,
    pub modes: Vec<(String, usize)>,
    pub guest_bench: Option<GuestBenchConfig>,
    pub guest_bench_modes: Vec<(String, usize)>,
    pub qemu: bool,
    pub redis_server: Option<String>,
    pub work_root: PathBuf,
    pub out_dir: PathBuf,
    pub command: String,
    pub raw: serde_json::Value,
}

/// `256M`, `1G`, `2048` (MiB) → MiB.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mul) = match t.chars().last() {
        Some('G' | 'g') => (&t[..t.len() - 1], 1024),
        Some('M' | 'm') => (&t[..t.len() - 1], 1),
        _ => (t, 1),
    };
    match num.parse::<u64>() {
        Ok(n) if n > 0 && n * mul >= 64 => Ok(n * mul),
        _ => Err(BenchError::Invalid(format!(
            "invalid size '{s}': expected e.g. 256M or 4G (at least 64M)"
        ))),
    }
}

/// `async-fork:2,fork` → [(async-fork, 2), (fork, 1)].
pub fn parse_modes(s: &str) -> Result<Vec<(String, usize)>> {
    let mut out = Vec::new();
    for m in s.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let (name, workers) = match m.split_once(':') {
            Some((n, w)) => match w.parse::<usize>() {
                Ok(w) if (1..=64).contains(&w) => (n, w),
                _ => {
                    return Err(BenchError::Invalid(format!(
                        "invalid workers in '{m}': expected 1..=64"
                    )))
                }
            },
            None => (m, if m == "stop-the-world" { 2 } else { 1 }),
        };
        if !MODES.contains(&name) {
            return Err(BenchError::Invalid(format!(
                "unknown snapshot mode '{name}': expected {}",
                MODES.join(", ")
            )));
        }
        out.push((name.to_string(), workers));
    }
    if out.is_empty() {
        return Err(BenchError::Invalid(
            "--modes: expected at least one mode".into(),
        ));
    }
    Ok(out)
}

fn secs(name: &str, v: f64) -> Result<Duration> {
    if v.is_finite() && (0.0..=3600.0).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(BenchError::Invalid(format!(
            "--{name} {v}: expected 0..=3600 seconds"
        )))
    }
}

fn optional(s: &str) -> Option<String> {
    (s != "none" && !s.is_empty()).then(|| s.to_string())
}

impl Args {
    pub fn plan(&self) -> Result<Plan> {
        let snapvm = match &self.snapvm {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("snapvm")))
                .filter(|p| p.exists())
                .ok_or_else(|| {
                    BenchError::Invalid(
                        "no snapvm next to snapvm-bench: build it (`cargo build --release -p snapvm-vmm`) or pass --snapvm".into(),
                    )
                })?,
        };
        if !snapvm.exists() {
            return Err(BenchError::Invalid(format!(
                "--snapvm {}: no such file",
                snapvm.display()
            )));
        }
        let sizes_mib = self
            .sizes
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(parse_size)
            .collect::<Result<Vec<_>>>()?;
        let mut backings = Vec::new();
        for b in self.hugepages.split(',').map(str::trim) {
            backings.push(match b {
                "on" => true,
                "off" => false,
                _ => {
                    return Err(BenchError::Invalid(format!(
                        "invalid --hugepages value '{b}': expected on, off or on,off"
                    )))
                }
            });
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 1e6) {
            return Err(BenchError::Invalid(format!(
                "--rate {}: expected 0 < rate <= 1000000",
                self.rate
            )));
        }
        if self.conns == 0 || self.conns > 256 {
            return Err(BenchError::Invalid(format!(
                "--conns {}: expected 1..=256",
                self.conns
            )));
        }
        if !(0.0..=1.0).contains(&self.write_ratio) {
            return Err(BenchError::Invalid(format!(
                "--write-ratio {}: expected 0..=1",
                self.write_ratio
            )));
        }
        if !(self.fill > 0.0 && self.fill <= 0.85) {
            return Err(BenchError::Invalid(format!(
                "--fill {}: expected 0 < fill <= 0.85",
                self.fill
            )));
        }
        if self.value_size == 0 || self.value_size > 1 << 20 {
            return Err(BenchError::Invalid(format!(
                "--value-size {}: expected 1..=1048576",
                self.value_size
            )));
        }
        let modes = parse_modes(&self.modes)?;
        let common = Common {
            snapvm,
            work_dir: self.work_dir.clone(),
            rate: self.rate,
            conns: self.conns,
            write_ratio: self.write_ratio,
            value_size: self.value_size,
            fill: self.fill,
            warmup: secs("warmup-s", self.warmup_s)?,
            baseline: secs("baseline-s", self.baseline_s)?,
            tail: secs("tail-s", self.tail_s)?,
            bucket_ms: self.bucket_ms.max(1),
            snapshot_timeout: Duration::from_secs(self.snapshot_timeout_s.max(1)),
            memory_budget: self.memory_budget.clone(),
        };
        let guest_bench_modes = match &self.guest_bench_modes {
            Some(m) => parse_modes(m)?,
            None => modes.clone(),
        };
        let guest_bench = match optional(&self.guest_bench_size) {
            None => None,
            Some(s) => {
                let mib = parse_size(&s)?;
                Some(GuestBenchConfig {
                    snapvm: common.snapvm.clone(),
                    qemu: self.qemu.clone(),
                    guest_elf: PathBuf::new(),
                    work_dir: PathBuf::new(),
                    memory_mib: mib,
                    keys: common.keys_for(mib << 20),
                    value_size: self.value_size,
                    write_ratio: self.write_ratio,
                    window_ms: self.guest_window_ms.max(1),
                    warmup: common.warmup,
                    baseline: common.baseline,
                    tail: common.tail,
                    snapshot_timeout: common.snapshot_timeout,
                })
            }
        };
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let raw = json!({
            "sizes_mib": sizes_mib,
            "hugepages": backings,
            "modes": modes,
            "rate": self.rate,
            "conns": self.conns,
            "write_ratio": self.write_ratio,
            "value_size": self.value_size,
            "fill": self.fill,
            "warmup_s": self.warmup_s,
            "baseline_s": self.baseline_s,
            "tail_s": self.tail_s,
            "bucket_ms": self.bucket_ms,
            "guest_bench_size": self.guest_bench_size,
            "guest_bench_modes": guest_bench_modes,
            "guest_window_ms": self.guest_window_ms,
            "qemu": self.qemu,
            "redis_server": self.redis_server,
            "snapvm": common.snapvm,
            "memory_budget": self.memory_budget,
        });
        Ok(Plan {
            common,
            sizes_mib,
            backings,
            modes,
            guest_bench,
            guest_bench_modes,
            qemu: optional(&self.qemu).is_some(),
            redis_server: optional(&self.redis_server),
            work_root: self.work_dir.clone(),
            out_dir: self.out_dir.clone(),
            command,
            raw,
        })
    }
}

impl Plan {
    /// (MiB, hugepages, mode, workers) in the order they run.
    pub fn kv_runs(&self) -> Vec<(u64, bool, String, usize)> {
        let mut v = Vec::new();
        for &mib in &self.sizes_mib {
            for &huge in &self.backings {
                for (m, w) in &self.modes {
                    v.push((mib, huge, m.clone(), *w));
                }
            }
        }
        v
    }

    pub fn config_json(&self) -> serde_json::Value {
        self.raw.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_modes() {
        assert_eq!(parse_size("256M").unwrap(), 256);
        assert_eq!(parse_size("4G").unwrap(), 4096);
        assert!(parse_size("0G").is_err());
        assert!(parse_size("abc").is_err());
        assert_eq!(
            parse_modes("async-fork:4,fork").unwrap(),
            vec![("async-fork".to_string(), 4), ("fork".to_string(), 1)]
        );
        assert!(parse_modes("async-fork:0").is_err());
        assert!(parse_modes("nope").is_err());
        assert!(parse_modes("").is_err());
    }
}
