//! The owner's snapshots: taking one, the registry by id, status, cancel,
//! and the counters `GET /metrics` reports.

use std::time::Duration;

use super::{Entry, MetricsReport, Owner, OwnerError, Progress, SnapshotOrder, SnapshotStatus};
use crate::snapshotting::{copier_count, SnapshotHandle, SnapshotRequest, SnapshotState};

/// Totals over the snapshots that ended.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Counters {
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// The guest's stall in the sync phase of the latest snapshot.
    pub last_pause: Option<Duration>,
    pub wp_faults: u64,
    pub missing_faults: u64,
    pub bytes_written: u64,
    /// Staging memory the VM holds for snapshots (`--snapshot-pool`).
    pub staging_bytes: u64,
    /// Write faults that found the staging pool full and wrote their
    /// chunk to disk themselves (the guest waited for the disk).
    pub fault_disk_writes: u64,
    /// The most staging memory the latest snapshot held at once.
    pub last_staging_peak: u64,
}

impl Counters {
    /// Counts one finished snapshot.
    pub fn record(&mut self, state: &SnapshotState, cancelled: bool, h: &SnapshotHandle) {
        match state {
            SnapshotState::Done => self.done += 1,
            SnapshotState::Failed(_) if cancelled => self.cancelled += 1,
            _ => self.failed += 1,
        }
        if let Some(m) = &h.metrics().engine {
            self.wp_faults += m.wp_faults;
            self.missing_faults += m.missing_faults;
            self.bytes_written += m.bytes_written;
            self.fault_disk_writes += m.direct_fault_writes;
            self.last_staging_peak = m.staging_peak_bytes;
        }
    }
}

/// One progress line for a snapshot in flight.
pub(super) fn log_progress(h: &SnapshotHandle) {
    let p = h.progress();
    match p.state {
        SnapshotState::Copying => tracing::info!(
            "snapshot {}: copying {}/{} units, {} MiB written",
            h.dir().display(),
            p.chunks_done,
            p.chunks_total,
            p.bytes_written >> 20
        ),
        SnapshotState::Persisting => tracing::info!(
            "snapshot {}: persisting {} MiB",
            h.dir().display(),
            p.bytes_written >> 20
        ),
        _ => {}
    }
}

impl Owner {
    /// Takes a snapshot (returns once the guest runs again) and registers
    /// it; its id.
    pub(super) fn create(&mut self, order: &SnapshotOrder) -> Result<u64, OwnerError> {
        let dir = &order.dir;
        if !order.overwrite && std::fs::symlink_metadata(dir).is_ok() {
            return Err(OwnerError::Invalid(format!(
                "snapshot_path {} exists: pass \"overwrite\": true to replace it",
                dir.display()
            )));
        }
        match dir.parent() {
            Some(p) if p.is_dir() => {}
            _ => {
                return Err(OwnerError::Invalid(format!(
                    "snapshot_path {}: the parent directory does not exist",
                    dir.display()
                )))
            }
        }
        let vm = self.live_vm()?.0;
        let workers = order.workers.unwrap_or(self.defaults.workers);
        let req = SnapshotRequest {
            mode: order.mode,
            workers,
            overwrite: order.overwrite,
            priority: self.defaults.priority,
            memory_budget: order.memory_budget.unwrap_or(self.defaults.memory_budget),
            incremental: order.incremental,
            ..SnapshotRequest::new(dir.clone())
        };
        let req = test_hooks::apply(req);
        tracing::info!(
            "snapshot {}: {} with {workers} workers",
            dir.display(),
            order.mode
        );
        use crate::snapshotting::SnapshotError as E;
        match self.snapshotter.take(vm, req) {
            Ok(handle) => Ok(self.register(handle, order.mode, workers)),
            Err(e) => {
                tracing::error!(
                    "snapshot {} failed: {e}; the VM keeps running",
                    dir.display()
                );
                Err(match &e {
                    E::InProgress | E::Pause(_) | E::Conflict(_) => {
                        OwnerError::Conflict(e.to_string())
                    }
                    E::Invalid(_)
                    | E::Target(
                        snapvm_snapshot::PersistError::TargetExists(_)
                        | snapvm_snapshot::PersistError::TargetNotDirectory(_)
                        | snapvm_snapshot::PersistError::InvalidTarget(_),
                    ) => OwnerError::Invalid(e.to_string()),
                    _ => OwnerError::Failed(e.to_string()),
                })
            }
        }
    }

    fn register(
        &mut self,
        handle: SnapshotHandle,
        mode: snapvm_snapshot::Strategy,
        workers: usize,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let pause = handle.metrics().sync.total;
        if !pause.is_zero() {
            self.counters.last_pause = Some(pause);
        }
        self.snapshots.insert(
            id,
            Entry {
                handle,
                mode,
                workers: copier_count(mode, workers),
                cancelled: false,
                counted: false,
            },
        );
        id
    }

