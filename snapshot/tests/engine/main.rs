//! The engine on plain memory: writer threads stand in for vCPUs.
//!
//! These tests need root and userfaultfd (as in CI). If the engine cannot be
//! created they FAIL with the reason: a skipped snapshot test hides a broken
//! machine.
//!
//! One file per concern: `exact.rs` (the bit-exact invariant per
//! strategy), `rollback.rs` (failures and cancellation), `refusals.rs`,
//! `discards.rs`, `arm.rs` (arming ahead of the pause) and `staging.rs`
//! (the staging pool for fault-path saves).

#[path = "../common/mod.rs"]
mod common;

mod arm;
mod discards;
mod exact;
mod refusals;
mod rollback;
mod staging;
