//! `snapvm-bench snapshot`: what one snapshot costs the guest, by mode, in
//! this process (the VM is booted and snapshotted through `snapvm_vmm`, no
//! `snapvm` binary involved).
//!
//! Boots the embedded guest in `mode=scribble` (every vCPU writes one word
//! per 4 KiB page across `populate_fraction` of its heap, forever, ticking
//! its probe slot every 64 pages), waits until the first pass populated the
//! buffer, then for each mode (and worker count for async-fork):
//!
//! 1. noise floor: zero the probe's `max_gap_tsc` (a benchmark-only VMM
//!    write into guest memory, [`Vm::reset_probe_gaps`]), sleep
//!    `baseline`, read the largest gap over the vCPUs;
//! 2. zero it again, take one snapshot and wait until it is persisted; the
//!    largest gap the guest saw meanwhile is the *guest-visible pause*
//!    (it covers the sync phase and every stall of the copy: write faults,
//!    vCPU threads preempted by copiers);
//! 3. record the engine's numbers and the extra memory: this process's peak
//!    RSS (`VmHWM`, reset before each snapshot through
//!    `/proc/self/clear_refs`) minus its RSS just before the request (the
//!    fork baseline's child is not included);
//! 4. write as many bytes as the snapshot wrote with `dd bs=2M
//!    oflag=direct conv=fsync` into the same directory: the disk's own
//!    speed, for the request-to-done ratio; then delete both.
//!
//! The first snapshot of a VM allocates its staging pool (before the
//! pause: part of request-to-done, and of the extra memory); with `warm`, a
//! second snapshot per mode measures the steady state with the pool kept.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use snapvm_snapshot::{BackgroundPriority, Strategy};
use snapvm_vmm::loader::{BootConfig, KernelImage};
use snapvm_vmm::placement::CpuPlacement;
use snapvm_vmm::probe_gaps::ProbeGaps;
use snapvm_vmm::snapshotting::{SnapshotRequest, SnapshotState, Snapshotter};
use snapvm_vmm::{PageBacking, Vm, VmConfig};

use crate::cli::{self, SnapshotArgs};
use crate::error::{BenchError, Result};
use crate::proc;

mod row;

use row::us;
pub use row::{markdown, Row};

/// Worker threads for stop-the-world's copy inside the pause.
pub const STOP_THE_WORLD_WORKERS: usize = 2;

