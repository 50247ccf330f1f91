//! One snapvm KV run: boot the bundled guest with a given size, backing and
//! snapshot mode, populate it, drive the open-loop load, record a window
//! without snapshot, then take one snapshot with SIGUSR1 and record the
//! window from the request until the snapshot directory is complete
//! (`metrics.json` written inside it, which snapvm does last).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{BenchError, Result};
use crate::load::{Load, LoadConfig};
use crate::proc::{self, Proc};
use crate::resp::{self, Client};
use crate::stats::{self, Bucket, Summary, Window};

/// What every load-driven run shares.
#[derive(Debug, Clone)]
pub struct Common {
    pub snapvm: PathBuf,
    pub work_dir: PathBuf,
    pub rate: f64,
    pub conns: usize,
    pub write_ratio: f64,
    pub value_size: usize,
    /// Fraction of guest RAM the dataset fills (by the store's ~216 B/key at
    /// 100-byte values, scaled with the value size).
    pub fill: f64,
    pub warmup: Duration,
    pub baseline: Duration,
    pub tail: Duration,
    pub bucket_ms: u64,
    pub snapshot_timeout: Duration,
    /// snapvm's --snapshot-memory-budget.
    pub memory_budget: String,
}

impl Common {
    /// The configured open-loop load against `addr` over `keys` keys.
    pub fn load_config(&self, addr: SocketAddr, keys: u64) -> LoadConfig {
        LoadConfig {
            addr,
            rate: self.rate,
            conns: self.conns,
            write_ratio: self.write_ratio,
            keys,
            value_size: self.value_size,
        }
    }

