//! snapvm-bench: every benchmark driver of snapvm, in one binary.
//!
//! - `snapvm-bench pause` ([`vm_pause`]) and `snapvm-bench snapshot`
//!   ([`vm_snapshot`]) boot a VM in this process through `snapvm_vmm` and
//!   measure the pause/resume primitive and what one snapshot costs the
//!   guest, by mode. JSON on stdout; an error is one line on stderr
//!   starting with `snapvm-bench: error: `, status 1.
//! - `snapvm-bench` without a command is the comparative benchmark: what a
//!   database user gains from async-fork (issue #6), driving the `snapvm`
//!   binary. The engine's own probes are the crate's examples
//!   (`cargo run --release -p snapvm-bench --example bench|mem_probe|uffd_probe`).
//!
//! The comparative benchmark: for each guest size and page backing, one snapvm run per snapshot mode:
//! populate the bundled KV guest, drive it with an open-loop load over the
//! real forwarded TCP port, record a window without snapshot, take one
//! snapshot (SIGUSR1) and record the window until it is complete. Then the
//! same guest ELF in `mode=bench` under snapvm and QEMU microvm (background
//! snapshot and stop-and-save), and native Redis with BGSAVE. Writes one
//! JSON file with every number, PNG plots, and (with --markdown) the table
//! into docs/BENCHMARKS.md between marker comments.

mod cli;
mod error;
mod guest_bench;
mod kv_run;
mod load;
mod plot;
mod proc;
mod qmp;
mod redis_run;
mod report;
mod resp;
mod stats;
mod vm_pause;
mod vm_snapshot;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use clap::Parser;

use crate::error::{BenchError, Result};
use crate::report::{Machine, Report};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        Some(cli::Command::Pause(args)) => in_process(|| vm_pause::command(&args)),
        Some(cli::Command::Snapshot(args)) => in_process(|| vm_snapshot::command(args)),
        None => compare(cli.compare),
    }
}

/// Runs an in-process driver (it boots a VM here): a panic in a thread the
/// VM depends on aborts, as in `snapvm`; an error is one line, status 1.
fn in_process(driver: impl FnOnce() -> Result<()>) -> ExitCode {
    snapvm_vmm::install_panic_hook();
    match driver() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Keep it to one line whatever the message contains.
            let msg = e.to_string().replace('\n', " ");
            eprintln!("snapvm-bench: error: {msg}");
            ExitCode::from(1)
        }
    }
}

/// The comparative benchmark.
fn compare(args: cli::Args) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .try_init();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            tracing::error!("some runs failed (listed in the JSON and the table)");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!("snapvm-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The checkout being measured and whether its code has uncommitted
/// changes (see `Report::commit`). The benchmark's own outputs under docs/
/// do not count.
fn commit() -> (Option<String>, bool) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return (None, false);
    };
    let dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":(exclude)docs",
    ])
    .is_some_and(|s| !s.is_empty());
    (Some(head), dirty)
}

fn machine() -> Machine {
    let mem_total_bytes = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    Machine {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        mem_total_bytes,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        load_avg_start: proc::loadavg(),
        load_avg_end: None,
    }
}

/// Where and how to write the results.
struct Outputs<'a> {
    out_dir: &'a std::path::Path,
    json_name: &'a str,
    markdown: Option<&'a std::path::Path>,
    plots: bool,
    all_plots: bool,
    font: &'a std::path::Path,
}

/// Writes the plots, the JSON and the Markdown; Ok(false) when the report
/// holds failed runs.
fn render(mut report: Report, o: &Outputs<'_>) -> Result<bool> {
    std::fs::create_dir_all(o.out_dir).map_err(|e| BenchError::io("create", o.out_dir, e))?;
    let mut plots = Vec::new();
    if o.plots {
        match plot::all(&report, o.out_dir, o.font, o.all_plots) {
            Ok(p) => plots = p,
            Err(e) => {
                tracing::error!("plots failed: {e}");
                report.errors.push(format!("plots: {e}"));
            }
        }
    }
    let json_path = o.out_dir.join(o.json_name);
    // Compact: the file is committed beside the docs.
    let text = serde_json::to_string(&report).map_err(|e| BenchError::Json {
        what: "report".into(),
        source: e,
    })?;
    std::fs::write(&json_path, text + "\n").map_err(|e| BenchError::io("write", &json_path, e))?;
    tracing::info!("wrote {}", json_path.display());
    if let Some(md) = o.markdown {
        report::write_markdown(md, &report::markdown(&report, o.json_name, &plots))?;
        tracing::info!("wrote the table into {}", md.display());
    }
    for t in &report.targets {
        tracing::info!(
            "target {}: {} — {}",
            t.name,
            match t.met {
                Some(true) => "met",
                Some(false) => "missed",
                None => "not measured",
            },
            t.detail
        );
    }
    Ok(report.errors.is_empty())
}

