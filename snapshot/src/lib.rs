//! The async-fork snapshot engine (DESIGN.md §1–2). Knows nothing of KVM: it
//! works on host memory regions that back guest RAM, and is tested on plain
//! memory with threads standing in for vCPUs.
//!
//! ```text
//! VMM: w = SnapshotWriter::create(dir, regions)     (temp dir + memory.img)
//!      engine.arm(regions, w.image())                (guest runs: pool, protect)
//!      pause vCPUs ─ engine.begin(regions, image) ─ resume ─ engine.start_copy()
//!                    (the snapshot's instant)         workers write chunks from
//!                                                     guest RAM to memory.img;
//!                                                     writes to unsaved chunks
//!                                                     stage (or write) first
//!      device writes into guest RAM: engine.before_write(gpa, len) first
//!      discards (MADV_DONTNEED):     engine.before_discard(gpa, len) first
//!      engine.wait() → Snapshot (chunk checksums) ─ w.commit(&snapshot, vm_state)
//!                    (fsync, state.bin, rename into place, fsync the parent)
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
mod finished;
pub mod inject;
pub mod lazy;
mod memory;
pub mod metrics;
mod parent;
pub mod persist;
pub mod priority;
pub mod recover;
pub mod region;
pub mod save;
mod shared;
mod staging;
mod supervisor;
pub mod sync;
pub mod tracking;
pub mod uffd;
mod worker;
mod zero_fill;

pub use chunk_table::Record;
pub use cpus::{CpuListError, CpuSet};
pub use engine::{Config, Engine, Strategy};
pub use error::{Error, Phase, UffdError};
pub use finished::Snapshot;
pub use inject::FaultInjection;
pub use memory::Pagemap;
pub use metrics::{Metrics, Progress, SyncMetrics};
pub use persist::{ImageFile, PersistError, SnapshotDir, SnapshotWriter, WriteOptions};
pub use priority::BackgroundPriority;
pub use region::{Region, CHUNK_SIZE, PAGE_SIZE};
pub use staging::{StagingPool, DEFAULT_BUDGET};
