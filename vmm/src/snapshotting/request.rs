//! What a snapshot is asked to be, and why one could not be started.

use std::path::PathBuf;

use snapvm_snapshot::{BackgroundPriority, FaultInjection, PersistError, Strategy};

use crate::vmstate::VmStateError;

/// What to snapshot and how.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    /// Target directory (created atomically; see `overwrite`).
    pub dir: PathBuf,
    pub mode: Strategy,
    /// Background writer threads (async-fork) or writers in the pause
    /// (stop-the-world); sync-wp always uses one, fork one child process.
    pub workers: usize,
    /// Replace an existing snapshot directory atomically.
    pub overwrite: bool,
    /// Bytes of staging memory the fault path may use
    /// (`--snapshot-memory-budget`; snapshot/src/staging.rs): the most a
    /// snapshot adds to snapvm's memory. Allocated at the VM's first
    /// snapshot and kept.
    pub memory_budget: u64,
    /// Scheduling of the thread that commits the snapshot
    /// (`snapvm_snapshot::priority`). The engine's writers keep normal priority:
    /// a vCPU write fault can wait on them.
    pub priority: BackgroundPriority,
    /// Test hook: make the engine fail on purpose (rollback tests).
    pub injection: FaultInjection,
    /// Test hook: while the vCPUs are paused, checksum every 2 MiB chunk of
    /// guest RAM (O(memory) in the pause: for tests only), so the persisted
    /// image can be compared bit for bit
    /// ([`super::SnapshotHandle::sync_checksums`]).
    pub capture_checksums: bool,
    /// Only the chunks written since this VM's last snapshot (which must
    /// be an async-fork one taken by this snapvm, with writes tracked
    /// since, and still be in place): `snapshot_type: "Diff"`.
    pub incremental: bool,
}

impl SnapshotRequest {
    /// Async-fork with two workers into `dir`, no overwrite, the default
    /// budget.
    pub fn new(dir: impl Into<PathBuf>) -> SnapshotRequest {
        SnapshotRequest {
            dir: dir.into(),
            mode: Strategy::AsyncFork,
            workers: 2,
            overwrite: false,
            memory_budget: snapvm_snapshot::DEFAULT_BUDGET,
            priority: BackgroundPriority::default(),
            injection: FaultInjection::default(),
            capture_checksums: false,
            incremental: false,
        }
    }
}

/// Why a snapshot could not be started (the VM keeps running, untouched).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot in progress")]
    InProgress,
    #[error("invalid snapshot request: {0}")]
    Invalid(String),
    /// Not now, in this VM's state (e.g. a mode its loading memory
    /// cannot take yet).
    #[error("{0}")]
    Conflict(String),
    /// The snapshot directory cannot be made (it exists, no parent, no
    /// space, no permission).
    #[error("cannot create the snapshot directory: {0}")]
    Target(PersistError),
    #[error("cannot pause the VM for a snapshot: {0}")]
    Pause(#[from] crate::component::PauseFailed),
    #[error("cannot capture the VM state: {0}")]
    State(#[from] VmStateError),
    #[error("snapshot engine: {0}")]
    Engine(#[from] snapvm_snapshot::Error),
    #[error("cannot start the snapshot thread: {0}")]
    Spawn(std::io::Error),
    #[error("snapshot failed: {0}")]
    Failed(String),
}
