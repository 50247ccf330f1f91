//! What an engine is asked to do: the strategy (async-fork or one of the
//! baselines) and its configuration.

use std::sync::Arc;

use super::ARM_STEP;
use crate::cpus::CpuSet;
use crate::inject::FaultInjection;
use crate::lazy::Loader;
use crate::persist::ChunkEntry;
use crate::staging::{StagingPool, DEFAULT_BUDGET};
use crate::tracking::TrackerSlot;

/// How a snapshot is taken (DESIGN.md §2: the baselines live beside the
/// real thing). All engine strategies return the same `Snapshot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Write-protect per region (one PMD bit per 2 MiB chunk with THP),
    /// copy in the background, copy-first on write, chunk granularity.
    #[default]
    AsyncFork,
    /// Baseline (Firecracker, Cloud Hypervisor): `begin()` writes every
    /// populated page to the image itself, with `workers` threads, while
    /// the caller keeps the vCPUs paused; no protection at all. `wait()`
    /// returns at once.
    StopTheWorld,
    /// Baseline (QEMU background-snapshot): `begin()` write-protects every
    /// 4 KiB page with its own UFFDIO_WRITEPROTECT (cost grows with memory,
    /// and splits THP mappings), then one copier walks pages in order
    /// (writing each chunk's unclaimed pages together); a write fault saves
    /// just its 4 KiB page. `workers` is ignored (1).
    SyncWp,
    /// Baseline: the VMM process forks and the child writes memory. Needs
    /// process-level fork, so it is wired in the VMM, not here:
    /// `Engine::new` refuses it.
    Fork,
}

impl Strategy {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::AsyncFork => "async-fork",
            Strategy::StopTheWorld => "stop-the-world",
            Strategy::SyncWp => "sync-wp",
            Strategy::Fork => "fork",
        }
    }

    /// Whether its snapshots save write faults through the VM's staging
    /// pool: the write-protecting modes. The others never use the pool, so
    /// a VM snapshotting only with them never needs one.
    pub fn stages(self) -> bool {
        matches!(self, Strategy::AsyncFork | Strategy::SyncWp)
    }

    /// Parses `name()` back.
    pub fn from_name(s: &str) -> Option<Strategy> {
        [
            Strategy::AsyncFork,
            Strategy::StopTheWorld,
            Strategy::SyncWp,
            Strategy::Fork,
        ]
        .into_iter()
        .find(|x| x.name() == s)
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Engine configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Background copier threads (≥ 1).
    pub workers: usize,
    pub strategy: Strategy,
    pub injection: FaultInjection,
    /// Bytes write-protected per step when armed ahead of the pause
    /// ([`ARM_STEP`] by default; tests use small steps so that small
    /// regions take several).
    pub arm_step: u64,
    /// The VM's staging pool (staging.rs): where the fault path puts a
    /// unit before it is written. Populated by the first `arm`; share one
    /// between a VM's successive engines so it is allocated once.
    /// `StagingPool::new(0)` disables staging.
    pub staging: Arc<StagingPool>,
    /// Host CPUs for the supervisor and the copiers (cpus.rs says why);
    /// None leaves them wherever the scheduler puts them. A failure to pin
    /// only costs the placement (logged).
    pub background_cpus: Option<CpuSet>,
    /// The VM's memory is still loading from a snapshot (lazy restore):
    /// the engine shares the loader's userfaultfd and copies chunks not
    /// yet loaded at its instant from that snapshot's image (lazy/mod.rs).
    /// Async-fork only; ignored once the load is over.
    pub lazy: Option<Arc<Loader>>,
    /// Guest RAM is hugetlbfs: a first touch is resolved a whole huge page
    /// at a time, and sync-wp (which protects 4 KiB pages) is refused.
    pub hugetlb: bool,
    /// Guest RAM is THP-advised: a first touch of an empty chunk gets a
    /// whole zeroed huge page, as the kernel would give it (zero_fill.rs).
    pub thp: bool,
    /// Track writes after this snapshot (async-fork): at its end guest RAM
    /// stays registered and protected and a `DirtyTracker` goes into the
    /// slot; a tracker already there (from the last snapshot) is taken
    /// over, so only the chunks written since are protected again.
    pub track: Option<Arc<TrackerSlot>>,
    /// An incremental snapshot: the parent's chunk entries. Chunks not
    /// written since the parent are not saved again (`Record::Inherited`).
    /// Needs the slot's tracker to have run since the parent.
    pub diff_base: Option<Arc<Vec<ChunkEntry>>>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            workers: 2,
            strategy: Strategy::AsyncFork,
            injection: FaultInjection::default(),
            arm_step: ARM_STEP,
            staging: Arc::new(StagingPool::new(DEFAULT_BUDGET)),
            background_cpus: None,
            lazy: None,
            hugetlb: false,
            thp: false,
            track: None,
            diff_base: None,
        }
    }
}
