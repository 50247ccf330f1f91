//! What a snapshot cost, as recorded in its handle, `GET /snapshot/{id}`
//! and the `metrics.json` beside its files (`SnapshotMetrics::to_json`).
//! Durations are microseconds in JSON.

use std::time::Duration;

use serde::Serialize;
use snapvm_snapshot::persist::WriteSummary;
use snapvm_snapshot::{BackgroundPriority, Metrics, Strategy, SyncMetrics};

fn us(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e7).round() / 10.0
}

/// The sync phase as the VM saw it: the vCPUs are paused from the start of
/// `pause` to the end of `resume`; `engine.arm` ran before, with the guest
/// running.
#[derive(Debug, Clone, Default)]
pub struct SyncPhase {
    /// Kicking every vCPU out of KVM_RUN (and parking the devices).
    pub pause: Duration,
    /// Capturing and encoding every component's state.
    pub state_capture: Duration,
    /// Test-only chunk checksums (zero unless requested).
    pub checksums: Duration,
    /// `Engine::begin` (or the fork) as a whole; the whole write for
    /// stop-the-world.
    pub begin: Duration,
    /// The engine's own breakdown of `arm` and `begin`.
    pub engine: SyncMetrics,
    /// Releasing the devices and vCPUs.
    pub resume: Duration,
    /// From the pause request until `resume` returned: the guest's stall.
    pub total: Duration,
    /// From the request until the guest ran again (the directory, the
    /// staging pool the first time, arm, and the pause).
    pub request_to_resume: Duration,
    /// vCPU 0's TSC as captured in the pause: a guest-clock instant inside
    /// it, to find the guest's own stall across the pause (`ProbeBlock`
    /// gap log). None if the state has no TSC MSR.
    pub guest_tsc: Option<u64>,
}

/// Everything measured about one snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotMetrics {
    pub strategy: Strategy,
    pub workers: usize,
    pub priority: BackgroundPriority,
    /// The staging budget asked for.
    pub memory_budget: u64,
    /// How the host backs guest RAM (`thp`, `4k`, `hugetlbfs`).
    pub page_backing: &'static str,
    /// An incremental snapshot's parent directory (None: a full snapshot).
    pub parent: Option<String>,
    pub sync: SyncPhase,
    /// The engine's final numbers (writes, faults, staging).
    pub engine: Option<Metrics>,
    /// From the end of the sync phase until the memory was all in the
    /// image (the engine's wait, or the fork child's exit).
    pub copy_wait: Duration,
    /// The commit (fsync, state.bin, rename, fsync of the parent).
    pub persist: Option<WriteSummary>,
    /// From the request until the snapshot was durable (or failed).
    pub total: Duration,
}

#[derive(Serialize)]
struct SyncJson {
    total: f64,
    pause: f64,
    state_capture: f64,
    checksums: f64,
    begin: f64,
    register: f64,
    write_protect: f64,
    table_init: f64,
    stw_copy: f64,
    spawn: f64,
    resume: f64,
    arm: f64,
    staging_alloc: f64,
    request_to_resume: f64,
}

#[derive(Serialize)]
struct LatencyJson {
    count: u64,
    p50: f64,
    p99: f64,
    max: f64,
}

#[derive(Serialize)]
struct EngineJson {
    copy_total_us: f64,
    finish_us: f64,
    unit_size: u64,
    chunks_total: usize,
    chunks_by_workers: u64,
    chunks_by_fault_path: u64,
    chunks_by_hook: u64,
    chunks_staged: u64,
    direct_fault_writes: u64,
    zero_chunks: u64,
    /// A restored VM still loading: chunks copied from its snapshot.
    chunks_from_parent: u64,
    /// An incremental snapshot: chunks not written since the parent.
    chunks_inherited: u64,
    /// Writes are tracked from this snapshot on (the next may be a diff).
    tracking: bool,
    bytes_written: u64,
    wp_faults: u64,
    missing_faults: u64,
    fault_latency_us: LatencyJson,
    staging_bytes: u64,
    staging_peak_bytes: u64,
    direct_io: bool,
}

#[derive(Serialize)]
struct PersistJson {
    commit_us: f64,
    image_len: u64,
    data_bytes: u64,
    bytes_written: u64,
    zero_chunks: usize,
    state_bytes: u64,
}

#[derive(Serialize)]
struct MetricsJson {
    strategy: String,
    workers: usize,
    priority: &'static str,
    memory_budget: u64,
    page_backing: &'static str,
    /// `Full` or `Diff` (Firecracker's names).
    snapshot_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    sync_us: SyncJson,
    reprotected_chunks: u64,
    copy_wait_us: f64,
    total_us: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    engine: Option<EngineJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    persist: Option<PersistJson>,
}

