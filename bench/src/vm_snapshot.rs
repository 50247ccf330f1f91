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
use snapvm_vmm::snapshotting::{SnapshotMetrics, SnapshotRequest, SnapshotState, Snapshotter};
use snapvm_vmm::{PageBacking, Vm, VmConfig};

use crate::cli::{self, SnapshotArgs};
use crate::error::{BenchError, Result};

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

/// One measured snapshot.
#[derive(Debug, Clone)]
pub struct Row {
    pub memory_size: u64,
    pub backing: PageBacking,
    pub mode: Strategy,
    pub workers: usize,
    pub priority: BackgroundPriority,
    pub warm: bool,
    /// Largest probe gap in a window of `baseline` without snapshot (µs).
    pub noise_us: f64,
    /// Largest probe gap from the request until the snapshot was persisted.
    pub guest_pause_us: f64,
    /// Largest probe gap from the request until the memory copy ended
    /// (sync phase + copy; fork: until the child started writing).
    pub copy_gap_us: f64,
    /// Largest probe gap while persisting (after the copy).
    pub persist_gap_us: f64,
    /// The guest's own stall across the pause: its logged main-loop gap
    /// that contains the guest-TSC instant captured in the pause, and how
    /// much of it came before and after that instant (µs; None if no logged
    /// gap did, e.g. the log lapped the reader).
    pub fork_stall_us: Option<(f64, f64, f64)>,
    /// Gap records the guest overwrote before they were read.
    pub gaps_lost: u64,
    /// The longest logged gap of the window and where it started relative
    /// to the fork instant (µs, negative: before it).
    pub longest_gap_us: Option<(f64, f64)>,
    /// Length of the no-snapshot window.
    pub baseline: Duration,
    /// Request until persisted.
    pub window: Duration,
    /// Guest passes over its buffer per second in the baseline window and
    /// during the snapshot (sum over vCPUs).
    pub passes_per_s_baseline: f64,
    pub passes_per_s_snapshot: f64,
    /// This process's RSS just before the request, and its peak while the
    /// snapshot ran (bytes).
    pub rss_before: u64,
    pub peak_rss: u64,
    /// `dd bs=2M oflag=direct conv=fsync` of the snapshot's bytes written,
    /// into the same directory, right after it.
    pub dd: Duration,
    pub metrics: SnapshotMetrics,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl Row {
    /// The VMM's sync phase (pause request until resumed).
    pub fn engine_pause(&self) -> Duration {
        self.metrics.sync.total
    }

    /// Copy of guest memory: the engine's background copy (stop-the-world:
    /// its copy inside the pause); fork: the child's whole run (copy and
    /// write are one).
    pub fn copy(&self) -> Duration {
        match (&self.metrics.engine, self.mode) {
            (Some(_), Strategy::StopTheWorld) => self.metrics.sync.engine.copy,
            (Some(e), _) => e.copy_total,
            (None, _) => self.metrics.copy_wait,
        }
    }

    /// `first` (the VM's first snapshot: it allocates the staging pool)
    /// or `warm` (the pool kept from an earlier one).
    pub fn pool(&self) -> &'static str {
        if self.warm {
            "warm"
        } else {
            "first"
        }
    }

    /// The commit (fsync, state file, rename, fsync of the parent).
    pub fn persist(&self) -> Duration {
        self.metrics
            .persist
            .as_ref()
            .map_or(Duration::ZERO, |p| p.commit)
    }

    pub fn bytes_copied(&self) -> u64 {
        match (&self.metrics.engine, &self.metrics.persist) {
            (Some(e), _) => e.bytes_written,
            (None, Some(p)) => p.bytes_written.max(p.data_bytes),
            _ => 0,
        }
    }

    /// Peak RSS minus RSS before the request.
    pub fn extra_memory(&self) -> u64 {
        self.peak_rss.saturating_sub(self.rss_before)
    }

    /// Request to durable done, as a multiple of `dd` writing the same
    /// bytes to the same disk.
    pub fn done_vs_dd(&self) -> f64 {
        let dd = self.dd.as_secs_f64();
        if dd > 0.0 {
            self.metrics.total.as_secs_f64() / dd
        } else {
            0.0
        }
    }

    /// GiB/s of the memory copy.
    pub fn copy_gib_s(&self) -> f64 {
        let s = self.copy().as_secs_f64();
        if s > 0.0 {
            self.bytes_copied() as f64 / (1u64 << 30) as f64 / s
        } else {
            0.0
        }
    }

