//! The same guest ELF in `mode=bench` (the guest drives its own store and
//! prints one JSON line per window on the serial port) under snapvm, with
//! each snapshot mode, and under QEMU microvm, with background-snapshot and
//! with a stop-and-save migration. The comparison is what the guest itself
//! observed in the windows that overlap the snapshot.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{BenchError, Result};
use crate::kv_run::{self, ns};
use crate::proc::Proc;
use crate::qmp::Qmp;
use crate::stats::Window;

#[derive(Debug, Clone)]
pub struct GuestBenchConfig {
    pub snapvm: PathBuf,
    pub qemu: String,
    pub guest_elf: PathBuf,
    pub work_dir: PathBuf,
    pub memory_mib: u64,
    pub keys: u64,
    pub value_size: usize,
    pub write_ratio: f64,
    pub window_ms: u64,
    pub warmup: Duration,
    pub baseline: Duration,
    pub tail: Duration,
    pub snapshot_timeout: Duration,
    /// snapvm's --snapshot-memory-budget (as for the KV runs).
    pub memory_budget: String,
}

/// One JSON line of the guest's `mode=bench` output.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
pub struct GuestWindow {
    pub t_ms: u64,
    pub ops: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub max_stall_us: f64,
}

/// The guest windows overlapping a host window, folded.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct GuestSummary {
    pub windows: usize,
    pub ops_per_s: f64,
    /// Largest per-window quantile (quantiles cannot be merged exactly).
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub max_stall_us: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestBenchRun {
    pub vmm: String,
    pub mode: String,
    pub memory_mib: u64,
    pub baseline: GuestSummary,
    pub snapshot: GuestSummary,
    pub snapshot_window: Window,
    /// Guest windows with the host time their line arrived (their end), in
    /// seconds since the populate finished.
    pub series: Vec<(f64, GuestWindow)>,
    pub sync_pause_us: Option<f64>,
    pub snapshot_total_us: Option<f64>,
    pub details: serde_json::Value,
}

/// What a VMM-specific trigger reports back.
struct Snapped {
    start: Instant,
    done: Instant,
    sync_pause_us: Option<f64>,
    total_us: Option<f64>,
    details: serde_json::Value,
}

fn cmdline(c: &GuestBenchConfig) -> String {
    format!(
        "mode=bench keys={} value_size={} write_ratio={} dist=uniform duration_s=0 window_ms={}",
        c.keys, c.value_size, c.write_ratio, c.window_ms
    )
}

/// Folds the guest windows that overlap `w`. Windows are placed in host
/// time: each ends when its line arrived (the guest prints it the moment
/// the window closes) and began when the previous one ended (they are back
/// to back in guest time), so a window that held a pause spans the pause
/// in host time too, whatever the guest's TSC-based `t_ms` saw.
///
/// Throughput is the ops done inside `w` over the time of `w` the windows
/// cover. A window's ops are spread over the part of its span the guest
/// ran, that is without its longest stall, and that stall is taken to lie
/// inside `w` as far as it fits (a snapshot's pause does): otherwise a
/// window holding a 450 ms pause would spread the ops it did outside the
/// pause over it, and a stop-the-world snapshot would read as half speed.
/// Edge windows count by the part inside: counting them whole would mix up
/// to two windows of undisturbed speed into a snapshot window a few
/// windows long.
fn fold(windows: &[(u64, GuestWindow)], window_ms: u64, w: Window) -> GuestSummary {
    let mut s = GuestSummary::default();
    let mut ops = 0.0;
    let mut covered_ns = 0u64;
    let len = window_ms * 1_000_000;
    let mut prev_end: Option<u64> = None;
    for (end, g) in windows {
        let start = prev_end
            .filter(|&p| p < *end)
            .unwrap_or_else(|| end.saturating_sub(len));
        prev_end = Some(*end);
        if *end <= w.start_ns || start >= w.end_ns {
            continue;
        }
        let span = end - start;
        let inside = (*end).min(w.end_ns) - start.max(w.start_ns);
        let stall = ((g.max_stall_us * 1000.0) as u64).min(span);
        let ran = span - stall;
        if ran > 0 {
            ops += g.ops as f64 * inside.saturating_sub(stall) as f64 / ran as f64;
        }
        covered_ns += inside;
        s.windows += 1;
        s.p99_us = s.p99_us.max(g.p99_us);
        s.p999_us = s.p999_us.max(g.p999_us);
        s.max_us = s.max_us.max(g.max_us);
        s.max_stall_us = s.max_stall_us.max(g.max_stall_us);
    }
    if covered_ns > 0 {
        s.ops_per_s = ops * 1e9 / covered_ns as f64;
    }
    s
}