impl SnapshotMetrics {
    pub(super) fn new(
        strategy: Strategy,
        workers: usize,
        priority: BackgroundPriority,
        memory_budget: u64,
        page_backing: &'static str,
    ) -> SnapshotMetrics {
        SnapshotMetrics {
            strategy,
            workers,
            priority,
            memory_budget,
            page_backing,
            parent: None,
            sync: SyncPhase::default(),
            engine: None,
            copy_wait: Duration::ZERO,
            persist: None,
            total: Duration::ZERO,
        }
    }

    /// The JSON object of `metrics.json` and `GET /snapshot/{id}`.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self.json()).unwrap_or(serde_json::Value::Null)
    }

    /// The same object on one line, fields in their declared order.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.json()).unwrap_or_else(|_| "null".into())
    }

    fn json(&self) -> MetricsJson {
        let s = &self.sync;
        let e = &s.engine;
        MetricsJson {
            strategy: self.strategy.to_string(),
            workers: self.workers,
            priority: self.priority.name(),
            memory_budget: self.memory_budget,
            page_backing: self.page_backing,
            snapshot_type: if self.parent.is_some() {
                "Diff"
            } else {
                "Full"
            },
            parent: self.parent.clone(),
            sync_us: SyncJson {
                total: us(s.total),
                pause: us(s.pause),
                state_capture: us(s.state_capture),
                checksums: us(s.checksums),
                begin: us(s.begin),
                register: us(e.register),
                write_protect: us(e.write_protect),
                table_init: us(e.table_init),
                stw_copy: us(e.copy),
                spawn: us(e.spawn),
                resume: us(s.resume),
                arm: us(e.arm),
                staging_alloc: us(e.staging_alloc),
                request_to_resume: us(s.request_to_resume),
            },
            reprotected_chunks: e.reprotected_chunks,
            copy_wait_us: us(self.copy_wait),
            total_us: us(self.total),
            engine: self.engine.as_ref().map(|m| {
                let h = &m.fault_latency;
                EngineJson {
                    copy_total_us: us(m.copy_total),
                    finish_us: us(m.finish),
                    unit_size: m.unit_size,
                    chunks_total: m.chunks_total,
                    chunks_by_workers: m.chunks_by_workers,
                    chunks_by_fault_path: m.chunks_by_fault_path,
                    chunks_by_hook: m.chunks_by_hook,
                    chunks_staged: m.chunks_staged,
                    direct_fault_writes: m.direct_fault_writes,
                    zero_chunks: m.zero_chunks,
                    chunks_from_parent: m.chunks_from_parent,
                    chunks_inherited: m.chunks_inherited,
                    tracking: m.tracking,
                    bytes_written: m.bytes_written,
                    wp_faults: m.wp_faults,
                    missing_faults: m.missing_faults,
                    fault_latency_us: LatencyJson {
                        count: h.count,
                        p50: h.p50_ns as f64 / 1e3,
                        p99: h.p99_ns as f64 / 1e3,
                        max: h.max_ns as f64 / 1e3,
                    },
                    staging_bytes: m.staging_bytes,
                    staging_peak_bytes: m.staging_peak_bytes,
                    direct_io: m.direct_io,
                }
            }),
            persist: self.persist.as_ref().map(|p| PersistJson {
                commit_us: us(p.commit),
                image_len: p.image_len,
                data_bytes: p.data_bytes,
                bytes_written: p.bytes_written,
                zero_chunks: p.zero_chunks,
                state_bytes: p.state_bytes,
            }),
        }
    }

    /// One human-readable line for the log.
    pub fn summary(&self) -> String {
        let s = &self.sync;
        let mut out = format!(
            "{} x{}: pause {:?} (pause {:?}, state {:?}, begin {:?} [write-protect {:?}, {} chunks armed-then-written], resume {:?}; armed beforehand in {:?}; request to resume {:?})",
            self.strategy,
            self.workers,
            s.total,
            s.pause,
            s.state_capture,
            s.begin,
            s.engine.write_protect,
            s.engine.reprotected_chunks,
            s.resume,
            s.engine.arm,
            s.request_to_resume,
        );
        if let Some(m) = &self.engine {
            out.push_str(&format!(
                "; written in {:?}: chunks {} (workers {}, fault path {} [staged {}, written directly {}], hooks {}, holes {}), {} bytes written, faults {} (p50 {} us, p99 {} us, max {} us), staging peak {} MiB of {} MiB",
                m.copy_total,
                m.chunks_total,
                m.chunks_by_workers,
                m.chunks_by_fault_path,
                m.chunks_staged,
                m.direct_fault_writes,
                m.chunks_by_hook,
                m.zero_chunks,
                m.bytes_written,
                m.faults(),
                m.fault_latency.p50_ns / 1000,
                m.fault_latency.p99_ns / 1000,
                m.fault_latency.max_ns / 1000,
                m.staging_peak_bytes >> 20,
                m.staging_bytes >> 20,
            ));
        }
        if let Some(p) = &self.persist {
            out.push_str(&format!(
                "; committed in {:?} ({} data bytes, {} holes); done {:?} after the request",
                p.commit, p.data_bytes, p.zero_chunks, self.total
            ));
        }
        out
    }
}
