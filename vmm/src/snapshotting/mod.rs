//! Snapshots of a running VM (DESIGN.md §2). The VM's owner holds a
//! [`Snapshotter`]; [`Snapshotter::take`] runs the sync phase — the
//! snapshot's instant — and returns as soon as the guest runs again, with a
//! [`SnapshotHandle`] that follows the rest: guest RAM streaming into the
//! snapshot's `memory.img`, then the commit that makes it durable.
//!
//! | module | holds |
//! | --- | --- |
//! | `request` | [`SnapshotRequest`], [`SnapshotError`] |
//! | `snapshotter` | one snapshot in flight, the staging pool, the snapshot thread |
//! | `sync_phase` | arm, pause, capture, begin, resume, start the copy |
//! | `handle` | state, progress, cancel, wait |
//! | `metrics` | what a snapshot cost, `metrics.json` |
//! | `fork` | the fork baseline's child writer |
//! | `checksums` | test hooks comparing guest RAM and the image |
//! | `restore_cli` | `--restore` and `PUT /snapshot/load` |
//!
//! `--snapshot-at` and SIGUSR1 ask the owner for snapshots from
//! `crate::trigger`, a request source like the API.
//!
//! Invariants every snapshot keeps (DESIGN.md §2): its memory is guest
//! RAM at the instant of its pause, bit for bit; it adds at most its
//! staging budget (plus small tables) to snapvm's memory; `done` means
//! data and state fsync'd, the directory renamed into place and its parent
//! fsync'd. Any failure leaves the VM running and nothing at the target.

mod checksums;
mod fork;
mod handle;
mod metrics;
mod request;
pub mod restore_cli;
mod snapshotter;
mod sync_phase;

pub use checksums::snapshot_checksums;
pub use handle::{SnapshotHandle, SnapshotProgress, SnapshotState};
pub use metrics::{SnapshotMetrics, SyncPhase};
pub use request::{SnapshotError, SnapshotRequest};
pub use snapshotter::{copier_count, Snapshotter, METRICS_FILE};
