//! Test hooks read from the environment, for the end-to-end tests only.
//!
//! `SNAPVM_TEST_HOLD_SNAPSHOT_COPY=1`: API snapshots hold their background
//! copiers until cancelled (only the fault path copies, on guest writes),
//! so a test can cancel a snapshot that is deterministically mid-copy
//! instead of racing a fast copy. Uses the engine's own fault-injection
//! hook ([`snapshot::FaultInjection::hold_workers_until_fault_copies`]).

use crate::snapshotting::SnapshotRequest;

pub const HOLD_COPY_ENV: &str = "SNAPVM_TEST_HOLD_SNAPSHOT_COPY";

pub fn apply(mut req: SnapshotRequest) -> SnapshotRequest {
    if std::env::var_os(HOLD_COPY_ENV).is_some_and(|v| v == "1") {
        tracing::warn!("{HOLD_COPY_ENV}=1: snapshot copiers are held until cancelled");
        req.injection.hold_workers_until_fault_copies = Some(u64::MAX);
    }
    req
}