    fn faults(&self) -> (u64, f64, f64, f64) {
        match &self.metrics.engine {
            Some(e) => (
                e.faults(),
                e.fault_latency.p50_ns as f64 / 1e3,
                e.fault_latency.p99_ns as f64 / 1e3,
                e.fault_latency.max_ns as f64 / 1e3,
            ),
            None => (0, 0.0, 0.0, 0.0),
        }
    }

    /// One JSON object; the snapshot's own metrics are nested.
    pub fn to_json(&self) -> String {
        let (faults, p50, p99, max) = self.faults();
        format!(
            "{{\"memory_bytes\":{},\"backing\":\"{}\",\"mode\":\"{}\",\"workers\":{},\"priority\":\"{}\",\"pool\":\"{}\",\"memory_budget\":{},\"noise_floor_us\":{:.1},\"baseline_ms\":{},\"guest_pause_us\":{:.1},\"guest_pause_copy_us\":{:.1},\"guest_pause_persist_us\":{:.1},\"guest_stall_at_fork_us\":{},\"guest_stall_at_fork_before_after_us\":{},\"gaps_lost\":{},\"guest_longest_gap_us\":{},\"engine_pause_us\":{:.1},\"copy_us\":{:.1},\"copy_gib_s\":{:.2},\"persist_us\":{:.1},\"total_us\":{:.1},\"window_us\":{:.1},\"bytes_copied\":{},\"faults\":{},\"fault_us\":{{\"p50\":{:.1},\"p99\":{:.1},\"max\":{:.1}}},\"guest_passes_per_s\":{{\"baseline\":{:.2},\"snapshot\":{:.2}}},\"rss_before_bytes\":{},\"peak_rss_bytes\":{},\"extra_memory_bytes\":{},\"dd_us\":{:.1},\"done_vs_dd\":{:.3},\"metrics\":{}}}",
            self.memory_size,
            self.backing.name(),
            self.mode,
            self.workers,
            self.priority.name(),
            self.pool(),
            self.metrics.memory_budget,
            self.noise_us,
            self.baseline.as_millis(),
            self.guest_pause_us,
            self.copy_gap_us,
            self.persist_gap_us,
            self.fork_stall_us
                .map_or_else(|| "null".to_string(), |v| format!("{:.1}", v.0)),
            self.fork_stall_us.map_or_else(
                || "null".to_string(),
                |v| format!("[{:.1},{:.1}]", v.1, v.2)
            ),
            self.gaps_lost,
            self.longest_gap_us.map_or_else(
                || "null".to_string(),
                |(len, at)| format!("{{\"len\":{len:.1},\"start_from_fork\":{at:.1}}}")
            ),
            us(self.engine_pause()),
            us(self.copy()),
            self.copy_gib_s(),
            us(self.persist()),
            us(self.metrics.total),
            us(self.window),
            self.bytes_copied(),
            faults,
            p50,
            p99,
            max,
            self.passes_per_s_baseline,
            self.passes_per_s_snapshot,
            self.rss_before,
            self.peak_rss,
            self.extra_memory(),
            us(self.dd),
            self.done_vs_dd(),
            self.metrics.to_json(),
        )
    }
}

/// The Markdown table of `rows`.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| RAM | backing | mode | workers | priority | pool | noise floor (µs) | guest stall across the pause (µs) | guest-visible pause (µs): all / sync+copy / persist | engine pause (µs) | copy (ms) | copy GiB/s | commit (ms) | request to done (ms) | dd (ms) | done / dd | guest speed during (%) | faults | fault p50 / p99 / max (µs) | extra memory (MiB) |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let (faults, p50, p99, max) = r.faults();
        out.push_str(&format!(
            "| {} GiB | {} | {} | {} | {} | {} | {:.0} | {} | {:.0} / {:.0} / {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {} | {:.0} / {:.0} / {:.0} | {} |\n",
            r.memory_size as f64 / (1u64 << 30) as f64,
            r.backing.name(),
            r.mode,
            r.workers,
            r.priority.name(),
            r.pool(),
            r.noise_us,
            r.fork_stall_us
                .map_or_else(|| "–".to_string(), |v| format!("{:.0}", v.0)),
            r.guest_pause_us,
            r.copy_gap_us,
            r.persist_gap_us,
            us(r.engine_pause()),
            r.copy().as_secs_f64() * 1e3,
            r.copy_gib_s(),
            r.persist().as_secs_f64() * 1e3,
            r.metrics.total.as_secs_f64() * 1e3,
            r.dd.as_secs_f64() * 1e3,
            r.done_vs_dd(),
            guest_speed_pct(r),
            faults,
            p50,
            p99,
            max,
            r.extra_memory() >> 20,
        ));
    }
    out
}