    pub(super) fn find(&self, id: &str) -> Result<u64, OwnerError> {
        id.parse::<u64>()
            .ok()
            .filter(|n| self.snapshots.contains_key(n))
            .ok_or_else(|| OwnerError::NotFound(format!("unknown snapshot id '{id}'")))
    }

    pub(super) fn status(&self, id: u64) -> SnapshotStatus {
        let Some(e) = self.snapshots.get(&id) else {
            // Only called with registered ids.
            return SnapshotStatus {
                id: id.to_string(),
                snapshot_path: String::new(),
                mode: String::new(),
                workers: 0,
                state: "failed".into(),
                reason: Some("unknown snapshot".into()),
                progress: Progress {
                    chunks_done: 0,
                    chunks_total: 0,
                    bytes_written: 0,
                    image_len: 0,
                },
                metrics: serde_json::Value::Null,
            };
        };
        let p = e.handle.progress();
        let reason = match &p.state {
            SnapshotState::Failed(why) => Some(why.clone()),
            _ => None,
        };
        SnapshotStatus {
            id: id.to_string(),
            snapshot_path: e.handle.dir().display().to_string(),
            mode: e.mode.to_string(),
            workers: e.workers as u64,
            state: p.state.name().to_string(),
            reason,
            progress: Progress {
                chunks_done: p.chunks_done as u64,
                chunks_total: p.chunks_total as u64,
                bytes_written: p.bytes_written,
                image_len: p.image_len,
            },
            metrics: e.handle.metrics().to_value(),
        }
    }

    /// Starts the cancel of snapshot `id`; its id (the answer waits for
    /// the rollback).
    pub(super) fn cancel(&mut self, id: &str) -> Result<u64, OwnerError> {
        let id = self.find(id)?;
        let Some(e) = self.snapshots.get_mut(&id) else {
            return Err(OwnerError::NotFound(format!("unknown snapshot id '{id}'")));
        };
        match e.handle.state() {
            SnapshotState::Copying => {}
            SnapshotState::Persisting => {
                return Err(OwnerError::Conflict(format!(
                    "snapshot {id} is persisting: too late to cancel"
                )))
            }
            SnapshotState::Done => {
                return Err(OwnerError::Conflict(format!(
                    "snapshot {id} is done: nothing to cancel"
                )))
            }
            SnapshotState::Failed(_) => {
                return Err(OwnerError::Conflict(format!(
                    "snapshot {id} has failed: nothing to cancel"
                )))
            }
        }
        match e.handle.cancel() {
            Ok(()) => {
                e.cancelled = true;
                tracing::info!("snapshot {} cancelled", e.handle.dir().display());
                Ok(id)
            }
            Err(err) => Err(OwnerError::Conflict(format!(
                "snapshot {id} cannot be cancelled now: {err}"
            ))),
        }
    }

    pub(super) fn metrics(&self) -> MetricsReport {
        let mut counters = self.counters.clone();
        counters.staging_bytes = self.snapshotter.staging_bytes();
        MetricsReport {
            vm_state: self.vm_state_name(),
            in_flight: self
                .snapshots
                .values()
                .filter(|e| !e.handle.state().is_finished())
                .count(),
            counters,
            memory_load: self.memory_load(),
            schedule: self.schedule_status(),
            tracking: self.tracking(),
        }
    }

    pub(super) fn tracking(&self) -> Option<super::Tracking> {
        self.snapshotter.dirty_chunks().map(|n| super::Tracking {
            dirty_chunks: n as u64,
            parent: self
                .snapshotter
                .incremental_parent()
                .map(|p| p.display().to_string()),
        })
    }
}

/// Test hooks read from the environment, for the end-to-end tests only.
///
/// `SNAPVM_TEST_HOLD_SNAPSHOT_COPY=1`: snapshots hold their background
/// writers until cancelled (only the fault path saves, on guest writes), so
/// a test can cancel a snapshot that is deterministically mid-copy instead
/// of racing a fast copy. Uses the engine's own fault-injection hook
/// ([`snapvm_snapshot::FaultInjection::hold_workers_until_fault_copies`]).
mod test_hooks {
    use crate::snapshotting::SnapshotRequest;

    pub const HOLD_COPY_ENV: &str = "SNAPVM_TEST_HOLD_SNAPSHOT_COPY";

    pub fn apply(mut req: SnapshotRequest) -> SnapshotRequest {
        if std::env::var_os(HOLD_COPY_ENV).is_some_and(|v| v == "1") {
            tracing::warn!("{HOLD_COPY_ENV}=1: snapshot writers are held until cancelled");
            req.injection.hold_workers_until_fault_copies = Some(u64::MAX);
        }
        req
    }
}
