//! One measured snapshot of `snapvm-bench snapshot` ([`Row`]): the derived
//! numbers (copy, persist, done/dd, extra memory) and its JSON line and
//! Markdown table row.

use std::time::Duration;

use snapvm_snapshot::{BackgroundPriority, Strategy};
use snapvm_vmm::snapshotting::SnapshotMetrics;
use snapvm_vmm::PageBacking;

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

pub(super) fn us(d: Duration) -> f64 {
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
