//! Command line and the validated plan it turns into.
//!
//! `snapvm-bench` alone (or with the comparative benchmark's flags, [`Args`])
//! runs the comparative benchmark; `snapvm-bench pause` and `snapvm-bench
//! snapshot` run the in-process drivers ([`crate::vm_pause`],
//! [`crate::vm_snapshot`]).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;
use snapvm_snapshot::{BackgroundPriority, CpuSet, Strategy};
use snapvm_vmm::cli::{parse_budget, parse_hugepages, parse_strategy};
use snapvm_vmm::PageBacking;

use crate::error::{BenchError, Result};
use crate::guest_bench::GuestBenchConfig;
use crate::kv_run::Common;

const MODES: [&str; 4] = ["async-fork", "fork", "stop-the-world", "sync-wp"];

#[derive(Debug, Parser)]
#[command(
    name = "snapvm-bench",
    version,
    about = "snapvm's benchmarks. Without a command: snapshot latency under load, snapvm's snapshot modes vs QEMU and native Redis",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The comparative benchmark (no command given).
    #[command(flatten)]
    pub compare: Args,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pause/resume round trips of a running guest (in this process);
    /// prints one JSON object.
    Pause(PauseArgs),
    /// Snapshot pause and copy by mode (in this process): one JSON object
    /// per snapshot on stdout, then a Markdown table.
    Snapshot(SnapshotArgs),
}

/// The comparative benchmark's flags (`snapvm-bench` without a command).
#[derive(Debug, clap::Args)]
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
                    memory_budget: common.memory_budget.clone(),
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

#[derive(Debug, clap::Args)]
pub struct PauseArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Number of pause/resume cycles.
    #[arg(long, default_value_t = 1000)]
    pub cycles: u32,
    /// Guest RAM size.
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// error, warn, info, debug or trace.
    #[arg(long, default_value = "warn")]
    pub log_level: String,
}

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// Guest RAM size.
    #[arg(long, default_value = "1G")]
    pub memory: String,
    /// Number of vCPUs (each scribbles over its share of the buffer).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Host CPUs for the guest, as for `snapvm run --cpus` (the copiers get
    /// the others). Default: no pinning.
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<CpuSet>,
    /// Comma-separated snapshot modes, in order.
    #[arg(long, default_value = "async-fork,fork,stop-the-world,sync-wp", value_parser = parse_strategies)]
    pub modes: ::std::vec::Vec<Strategy>,
    /// Comma-separated worker counts for async-fork (and stop-the-world).
    #[arg(long, default_value = "2", value_parser = parse_worker_list)]
    pub workers: ::std::vec::Vec<usize>,
    /// Guest RAM page backing: on (THP) or off (4 KiB).
    #[arg(long, value_name = "on|off|hugetlbfs", default_value = "on", value_parser = parse_hugepages)]
    pub hugepages: PageBacking,
    /// Comma-separated scheduling of the persist thread to compare (idle,
    /// normal); fork runs once.
    #[arg(long, default_value = "normal", value_parser = parse_priorities)]
    pub priorities: ::std::vec::Vec<BackgroundPriority>,
    /// Where snapshot directories are written (each is deleted after use).
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    /// Fraction of the guest heap the guest populates and keeps writing.
    #[arg(long, default_value = "0.75", value_parser = parse_fraction)]
    pub populate_fraction: f64,
    /// Also take a second snapshot per mode (the staging pool then exists
    /// already: the steady state of a VM that snapshots regularly).
    #[arg(long)]
    pub warm: bool,
    /// Staging memory for write faults, as `snapvm run
    /// --snapshot-memory-budget`.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_budget)]
    pub memory_budget: u64,
    /// Length of the no-snapshot window that measures the probe's noise
    /// floor before each snapshot, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub baseline_ms: u64,
    /// error, warn, info, debug or trace.
    #[arg(long, default_value = "warn")]
    pub log_level: String,
}

/// Parses a comma-separated `--priorities` list.
pub fn parse_priorities(s: &str) -> std::result::Result<Vec<BackgroundPriority>, String> {
    s.split(',').map(str::parse).collect()
}

/// Parses a comma-separated list of snapshot modes.
pub fn parse_strategies(s: &str) -> std::result::Result<Vec<Strategy>, String> {
    let v = s
        .split(',')
        .map(|m| parse_strategy(m.trim()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if v.is_empty() {
        return Err("expected at least one mode".into());
    }
    Ok(v)
}

/// Parses a comma-separated list of worker counts (each 1..=64).
pub fn parse_worker_list(s: &str) -> std::result::Result<Vec<usize>, String> {
    s.split(',')
        .map(|w| match w.trim().parse::<usize>() {
            Ok(n) if (1..=64).contains(&n) => Ok(n),
            _ => Err(format!("invalid worker count '{w}': expected 1..=64")),
        })
        .collect()
}

/// Parses a fraction in (0, 0.95].
pub fn parse_fraction(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 0.95 => Ok(f),
        _ => Err(format!(
            "invalid fraction '{s}': expected a number in (0, 0.95]"
        )),
    }
}

/// Logging of the in-process drivers, as `snapvm --log-level` sets it up:
/// `level` on stderr.
pub fn init_vmm_logging(level: &str) -> Result<()> {
    Ok(snapvm_vmm::cli::init_logging(level)?)
}

/// Guest RAM in bytes (validated against host RAM, rounded up to 2 MiB)
/// and the vCPU count, as `snapvm run` takes them.
pub fn machine_size(memory: &str, vcpus: u32) -> Result<(u64, usize)> {
    let memory_size =
        snapvm_vmm::cli::guest_memory_size(memory, snapvm_vmm::cli::host_ram_bytes())?;
    let vcpus = snapvm_vmm::cli::validate_vcpus(vcpus)? as usize;
    Ok((memory_size, vcpus))
}

#[cfg(test)]
mod tests;