    /// Keys that fill `fill` of `memory` bytes.
    pub fn keys_for(&self, memory: u64) -> u64 {
        let per_key = 116 + self.value_size as u64;
        ((memory as f64 * self.fill) / per_key as f64).max(1000.0) as u64
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeReading {
    pub max_loop_gap_us: f64,
    pub cmd_p99_us: f64,
    pub cmd_max_us: f64,
}

/// The no-snapshot and snapshot windows of one load-driven run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Windows {
    pub baseline: Window,
    pub snapshot: Window,
    pub baseline_latency: Summary,
    pub snapshot_latency: Summary,
    /// The worst latency (µs) of each window as long as the snapshot
    /// window, cut from the no-snapshot window: what "the worst in an
    /// equally long window without a snapshot" is compared with (issue
    /// #17). Empty in runs recorded before it existed.
    #[serde(default)]
    pub baseline_equal_maxima_us: Vec<f64>,
    /// The part of the snapshot window until the memory copy ended (before
    /// the commit), from metrics.json's `total_us - persist.commit_us`.
    pub copy_window: Option<Window>,
    pub copy_latency: Option<Summary>,
    pub sent: u64,
    pub errors: u64,
    pub unanswered: u64,
    pub series: Vec<Bucket>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvRun {
    pub memory_mib: u64,
    pub hugepages: bool,
    pub mode: String,
    pub workers: usize,
    pub keys: u64,
    pub populate_s: f64,
    pub windows: Windows,
    pub probe_baseline: Option<ProbeReading>,
    pub probe_snapshot: Option<ProbeReading>,
    /// The snapshot's metrics.json as snapvm wrote it.
    pub metrics: serde_json::Value,
    pub sync_pause_us: Option<f64>,
    pub snapshot_total_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    pub fault_max_us: Option<f64>,
    /// snapvm's VmHWM over the snapshot window (reset just before).
    pub peak_rss_bytes: Option<u64>,
    /// fork mode: the largest VmHWM seen of snapvm's child.
    pub child_peak_rss_bytes: Option<u64>,
    pub load_avg: Option<f64>,
}

pub fn label(mode: &str, workers: usize) -> String {
    if mode == "async-fork" {
        format!("async-fork x{workers}")
    } else {
        mode.to_string()
    }
}

fn probe(c: &mut Client) -> Option<ProbeReading> {
    let info = c.info("latency").ok()?;
    Some(ProbeReading {
        max_loop_gap_us: resp::info_f64(&info, "probe_max_loop_gap_us")?,
        cmd_p99_us: resp::info_f64(&info, "probe_cmd_p99_us").unwrap_or(0.0),
        cmd_max_us: resp::info_f64(&info, "probe_cmd_max_us").unwrap_or(0.0),
    })
}

/// Path snapvm's N-th SIGUSR1 writes.
pub fn signal_target(base: &Path, n: u32) -> PathBuf {
    let mut s = base.as_os_str().to_os_string();
    s.push(format!("-{n}"));
    PathBuf::from(s)
}

/// Removes a snapshot directory and any temporary directories beside it
/// (left when a snapshot was cut short).
pub fn remove_snapshot(target: &Path) {
    let _ = std::fs::remove_dir_all(target);
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return;
    };
    // The writer's temporary siblings: `<name>.tmp-*`, `<name>.incomplete-*`.
    let prefix = format!("{}.", name.to_string_lossy());
    if let Ok(rd) = std::fs::read_dir(parent) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// What waiting for a snapshot directory produced.
pub struct SnapshotWait {
    pub done: Instant,
    pub metrics: serde_json::Value,
    pub child_peak: Option<u64>,
}

/// Waits until `target/metrics.json` parses (it is written after the
/// directory is renamed into place); samples child RSS meanwhile.
pub fn wait_snapshot(vm: &mut Proc, target: &Path, timeout: Duration) -> Result<SnapshotWait> {
    let file = target.join("metrics.json");
    let start = Instant::now();
    let mut child_peak: Option<u64> = None;
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                return Ok(SnapshotWait {
                    done: Instant::now(),
                    metrics: v,
                    child_peak,
                });
            }
        }
        for c in proc::children(vm.pid()) {
            if let Some(p) = proc::peak_rss(c) {
                child_peak = Some(child_peak.unwrap_or(0).max(p));
            }
        }
        vm.check_alive()?;
        if start.elapsed() > timeout {
            return Err(BenchError::Timeout {
                what: format!("{} (snapvm log:\n{})", file.display(), vm.tail()),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Numbers from metrics.json: sync pause, total, fault p99 and max (µs).
pub fn metric(m: &serde_json::Value, path: &[&str]) -> Option<f64> {
    let mut v = m;
    for p in path {
        v = v.get(p)?;
    }
    v.as_f64()
}

/// From the request until the copy ended: the snapshot window minus the
/// commit time metrics.json reports.
pub fn copy_window(m: &serde_json::Value, snapshot: Window) -> Option<Window> {
    // Fork's child copies and writes in one go: no separate copy phase.
    if m.get("strategy").and_then(serde_json::Value::as_str) == Some("fork") {
        return Some(snapshot);
    }
    let total = metric(m, &["total_us"])?;
    let persist = metric(m, &["persist", "commit_us"]).unwrap_or(0.0);
    let copied_ns = ((total - persist).max(0.0) * 1000.0) as u64;
    Some(Window {
        start_ns: snapshot.start_ns,
        end_ns: (snapshot.start_ns + copied_ns).min(snapshot.end_ns),
    })
}

pub fn ns(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_nanos() as u64
}

/// Fills a store (guest or native Redis) to `c.fill` of `memory_mib` with
/// `DEBUG POPULATE`; returns the key count and the seconds it took.
pub fn populate(ctl: &mut Client, c: &Common, memory_mib: u64) -> Result<(u64, f64)> {
    let keys = c.keys_for(memory_mib << 20);
    let t = Instant::now();
    ctl.ok(
        &[
            "DEBUG",
            "POPULATE",
            &keys.to_string(),
            "key",
            &c.value_size.to_string(),
        ],
        Duration::from_secs(600),
    )?;
    let populate_s = t.elapsed().as_secs_f64();
    tracing::info!("  populated {keys} keys in {populate_s:.1} s");
    Ok((keys, populate_s))
}

pub fn run(
    c: &Common,
    memory_mib: u64,
    hugepages: bool,
    mode: &str,
    workers: usize,
) -> Result<KvRun> {
    let port = proc::free_port()?;
    let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
    let snap_base = c.work_dir.join(format!(
        "snap-{memory_mib}m-{}-{mode}-{workers}",
        if hugepages { "thp" } else { "4k" }
    ));
    let target = signal_target(&snap_base, 1);
    remove_snapshot(&target);
    let mut cmd = Command::new(&c.snapvm);
    cmd.args([
        "run",
        "--memory",
        &format!("{memory_mib}M"),
        "--hugepages",
        if hugepages { "on" } else { "off" },
        "--kv-listen",
        &addr.to_string(),
        "--snapshot-dir",
        &snap_base.to_string_lossy(),
        "--snapshot-mode",
        mode,
        "--snapshot-workers",
        &workers.to_string(),
        "--log-level",
        "info",
    ]);
    if mode != "fork" {
        cmd.args(["--snapshot-memory-budget", &c.memory_budget]);
    }
    let mut vm = Proc::spawn(
        &mut cmd,
        "build it with `cargo build --release -p snapvm-vmm` or pass --snapvm",
    )?;
    let result = drive(
        c, &mut vm, addr, memory_mib, hugepages, mode, workers, &target,
    );
    vm.stop(Duration::from_secs(5));
    remove_snapshot(&target);
    result
}

#[allow(clippy::too_many_arguments)]
fn drive(
    c: &Common,
    vm: &mut Proc,
    addr: SocketAddr,
    memory_mib: u64,
    hugepages: bool,
    mode: &str,
    workers: usize,
    target: &Path,
) -> Result<KvRun> {
    let mut ctl = Client::connect(addr, Duration::from_secs(60))?;
    // The port accepts before the guest serves: PING until it answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ctl.ok(&["PING"], Duration::from_secs(5)).is_err() {
        vm.check_alive()?;
        if Instant::now() > deadline {
            return Err(BenchError::Timeout {
                what: format!("PING on {addr}"),
                secs: 60,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
        ctl = Client::connect(addr, Duration::from_secs(10))?;
    }
    let (keys, populate_s) = populate(&mut ctl, c, memory_mib)?;

    let epoch = Instant::now();
    let load = Load::start(&c.load_config(addr, keys), epoch)?;
    std::thread::sleep(c.warmup);
    let _ = ctl.ok(&["PROBE", "RESET"], Duration::from_secs(10));
    let b0 = Instant::now();
    std::thread::sleep(c.baseline);
    let b1 = Instant::now();
    let probe_baseline = probe(&mut ctl);

    proc::reset_peak_rss(vm.pid());
    let _ = ctl.ok(&["PROBE", "RESET"], Duration::from_secs(10));
    let s0 = Instant::now();
    vm.signal(libc::SIGUSR1)?;
    let waited = wait_snapshot(vm, target, c.snapshot_timeout);
    let waited = match waited {
        Ok(w) => w,
        Err(e) => {
            let _ = load.finish();
            return Err(e);
        }
    };
    let peak_rss_bytes = proc::peak_rss(vm.pid());
    let probe_snapshot = probe(&mut ctl);
    std::thread::sleep(c.tail);
    let r = load.finish()?;

    let baseline = Window {
        start_ns: ns(epoch, b0),
        end_ns: ns(epoch, b1),
    };
    let snapshot = Window {
        start_ns: ns(epoch, s0),
        end_ns: ns(epoch, waited.done),
    };
    let m = waited.metrics;
    let copy_window = copy_window(&m, snapshot);
    Ok(KvRun {
        memory_mib,
        hugepages,
        mode: mode.to_string(),
        workers,
        keys,
        populate_s,
        windows: Windows {
            baseline_latency: stats::summarize(&r.samples, baseline),
            baseline_equal_maxima_us: stats::window_maxima(&r.samples, baseline, snapshot),
            snapshot_latency: stats::summarize(&r.samples, snapshot),
            copy_latency: copy_window.map(|w| stats::summarize(&r.samples, w)),
            copy_window,
            baseline,
            snapshot,
            sent: r.sent,
            errors: r.errors,
            unanswered: r.unanswered,
            series: stats::series(&r.samples, c.bucket_ms),
        },
        probe_baseline,
        probe_snapshot,
        sync_pause_us: metric(&m, &["sync_us", "total"]),
        snapshot_total_us: metric(&m, &["total_us"]),
        fault_p99_us: metric(&m, &["engine", "fault_latency_us", "p99"]),
        fault_max_us: metric(&m, &["engine", "fault_latency_us", "max"]),
        metrics: m,
        peak_rss_bytes,
        child_peak_rss_bytes: waited.child_peak,
        load_avg: proc::loadavg(),
    })
}