/// Boots, waits for the populate, records a baseline, snapshots with
/// `snap`, records the tail and folds the guest's windows.
fn measure(
    c: &GuestBenchConfig,
    vm: &mut Proc,
    vmm: &str,
    mode: &str,
    snap: impl FnOnce(&mut Proc) -> Result<Snapped>,
) -> Result<GuestBenchRun> {
    let populated = vm.wait_line("bench: populated", Duration::from_secs(600))?;
    let epoch = populated.at;
    std::thread::sleep(c.warmup);
    let b0 = Instant::now();
    std::thread::sleep(c.baseline);
    let b1 = Instant::now();
    let s = snap(vm)?;
    std::thread::sleep(c.tail);
    vm.check_alive()?;
    let windows: Vec<(u64, GuestWindow)> = vm
        .stdout_lines()
        .iter()
        .filter(|l| l.text.starts_with('{') && l.at >= epoch)
        .filter_map(|l| Some((ns(epoch, l.at), serde_json::from_str(&l.text).ok()?)))
        .collect();
    if windows.is_empty() {
        return Err(BenchError::Invalid(format!(
            "{vmm} {mode}: the guest printed no bench windows\n{}",
            vm.tail()
        )));
    }
    let baseline = Window {
        start_ns: ns(epoch, b0),
        end_ns: ns(epoch, b1),
    };
    let snapshot = Window {
        start_ns: ns(epoch, s.start),
        end_ns: ns(epoch, s.done),
    };
    Ok(GuestBenchRun {
        vmm: vmm.into(),
        mode: mode.into(),
        memory_mib: c.memory_mib,
        baseline: fold(&windows, c.window_ms, baseline),
        snapshot: fold(&windows, c.window_ms, snapshot),
        snapshot_window: snapshot,
        series: windows
            .iter()
            .map(|(end, w)| (*end as f64 / 1e9, *w))
            .collect(),
        sync_pause_us: s.sync_pause_us,
        snapshot_total_us: s.total_us,
        details: s.details,
    })
}

/// `mode=bench` under snapvm with one snapshot mode.
pub fn snapvm(c: &GuestBenchConfig, mode: &str, workers: usize) -> Result<GuestBenchRun> {
    let base = c.work_dir.join(format!("gsnap-{mode}-{workers}"));
    let target = kv_run::signal_target(&base, 1);
    kv_run::remove_snapshot(&target);
    let mut cmd = Command::new(&c.snapvm);
    cmd.args([
        "run",
        "--memory",
        &format!("{}M", c.memory_mib),
        "--cmdline",
        &cmdline(c),
        "--snapshot-dir",
        &base.to_string_lossy(),
        "--snapshot-mode",
        mode,
        "--snapshot-workers",
        &workers.to_string(),
    ]);
    if mode != "fork" {
        cmd.args(["--snapshot-memory-budget", &c.memory_budget]);
    }
    let mut vm = Proc::spawn(
        &mut cmd,
        "build it with `cargo build --release -p snapvm-vmm` or pass --snapvm",
    )?;
    let timeout = c.snapshot_timeout;
    let r = measure(c, &mut vm, "snapvm", &kv_run::label(mode, workers), |vm| {
        let start = Instant::now();
        vm.signal(libc::SIGUSR1)?;
        let w = kv_run::wait_snapshot(vm, &target, timeout)?;
        Ok(Snapped {
            start,
            done: w.done,
            sync_pause_us: kv_run::metric(&w.metrics, &["sync_us", "total"]),
            total_us: kv_run::metric(&w.metrics, &["total_us"]),
            details: w.metrics,
        })
    });
    vm.stop(Duration::from_secs(5));
    kv_run::remove_snapshot(&target);
    r
}