/// Runs everything; Ok(false) when some runs failed (the rest is reported).
fn run(args: cli::Args) -> Result<bool> {
    let outputs = Outputs {
        out_dir: &args.out_dir,
        json_name: &args.json_name,
        markdown: args.markdown.as_deref(),
        plots: !args.no_plots,
        all_plots: args.all_plots,
        font: &args.font,
    };
    if let Some(path) = &args.from_json {
        let text = std::fs::read_to_string(path).map_err(|e| BenchError::io("read", path, e))?;
        let mut report: Report = serde_json::from_str(&text).map_err(|e| BenchError::Json {
            what: path.display().to_string(),
            source: e,
        })?;
        // Targets are recomputed, so a fixed rule applies to old data too.
        report.targets = report::targets(&report.kv, &report.guest_bench);
        return render(report, &outputs);
    }
    let plan = args.plan()?;
    let started = Instant::now();
    let started_utc = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut machine = machine();
    let (commit, uncommitted) = commit();
    std::fs::create_dir_all(&plan.out_dir)
        .map_err(|e| BenchError::io("create", &plan.out_dir, e))?;
    std::fs::create_dir_all(&plan.work_root)
        .map_err(|e| BenchError::io("create", &plan.work_root, e))?;
    let work = tempfile::Builder::new()
        .prefix("snapvm-bench-")
        .tempdir_in(&plan.work_root)
        .map_err(|e| BenchError::io("create a directory in", &plan.work_root, e))?;
    let mut common = plan.common.clone();
    common.work_dir = work.path().to_path_buf();

    let mut errors = Vec::new();
    let mut kv = Vec::new();
    let total = plan.kv_runs().len();
    for (i, (mib, huge, mode, workers)) in plan.kv_runs().into_iter().enumerate() {
        let name = format!(
            "kv {} MiB {} {}",
            mib,
            if huge { "THP" } else { "4 KiB" },
            kv_run::label(&mode, workers)
        );
        tracing::info!(
            "[{}/{total}] {name} (t+{:.0} s)",
            i + 1,
            started.elapsed().as_secs_f64()
        );
        match kv_run::run(&common, mib, huge, &mode, workers) {
            Ok(r) => {
                let (b, s) = (&r.windows.baseline_latency, &r.windows.snapshot_latency);
                tracing::info!(
                    "  p99 {:.2} → {:.2} ms, max {:.2} → {:.2} ms, sync pause {:.2} ms, total {:.2} s",
                    b.p99_us / 1e3,
                    s.p99_us / 1e3,
                    b.max_us / 1e3,
                    s.max_us / 1e3,
                    r.sync_pause_us.unwrap_or(0.0) / 1e3,
                    r.snapshot_total_us.unwrap_or(0.0) / 1e6
                );
                kv.push(r);
            }
            Err(e) => {
                tracing::error!("  {name} failed: {e}");
                errors.push(format!("{name}: {e}"));
            }
        }
    }

    let mut redis = Vec::new();
    if let Some(server) = &plan.redis_server {
        for &mib in &plan.sizes_mib {
            tracing::info!(
                "redis-server BGSAVE, dataset as {mib} MiB guest (t+{:.0} s)",
                started.elapsed().as_secs_f64()
            );
            match redis_run::run(&common, server, mib) {
                Ok(r) => {
                    tracing::info!(
                        "  p99 {:.2} → {:.2} ms, max {:.2} ms, latest_fork_usec {}",
                        r.windows.baseline_latency.p99_us / 1e3,
                        r.windows.snapshot_latency.p99_us / 1e3,
                        r.windows.snapshot_latency.max_us / 1e3,
                        r.latest_fork_usec.unwrap_or(0.0)
                    );
                    redis.push(r);
                }
                Err(e) => {
                    tracing::error!("  redis {mib} MiB failed: {e}");
                    errors.push(format!("redis {mib} MiB: {e}"));
                }
            }
        }
    }

    let mut guest = Vec::new();
    if let Some(gb) = &plan.guest_bench {
        let mut gb = gb.clone();
        gb.work_dir = common.work_dir.clone();
        gb.guest_elf = common.work_dir.join("snapvm-guest.elf");
        guest_bench::write_guest_elf(&plan.common.snapvm, &gb.guest_elf)?;
        for (mode, workers) in &plan.guest_bench_modes {
            let name = format!("mode=bench snapvm {}", kv_run::label(mode, *workers));
            tracing::info!("{name} (t+{:.0} s)", started.elapsed().as_secs_f64());
            match guest_bench::snapvm(&gb, mode, *workers) {
                Ok(r) => guest.push(r),
                Err(e) => {
                    tracing::error!("  {name} failed: {e}");
                    errors.push(format!("{name}: {e}"));
                }
            }
        }
        if plan.qemu {
            for how in [
                guest_bench::QemuSave::Background,
                guest_bench::QemuSave::StopAndSave,
            ] {
                let name = format!("mode=bench qemu {}", how.name());
                tracing::info!("{name} (t+{:.0} s)", started.elapsed().as_secs_f64());
                match guest_bench::qemu(&gb, how) {
                    Ok(r) => guest.push(r),
                    Err(e) => {
                        tracing::error!("  {name} failed: {e}");
                        errors.push(format!("{name}: {e}"));
                    }
                }
            }
        }
        for g in &guest {
            tracing::info!(
                "  {} {}: p99.9 {:.2} → {:.2} ms, max {:.2} → {:.2} ms, stall {:.2} → {:.2} ms",
                g.vmm,
                g.mode,
                g.baseline.p999_us / 1e3,
                g.snapshot.p999_us / 1e3,
                g.baseline.max_us / 1e3,
                g.snapshot.max_us / 1e3,
                g.baseline.max_stall_us / 1e3,
                g.snapshot.max_stall_us / 1e3
            );
        }
    }

    machine.load_avg_end = proc::loadavg();
    let targets = report::targets(&kv, &guest);
    let report = Report {
        started_utc,
        elapsed_s: started.elapsed().as_secs_f64(),
        command: plan.command.clone(),
        commit,
        uncommitted,
        machine,
        config: plan.config_json(),
        kv,
        redis,
        guest_bench: guest,
        targets,
        errors,
    };

    render(report, &outputs)
}
