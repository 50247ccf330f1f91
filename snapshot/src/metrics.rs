//! What a snapshot cost: sync-phase breakdown, copy totals, fault latencies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Time spent in `begin()` while the writers are paused.
#[derive(Debug, Clone, Default)]
pub struct SyncMetrics {
    /// UFFDIO_REGISTER (MISSING|WP) of every region.
    pub register: Duration,
    /// UFFDIO_WRITEPROTECT of every region (one call per region; one per
    /// 4 KiB page for sync-wp).
    pub write_protect: Duration,
    /// Chunk table allocation (O(chunks); O(pages) for sync-wp).
    pub table_init: Duration,
    /// Stop-the-world only: writing all memory inside `begin()`.
    pub copy: Duration,
    /// Starting the fault handler and supervisor threads.
    pub spawn: Duration,
    /// Everything `begin()` did, end to end.
    pub total: Duration,
    /// `arm()` (before the pause, writers running): register and
    /// write-protect every region. Not part of the pause.
    pub arm: Duration,
    /// Starting the VM's staging pool, the first time (it is populated on
    /// a thread of its own). Not part of the pause.
    pub staging_alloc: Duration,
    /// After `arm()`: chunks written between their protection and the
    /// pause, protected again in `begin()` (its `write_protect`).
    pub reprotected_chunks: u64,
}

/// Final numbers of a snapshot.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub sync: SyncMetrics,
    /// From the end of `begin()` until every unit was in the image.
    pub copy_total: Duration,
    /// Unregistering the regions at the end.
    pub finish: Duration,
    /// Copy unit in bytes: CHUNK_SIZE, or PAGE_SIZE for sync-wp. The
    /// `chunks_by_*` counters and `Progress` count these units.
    pub unit_size: u64,
    /// 2 MiB chunks in the snapshot.
    pub chunks_total: usize,
    pub chunks_by_workers: u64,
    pub chunks_by_fault_path: u64,
    pub chunks_by_hook: u64,
    /// Of the fault path's (and hooks') units, those copied into a staging
    /// slot and written out by a worker later.
    pub chunks_staged: u64,
    /// Of the fault path's (and hooks') units, those it wrote to the image
    /// itself because every staging slot was taken (or there is no pool).
    pub direct_fault_writes: u64,
    /// 2 MiB chunks that are holes in the image (no data at the fork).
    pub zero_chunks: u64,
    /// Chunks of a VM still loading from a snapshot that were not in guest
    /// RAM at the fork instant: copied from that snapshot's image.
    pub chunks_from_parent: u64,
    /// An incremental snapshot: chunks not written since the parent (not
    /// saved again).
    pub chunks_inherited: u64,
    /// After this snapshot, chunks left protected to track writes (0 when
    /// tracking is off).
    pub tracking: bool,
    /// Bytes written to the image.
    pub bytes_written: u64,
    /// Write faults on protected pages handled.
    pub wp_faults: u64,
    /// First-touch faults on never-populated pages handled.
    pub missing_faults: u64,
    /// Fault latency, from reading the event to waking the writer (a
    /// summary: a snapshot's metrics are kept for as long as the VM runs,
    /// and a full histogram is some 200 KiB).
    pub fault_latency: LatencySummary,
    /// Staging pool memory usable at the end of this snapshot (bytes; the
    /// first snapshot's pool fills while it runs).
    pub staging_bytes: u64,
    /// The most staging memory in use at once.
    pub staging_peak_bytes: u64,
    pub workers: usize,
    /// The image was written with O_DIRECT (false: through the page cache,
    /// where the file system refuses O_DIRECT).
    pub direct_io: bool,
}

impl Metrics {
    pub fn faults(&self) -> u64 {
        self.wp_faults + self.missing_faults
    }
}

/// Quantiles of a latency histogram, in ns (0 without samples).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        LatencySummary {
            count: h.len(),
            p50_ns: h.value_at_quantile(0.5),
            p99_ns: h.value_at_quantile(0.99),
            max_ns: h.max(),
        }
    }
}

/// Counters shared by the snapshot's threads.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub by_workers: AtomicU64,
    pub by_fault_path: AtomicU64,
    pub by_hook: AtomicU64,
    pub staged: AtomicU64,
    pub direct_fault_writes: AtomicU64,
    pub zero_units: AtomicU64,
    pub bytes_written: AtomicU64,
    pub from_parent: AtomicU64,
    pub inherited: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// A live view of a running snapshot, in copy units (2 MiB chunks; 4 KiB
/// pages for sync-wp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub chunks_done: usize,
    pub chunks_total: usize,
    /// Bytes written to the image so far.
    pub bytes_written: u64,
    /// The snapshot has failed or was cancelled and is rolling back.
    pub failed: bool,
}

/// The fault handler's own tallies, returned when it stops.
#[derive(Debug)]
pub(crate) struct HandlerStats {
    pub wp_faults: u64,
    pub missing_faults: u64,
    pub latency_ns: Histogram<u64>,
}

impl HandlerStats {
    pub fn new() -> HandlerStats {
        HandlerStats {
            wp_faults: 0,
            missing_faults: 0,
            latency_ns: new_histogram(),
        }
    }
}

/// 1 ns .. 60 s at 3 significant digits. Both constructors only fail for
/// invalid constant arguments; the auto-resizing one is the fallback.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3)
        .or_else(|_| Histogram::new(3))
        .unwrap_or_else(|e| unreachable!("hdrhistogram rejected constant bounds: {e}"))
}