/// How QEMU saves the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuSave {
    /// `background-snapshot` capability, then migrate (guest keeps running).
    Background,
    /// `stop`, migrate, `cont`.
    StopAndSave,
}

impl QemuSave {
    pub fn name(self) -> &'static str {
        match self {
            QemuSave::Background => "background-snapshot",
            QemuSave::StopAndSave => "stop-and-save",
        }
    }
}

/// `mode=bench` under QEMU microvm, saved once with `how`.
pub fn qemu(c: &GuestBenchConfig, how: QemuSave) -> Result<GuestBenchRun> {
    let sock = c.work_dir.join(format!("qmp-{}.sock", std::process::id()));
    let file = c.work_dir.join(format!("qemu-{}.mig", how.name()));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&file);
    // `-cpu host` is left out: QEMU 7.2 aborts with it on this nested host.
    let mut vm = Proc::spawn(
        Command::new(&c.qemu).args([
            "-M",
            "microvm",
            "-accel",
            "kvm",
            "-m",
            &format!("{}M", c.memory_mib),
            "-nographic",
            "-nodefaults",
            "-no-reboot",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
            &c.guest_elf.to_string_lossy(),
            "-append",
            &cmdline(c),
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock.display()),
        ]),
        "install it with `apt-get install qemu-system-x86` (scripts/bench does)",
    )?;
    let mut qmp = Qmp::connect(&sock, Duration::from_secs(30))?;
    let timeout = c.snapshot_timeout;
    let uri = format!("exec:cat > {}", file.display());
    let r = measure(c, &mut vm, "qemu", how.name(), |_vm| {
        if how == QemuSave::Background {
            qmp.execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [
                    {"capability": "background-snapshot", "state": true}
                ]})),
            )?;
        }
        let start = Instant::now();
        if how == QemuSave::StopAndSave {
            qmp.execute("stop", None)?;
        }
        qmp.execute("migrate", Some(json!({ "uri": uri })))?;
        let info = qmp.wait_migration(timeout)?;
        if how == QemuSave::StopAndSave {
            qmp.execute("cont", None)?;
        }
        let done = Instant::now();
        // QEMU 7.2 sometimes reports a completed background snapshot with
        // "total-time": 0 (seen in CI, 167 MB transferred): then the
        // host's own clock from `migrate` to completion stands in.
        let total_us = info
            .get("total-time")
            .and_then(serde_json::Value::as_f64)
            .filter(|&ms| ms > 0.0)
            .map(|ms| ms * 1000.0);
        let downtime_us = info
            .get("downtime")
            .and_then(serde_json::Value::as_f64)
            .map(|ms| ms * 1000.0);
        let pause = match how {
            QemuSave::StopAndSave => Some(done.duration_since(start).as_secs_f64() * 1e6),
            QemuSave::Background => downtime_us,
        };
        Ok(Snapped {
            start,
            done,
            sync_pause_us: pause,
            total_us: total_us.or(Some(done.duration_since(start).as_secs_f64() * 1e6)),
            details: info,
        })
    });
    drop(qmp);
    vm.stop(Duration::from_secs(5));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&file);
    r
}