/// `snapvm-bench snapshot`: checks the flags, then prints one JSON object
/// per snapshot on stdout as it is measured, then a blank line and the
/// Markdown table.
pub fn command(args: SnapshotArgs) -> Result<()> {
    cli::init_vmm_logging(&args.log_level)?;
    let (memory_size, vcpus) = cli::machine_size(&args.memory, args.vcpus)?;
    if !args.dir.is_dir() {
        return Err(BenchError::NotADirectory(args.dir));
    }
    let cpus = args.cpus.map(CpuPlacement::new).transpose()?;
    let params = Params {
        memory_size,
        vcpus,
        modes: args.modes,
        workers: args.workers,
        backing: args.hugepages,
        dir: args.dir,
        populate_fraction: args.populate_fraction,
        warm: args.warm,
        memory_budget: args.memory_budget,
        baseline: Duration::from_millis(args.baseline_ms.max(1)),
        priorities: args.priorities,
        cpus,
    };
    let rows = run(&params, &mut |row| {
        println!("{}", row.to_json());
    })?;
    println!();
    print!("{}", markdown(&rows));
    Ok(())
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct Params {
    pub memory_size: u64,
    pub vcpus: usize,
    pub modes: Vec<Strategy>,
    /// Worker counts tried for async-fork.
    pub workers: Vec<usize>,
    pub backing: PageBacking,
    /// Parent of the snapshot directories.
    pub dir: PathBuf,
    pub populate_fraction: f64,
    pub warm: bool,
    /// Staging budget of every snapshot.
    pub memory_budget: u64,
    pub baseline: Duration,
    /// Persist-thread priorities tried for every mode but fork.
    pub priorities: Vec<BackgroundPriority>,
    /// `--cpus`: the guest on some CPUs, the copiers on the others.
    pub cpus: Option<CpuPlacement>,
}

/// `dd if=/dev/zero of=DIR/dd.img bs=2M count=N oflag=direct conv=fsync`
/// for `bytes` (rounded up to 2 MiB), timed; the file is removed.
fn dd(dir: &Path, bytes: u64) -> Result<Duration> {
    let file = dir.join(format!("snapvm-bench-dd-{}.img", std::process::id()));
    let count = bytes.div_ceil(2 << 20).max(1);
    let t = Instant::now();
    let out = std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args([
            "bs=2M",
            &format!("count={count}"),
            "oflag=direct",
            "conv=fsync",
        ])
        .output();
    let took = t.elapsed();
    let _ = std::fs::remove_file(&file);
    match out {
        Ok(o) if o.status.success() => Ok(took),
        Ok(o) => Err(BenchError::Dd {
            dir: dir.into(),
            why: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        }),
        Err(e) => Err(BenchError::Dd {
            dir: dir.into(),
            why: e.to_string(),
        }),
    }
}

fn check_running(vm: &Vm) -> Result<()> {
    match vm.exit_reason() {
        Some(exit) => Err(BenchError::GuestStopped(exit)),
        None => Ok(()),
    }
}

/// Waits until every vCPU finished its first pass (the buffer is populated).
fn wait_populated(vm: &Vm, vcpus: usize, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    let mut last_log = Instant::now();
    loop {
        check_running(vm)?;
        let hb = vm.heartbeats().unwrap_or_default();
        if hb.len() == vcpus && hb.iter().all(|&b| b >= 1) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(BenchError::PopulateTimeout(timeout, hb));
        }
        if last_log.elapsed() > Duration::from_secs(5) {
            last_log = Instant::now();
            eprintln!(
                "bench snapshot: populating guest memory ({:.0} s)...",
                start.elapsed().as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long the copy/persist split waits for the guest to close the gap
/// across the pause (see [`pause_gap_closed`]).
const SPLIT_WAIT: Duration = Duration::from_millis(500);

/// Whether the guest has logged the gap that spans the pause (guest TSC
/// `fork_tsc`), so that splitting the window now counts it in the copy
/// part. Modes whose copy ends in the pause (fork, stop-the-world,
/// sync-wp) leave the copy state at once, possibly before the guest has
/// run the loop iteration that closes that gap (after a fork its first
/// writes are copy-on-write faults); splitting then put the pause's stall
/// in the persist part. Without a TSC, or after [`SPLIT_WAIT`], it splits
/// anyway.
fn pause_gap_closed(gaps: &ProbeGaps, fork_tsc: Option<u64>, since: Instant) -> bool {
    match fork_tsc {
        Some(tsc) if since.elapsed() < SPLIT_WAIT => gaps.spanning_us(tsc).is_some(),
        _ => true,
    }
}

fn passes(vm: &Vm) -> Result<u64> {
    Ok(vm.heartbeats()?.iter().sum())
}

/// Boots the scribble guest and measures every requested snapshot. Each
/// row is passed to `on_row` as soon as it is measured.
pub fn run(p: &Params, on_row: &mut dyn FnMut(&Row)) -> Result<Vec<Row>> {
    let pct = ((p.populate_fraction * 100.0).round() as u64).clamp(1, 95);
    let config = VmConfig {
        boot: BootConfig {
            kernel: KernelImage::embedded(),
            initrd: None,
            cmdline: Some(format!("mode=scribble scribble_pct={pct}")),
        },
        memory_size: p.memory_size,
        vcpus: p.vcpus,
        serial_out: Box::new(std::io::LineWriter::new(std::io::stderr())),
        serial_in: false,
        backing: p.backing,
    };
    let mut vm = snapvm_vmm::builder::boot(config)?;
    if let Some(cpus) = &p.cpus {
        vm.set_cpu_placement(cpus.clone());
    }
    vm.start()?;
    let snapshotter = Snapshotter::new();
    let result = measure(&vm, &snapshotter, p, on_row);
    vm.shutdown();
    result
}

fn plan(p: &Params) -> Vec<(Strategy, usize, BackgroundPriority)> {
    let mut out = Vec::new();
    for &mode in &p.modes {
        let workers: &[usize] = match mode {
            Strategy::AsyncFork => &p.workers,
            Strategy::StopTheWorld => &[STOP_THE_WORLD_WORKERS],
            _ => &[1],
        };
        // The fork child is not ours to schedule.
        let priorities: &[BackgroundPriority] = match mode {
            Strategy::Fork => &[BackgroundPriority::Normal],
            _ => &p.priorities,
        };
        for &w in workers {
            out.extend(priorities.iter().map(|&pr| (mode, w, pr)));
        }
    }
    out
}

fn measure(
    vm: &Vm,
    snapshotter: &Snapshotter,
    p: &Params,
    on_row: &mut dyn FnMut(&Row),
) -> Result<Vec<Row>> {
    let gib = p.memory_size as f64 / (1u64 << 30) as f64;
    let timeout = Duration::from_secs_f64(60.0 + 60.0 * gib);
    let took = wait_populated(vm, p.vcpus, timeout)?;
    eprintln!(
        "bench snapshot: {gib:.0} GiB ({}) populated in {:.1} s",
        p.backing.name(),
        took.as_secs_f64()
    );
    let mut rows = Vec::new();
    for (mode, workers, priority) in plan(p) {
        let runs: &[bool] = if p.warm && mode != Strategy::Fork {
            &[false, true]
        } else {
            &[false]
        };
        for &warm in runs {
            let row = one(vm, snapshotter, p, (mode, workers, priority), warm)?;
            eprintln!(
                "bench snapshot: {mode} x{workers} {} ({}): guest pause {:.0} us (noise {:.0} us), engine pause {:.0} us, done {:.0} ms ({:.2}x dd), extra memory {} MiB",
                priority.name(),
                row.pool(),
                row.guest_pause_us,
                row.noise_us,
                us(row.engine_pause()),
                row.metrics.total.as_secs_f64() * 1e3,
                row.done_vs_dd(),
                row.extra_memory() >> 20,
            );
            on_row(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

fn snapshot_dir(parent: &Path, what: (Strategy, usize, BackgroundPriority), warm: bool) -> PathBuf {
    let (mode, workers, priority) = what;
    parent.join(format!(
        "snapvm-bench-{}-{mode}-x{workers}-{}-{}",
        std::process::id(),
        priority.name(),
        if warm { "warm" } else { "cold" }
    ))
}

fn one(
    vm: &Vm,
    snapshotter: &Snapshotter,
    p: &Params,
    what: (Strategy, usize, BackgroundPriority),
    warm: bool,
) -> Result<Row> {
    check_running(vm)?;
    let (mode, workers, priority) = what;
    let dir = snapshot_dir(&p.dir, what, warm);
    if dir.exists() {
        return Err(BenchError::DirExists(dir));
    }
    // Noise floor: the same window with no snapshot.
    vm.reset_probe_gaps()?;
    let b0 = passes(vm)?;
    let t = Instant::now();
    std::thread::sleep(p.baseline);
    let noise_us = vm.probe_max_gap_us()?.unwrap_or(0.0);
    let baseline_rate = (passes(vm)? - b0) as f64 / t.elapsed().as_secs_f64();

    let me = std::process::id();
    proc::reset_peak_rss(me);
    let rss_before = proc::status_kb(me, "VmRSS").unwrap_or(0);
    vm.reset_probe_gaps()?;
    let s0 = passes(vm)?;
    let t = Instant::now();
    let req = SnapshotRequest {
        mode,
        workers,
        priority,
        memory_budget: p.memory_budget,
        ..SnapshotRequest::new(&dir)
    };
    let err = |source| BenchError::Snapshot {
        mode,
        workers,
        source,
    };
    let mut cursors = Vec::new();
    // Everything logged before the request is not this snapshot's.
    vm.probe_gaps(&mut cursors)?;
    let mut gaps = ProbeGaps::default();
    // `take` returns after arming and the pause (tens of ms, more on 4 KiB
    // pages, and the pool's allocation the first time): read the guest's
    // gap ring meanwhile, or it laps.
    let sync_done = std::sync::atomic::AtomicBool::new(false);
    let snapshotted = std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut got = ProbeGaps::default();
            while !sync_done.load(std::sync::atomic::Ordering::Acquire) {
                if let Ok(g) = vm.probe_gaps(&mut cursors) {
                    got.extend(g);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            got
        });
        let r = snapshotter.take(vm, req);
        sync_done.store(true, std::sync::atomic::Ordering::Release);
        (r, reader.join())
    });
    let (snapshotted, read) = snapshotted;
    // (A panicking reader aborts the process: the panic hook main()
    // installs for the in-process drivers.)
    gaps.extend(read.unwrap_or_default());
    let handle = snapshotted.map_err(err)?;
    let fork_tsc = handle.metrics().sync.guest_tsc;
    let returned = Instant::now();
    // Split the window where the memory copy ends (the engine is done with
    // guest RAM, so the reset write is not part of the snapshot): stalls
    // of the sync phase and the copy vs. stalls while persisting.
    let mut copy_gap_us = None;
    let waited = loop {
        gaps.extend(vm.probe_gaps(&mut cursors)?);
        if let Some(r) = handle.wait_timeout(Duration::from_millis(1)) {
            break r;
        }
        if copy_gap_us.is_none()
            && handle.state() != SnapshotState::Copying
            && pause_gap_closed(&gaps, fork_tsc, returned)
        {
            copy_gap_us = Some(vm.probe_max_gap_us()?.unwrap_or(0.0));
            vm.reset_probe_gaps()?;
        }
    };
    let window = t.elapsed();
    let snapshot_rate = (passes(vm)? - s0) as f64 / window.as_secs_f64();
    // A snapshot can be done (stop-the-world persists in a moment) before
    // the guest, back on a busy host, ran the loop iteration that logs its
    // gap across the pause: wait for it as the split above does, or the
    // row has no stall across the pause (seen in CI under load).
    while !pause_gap_closed(&gaps, fork_tsc, returned) {
        gaps.extend(vm.probe_gaps(&mut cursors)?);
        std::thread::sleep(Duration::from_millis(1));
    }
    let last_gap_us = vm.probe_max_gap_us()?.unwrap_or(0.0);
    let (copy_gap_us, persist_gap_us) = match copy_gap_us {
        Some(c) => (c, last_gap_us),
        None => (last_gap_us, 0.0),
    };
    let guest_pause_us = copy_gap_us.max(persist_gap_us);
    let peak = proc::peak_rss(me).unwrap_or(0);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if dir.exists() {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    }
    let metrics = waited.map_err(err)?;
    let written = metrics
        .engine
        .as_ref()
        .map(|e| e.bytes_written)
        .or_else(|| {
            metrics
                .persist
                .as_ref()
                .map(|p| p.bytes_written.max(p.data_bytes))
        })
        .unwrap_or(0);
    let dd = dd(&p.dir, written)?;
    let fork_stall_us = metrics.sync.guest_tsc.and_then(|tsc| gaps.spanning_us(tsc));
    let longest_gap_us = metrics.sync.guest_tsc.and_then(|tsc| gaps.longest_us(tsc));
    Ok(Row {
        memory_size: p.memory_size,
        backing: p.backing,
        mode,
        workers,
        priority,
        warm,
        noise_us,
        guest_pause_us,
        copy_gap_us,
        persist_gap_us,
        fork_stall_us,
        gaps_lost: gaps.lost,
        longest_gap_us,
        baseline: p.baseline,
        window,
        passes_per_s_baseline: baseline_rate,
        passes_per_s_snapshot: snapshot_rate,
        rss_before,
        peak_rss: peak,
        dd,
        metrics,
    })
}

#[cfg(test)]
mod tests;
