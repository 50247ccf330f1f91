//! The async-fork snapshot engine (DESIGN.md §1–2). Knows nothing of KVM: it
//! works on host memory regions that back guest RAM, and is tested on plain
//! memory with threads standing in for vCPUs.
//!
//! ```text
//! VMM: pause vCPUs ─ engine.begin(regions) ─ resume vCPUs ─ ... ─ engine.wait() → Snapshot
//!                     (sync phase: register,   workers copy chunks; writes to
//!                      write-protect, table)   uncopied chunks copy first
//!      device writes into guest RAM: engine.before_write(gpa, len) first
//!      discards (MADV_DONTNEED):     engine.before_discard(gpa, len) first
//!      optional, off the vCPU path: engine.prepare_destination(bytes) (and/or
//!      Config::keep_destination) so the copy does not touch fresh memory
//!      persist:  persist::write_snapshot(&snapshot, vm_state, dir, opts, progress)
//!      restore:  SnapshotDir::open(dir) → vm_state() + map_region(i) (lazy MAP_PRIVATE)
//! ```
//!
//! `Strategy` picks async-fork (default) or a baseline (stop-the-world,
//! sync-wp) with the same `Snapshot` result; `fork` is the VMM's.

mod chunk_table;
pub mod cpus;
pub mod engine;
pub mod error;
mod eventfd;
mod fault_handler;
pub mod inject;
mod memory;
pub mod metrics;
pub mod persist;
pub mod priority;
pub mod recover;
pub mod region;
mod shared;
mod snapshot;
mod staging;
mod supervisor;
pub mod uffd;
mod worker;

pub use cpus::{CpuListError, CpuSet};
pub use engine::{Config, Engine, Strategy};
pub use error::{Error, Phase, UffdError};
pub use inject::FaultInjection;
pub use memory::{Pagemap, PrepareControl};
pub use metrics::{Metrics, Progress, SyncMetrics};
pub use persist::{write_snapshot, PersistError, SnapshotDir, WriteOptions, WriteProgress};
pub use priority::BackgroundPriority;
pub use region::{Region, CHUNK_SIZE, PAGE_SIZE};
pub use snapshot::Snapshot;
pub use staging::{StagingSlots, DEFAULT_STAGING_SLOTS};