/// The guest's passes per second during the snapshot, as a percentage of
/// its rate without one.
fn guest_speed_pct(r: &Row) -> f64 {
    if r.passes_per_s_baseline > 0.0 {
        100.0 * r.passes_per_s_snapshot / r.passes_per_s_baseline
    } else {
        0.0
    }
}

/// `VmHWM` of this process in bytes.
pub fn peak_rss() -> u64 {
    status_bytes("VmHWM:")
}

/// `VmRSS` of this process in bytes.
pub fn rss() -> u64 {
    status_bytes("VmRSS:")
}

fn status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_status_kib(&s, key))
        .map_or(0, |k| k * 1024)
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

fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// Resets `VmHWM` to the current RSS (Linux >= 4.0).
fn reset_peak_rss() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        tracing::warn!("cannot reset VmHWM: {e}");
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

    reset_peak_rss();
    let rss_before = rss();
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
    let last_gap_us = vm.probe_max_gap_us()?.unwrap_or(0.0);
    let (copy_gap_us, persist_gap_us) = match copy_gap_us {
        Some(c) => (c, last_gap_us),
        None => (last_gap_us, 0.0),
    };
    let guest_pause_us = copy_gap_us.max(persist_gap_us);
    let snapshot_rate = (passes(vm)? - s0) as f64 / window.as_secs_f64();
    let peak = peak_rss();
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
mod tests {
    use super::*;

    #[test]
    fn the_window_splits_only_once_the_pause_gap_is_logged_or_too_late() {
        use snapvm_guest::abi::GapRecord;
        let mut gaps = ProbeGaps {
            tsc_khz: 1_000_000,
            ..Default::default()
        };
        let now = Instant::now();
        assert!(!pause_gap_closed(&gaps, Some(5_000), now));
        // A gap logged before the pause does not close it.
        gaps.records.push(GapRecord {
            start_tsc: 1_000,
            end_tsc: 2_000,
        });
        assert!(!pause_gap_closed(&gaps, Some(5_000), now));
        gaps.records.push(GapRecord {
            start_tsc: 4_000,
            end_tsc: 9_000,
        });
        assert!(pause_gap_closed(&gaps, Some(5_000), now));
        // No TSC captured, or waited long enough: split anyway.
        assert!(pause_gap_closed(&gaps, None, now));
        let long_ago = now - SPLIT_WAIT - Duration::from_millis(1);
        assert!(pause_gap_closed(
            &ProbeGaps::default(),
            Some(5_000),
            long_ago
        ));
    }

    fn params(modes: Vec<Strategy>, workers: Vec<usize>) -> Params {
        Params {
            memory_size: 1 << 30,
            vcpus: 1,
            modes,
            workers,
            backing: PageBacking::Huge,
            dir: "/tmp".into(),
            populate_fraction: 0.75,
            warm: false,
            memory_budget: snapvm_snapshot::DEFAULT_BUDGET,
            baseline: Duration::from_secs(1),
            priorities: vec![BackgroundPriority::Idle, BackgroundPriority::Normal],
            cpus: None,
        }
    }

    #[test]
    fn plan_expands_workers_for_async_fork_and_priorities_but_for_fork() {
        let p = params(
            vec![
                Strategy::AsyncFork,
                Strategy::Fork,
                Strategy::StopTheWorld,
                Strategy::SyncWp,
            ],
            vec![1, 2, 4],
        );
        use BackgroundPriority::{Idle, Normal};
        assert_eq!(
            plan(&p),
            vec![
                (Strategy::AsyncFork, 1, Idle),
                (Strategy::AsyncFork, 1, Normal),
                (Strategy::AsyncFork, 2, Idle),
                (Strategy::AsyncFork, 2, Normal),
                (Strategy::AsyncFork, 4, Idle),
                (Strategy::AsyncFork, 4, Normal),
                (Strategy::Fork, 1, Normal),
                (Strategy::StopTheWorld, STOP_THE_WORLD_WORKERS, Idle),
                (Strategy::StopTheWorld, STOP_THE_WORLD_WORKERS, Normal),
                (Strategy::SyncWp, 1, Idle),
                (Strategy::SyncWp, 1, Normal),
            ]
        );
    }

    #[test]
    fn status_parsing() {
        let s = "Name:\tsnapvm\nVmPeak:\t  100 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_status_kib(s, "VmHWM:"), Some(2048));
        assert_eq!(parse_status_kib(s, "Nope:"), None);
        assert!(peak_rss() > 0);
    }
}