/// Writes the bundled guest ELF with `snapvm guest-elf`.
pub fn write_guest_elf(snapvm: &Path, path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let out = Command::new(snapvm)
        .arg("guest-elf")
        .arg(path)
        .output()
        .map_err(|source| BenchError::Spawn {
            program: snapvm.display().to_string(),
            hint: "build it with `cargo build --release -p snapvm-vmm` or pass --snapvm",
            source,
        })?;
    if !out.status.success() {
        return Err(BenchError::Exited {
            what: format!("{} guest-elf", snapvm.display()),
            status: out.status.to_string(),
            tail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn win(ops: u64) -> GuestWindow {
        GuestWindow {
            t_ms: 0,
            ops,
            p50_us: 1.0,
            p99_us: 2.0,
            p999_us: 3.0,
            max_us: ops as f64,
            max_stall_us: 0.0,
        }
    }

    #[test]
    fn edge_windows_count_by_the_part_inside() {
        const MS: u64 = 1_000_000;
        // 100 ms windows ending at 100, 200, 300, 400 ms: 1000, 100, 100, 1000 ops.
        let w: Vec<(u64, GuestWindow)> = [1000, 100, 100, 1000]
            .iter()
            .enumerate()
            .map(|(i, &ops)| ((i as u64 + 1) * 100 * MS, win(ops)))
            .collect();
        // 150..250 ms: half of window 2 (100 ops/100 ms) and half of 3.
        let s = fold(
            &w,
            100,
            Window {
                start_ns: 150 * MS,
                end_ns: 250 * MS,
            },
        );
        assert_eq!(s.windows, 2);
        assert!((s.ops_per_s - 1000.0).abs() < 1e-6, "{}", s.ops_per_s);
        // 190..310 ms: 10 ms of the 100-op window, the 100-op window, and
        // 10 ms of the last (1000 ops): 210 ops in 120 ms, not 1200 in 300.
        let s = fold(
            &w,
            100,
            Window {
                start_ns: 190 * MS,
                end_ns: 310 * MS,
            },
        );
        assert_eq!(s.windows, 3, "the edges still count for the worst latency");
        let want = 210.0 * 1000.0 / 120.0;
        assert!(
            (s.ops_per_s - want).abs() < 1e-6,
            "{} vs {want}",
            s.ops_per_s
        );
        assert_eq!(s.max_us, 1000.0);
    }

    /// A stop-the-world snapshot pauses the guest for 450 ms: no line
    /// arrives meanwhile, and the window that held the pause arrives just
    /// after it with the ops it did before and after. Its ops are not
    /// spread over the pause: the snapshot window reads near zero, not as
    /// the speed of the windows around it.
    #[test]
    fn a_pause_inside_the_window_counts_as_no_work() {
        const MS: u64 = 1_000_000;
        // 100 ms windows of 1000 ops ending at 100 and 200 ms; the third
        // began at 200, the guest ran 50 ms, was paused 450 ms, ran 50 ms
        // more: it arrives at 750 ms with 1000 ops and a 450 ms stall;
        // then windows again at 850 and 950 ms.
        let mut w: Vec<(u64, GuestWindow)> = [100, 200, 750, 850, 950]
            .iter()
            .map(|&t| (t * MS, win(1000)))
            .collect();
        w[2].1.max_stall_us = 450_000.0;
        // The snapshot window: the pause itself, 250..700 ms.
        let s = fold(
            &w,
            100,
            Window {
                start_ns: 250 * MS,
                end_ns: 700 * MS,
            },
        );
        assert_eq!(s.windows, 1);
        assert_eq!(s.ops_per_s, 0.0, "paused throughout");
        assert_eq!(s.max_stall_us, 450_000.0);
        // 200..800 ms: the whole third window (1000 ops) and half of the
        // fourth (500 ops) in 600 ms.
        let s = fold(
            &w,
            100,
            Window {
                start_ns: 200 * MS,
                end_ns: 800 * MS,
            },
        );
        let want = 1500.0 * 1000.0 / 600.0;
        assert!(
            (s.ops_per_s - want).abs() < 1e-6,
            "{} vs {want}",
            s.ops_per_s
        );
        // Undisturbed windows fold to their own speed.
        let s = fold(
            &w,
            100,
            Window {
                start_ns: 0,
                end_ns: 200 * MS,
            },
        );
        assert!((s.ops_per_s - 10_000.0).abs() < 1e-6, "{}", s.ops_per_s);
    }
}
