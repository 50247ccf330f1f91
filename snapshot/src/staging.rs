//! The staging pool: where the fault path puts a unit so the writer can go
//! on before the unit is on disk.
//!
//! A write fault on a unit not yet saved must wait until the unit's bytes
//! as of the fork instant are safe. Written straight to the image that is a
//! disk write of up to 2 MiB on the faulting vCPU's time; copied into a warm
//! slot it is one memcpy, and a worker writes the slot out later. So each
//! VM keeps a pool of `budget` bytes (`--snapshot-memory-budget`, default
//! [`DEFAULT_BUDGET`]), allocated once and kept — by default as soon as the
//! VM runs ([`StagingPool::prepare`], `--snapshot-pool at-start`), else at its
//! first snapshot: nothing is allocated on the fault path, and the pool is
//! the only memory snapshots add (DESIGN.md §2, "bounded extra memory").
//!
//! Why at start: a pool first populated during a snapshot has few slots
//! ready while the guest faults (fresh memory is slow on some hosts), so
//! most faults of that snapshot wait for a disk write, and the population
//! takes a core meanwhile. Measured on a KV guest under open-loop load:
//! worst latency 7 ms warm vs 60 ms cold
//! (docs/journal/2026-12-05-cold-staging-pool.md). With every slot taken the
//! fault path writes the unit from guest RAM itself
//! (`Shared::save_for_fault`), so a guest writing faster than the disk
//! slows down instead of growing the snapvm process.
//!
//! Without `prepare`, the pool is mapped by the first `arm` and populated by
//! a thread of its own, one chunk at a time; each chunk becomes usable as
//! soon as it is populated. So the first snapshot's pause does not wait for the pool
//! (populating fresh memory is slow on some hosts: docs/journal/), and its
//! faults write directly until slots are ready — but for the first
//! [`PRIMED_CHUNKS`], populated by `arm` itself (the guest runs meanwhile),
//! so the writes a guest makes right after the pause find a slot. The filler starts
//! only once the snapshot's workers have started (`Staging::start_filling`):
//! creating a thread takes mmap_lock for writing, and queued behind a
//! populate (which holds it for reading for milliseconds on slow memory)
//! it would hold up every vCPU page fault behind it.
//!
//! Invariants: a slot is owned by exactly one of: not yet populated, the
//! free list, one filler (between `take_free` and `fill`/`give_back`), the
//! filled queue, or one drainer (between `take_filled` and `give_back`).
//! The queues are sized to the slot count when lent, so pushing never
//! allocates.

use crate::sync::lock;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Phase};
use crate::memory::Mapping;
use crate::region::CHUNK_SIZE;

/// The default staging budget: 256 MiB (128 chunks).
pub const DEFAULT_BUDGET: u64 = 256 << 20;

/// Chunks of a new pool populated before the first pause (`reserve`): the
/// guest's first writes after its first pause hit unsaved chunks, and each
/// that finds no slot waits for a 2 MiB disk write, which triples a first
/// snapshot's stall across the pause (docs/journal/2026-12-02-staging-slots.md).
pub const PRIMED_CHUNKS: usize = 8;

/// One VM's staging memory, shared by its successive snapshots' engines
/// (`Config::staging`), lent to one snapshot at a time.
#[derive(Debug)]
pub struct StagingPool {
    budget: u64,
    state: Mutex<PoolState>,
}

#[derive(Debug)]
enum PoolState {
    /// Never started, or its last population failed before any chunk.
    Empty,
    Ready(Arc<Area>),
    /// Lent to a snapshot (the loan holds the area too).
    Lent(Arc<Area>),
}

/// The pool's memory and how much of it is populated.
#[derive(Debug)]
struct Area {
    map: Mapping,
    /// Chunks the mapping holds.
    chunks: usize,
    /// Chunks populated so far (usable).
    ready: AtomicUsize,
    /// The filler has been started.
    started: AtomicBool,
    /// The filler has stopped (done, failed, or told to stop).
    done: AtomicBool,
    /// Set when the pool goes away: the filler stops.
    stop: AtomicBool,
    /// Test hook: the population fails (ENOMEM).
    fail: bool,
}

impl Area {
    /// Starts the filler thread, once. A thread that cannot be had leaves
    /// the pool empty (logged; faults then write directly).
    fn start_filling(self: &Arc<Area>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let a = self.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("snap-pool".into())
            .spawn(move || fill(&a))
        {
            tracing::warn!("snapshot staging pool unavailable (cannot start its thread: {e})");
            self.done.store(true, Ordering::Release);
        }
    }
}

impl Drop for StagingPool {
    fn drop(&mut self) {
        if let PoolState::Ready(a) | PoolState::Lent(a) = &*lock(&self.state) {
            a.stop.store(true, Ordering::Release);
        }
    }
}

impl StagingPool {
    /// A pool of `budget` bytes (rounded down to whole 2 MiB chunks),
    /// allocated on first use; 0 disables staging (every fault then
    /// writes its unit itself).
    pub fn new(budget: u64) -> StagingPool {
        StagingPool {
            budget: budget / CHUNK_SIZE * CHUNK_SIZE,
            state: Mutex::new(PoolState::Empty),
        }
    }

    /// Bytes the pool holds once populated (at most this; capped at the
    /// guest's size by `start`).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes populated now.
    pub fn resident_bytes(&self) -> u64 {
        match &*lock(&self.state) {
            PoolState::Ready(a) | PoolState::Lent(a) => {
                a.ready.load(Ordering::Acquire) as u64 * CHUNK_SIZE
            }
            PoolState::Empty => 0,
        }
    }

    /// Maps the pool the first time, at most `cap` bytes (a pool larger
    /// than the guest is never needed), and populates its first
    /// [`PRIMED_CHUNKS`] now; the rest is populated once a snapshot's
    /// workers run (`Staging::start_filling`), or by `fill_now`. `fail`:
    /// make the population fail (ENOMEM, a test hook). Returns whether it
    /// was mapped now. An error (no address space) leaves the pool empty,
    /// to be tried again by the next snapshot.
    pub(crate) fn reserve(&self, cap: u64, fail: bool) -> Result<bool, Error> {
        self.map(cap, fail, PRIMED_CHUNKS)
    }

    /// `reserve` with `prime` chunks populated on the calling thread.
    fn map(&self, cap: u64, fail: bool, prime: usize) -> Result<bool, Error> {
        let mut st = lock(&self.state);
        if !matches!(*st, PoolState::Empty) {
            return Ok(false);
        }
        let len = self.budget.min(cap / CHUNK_SIZE * CHUNK_SIZE);
        if len == 0 {
            return Ok(false);
        }
        let area = Arc::new(Area {
            map: Mapping::new(len)?,
            chunks: (len / CHUNK_SIZE) as usize,
            ready: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            done: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            fail,
        });
        if !populate(&area, prime.min(area.chunks)) {
            area.done.store(true, Ordering::Release);
        }
        *st = PoolState::Ready(area);
        Ok(true)
    }

    /// Maps the pool (at most `cap` bytes) if it is not yet, and starts
    /// populating all of it now on its own thread, before any snapshot
    /// needs it (`--snapshot-pool at-start`). An error (no address space)
    /// leaves the pool to the first snapshot.
    pub fn prepare(&self, cap: u64) -> Result<(), Error> {
        // No priming here: the caller (the VM's owner) should not wait for
        // fresh memory; the filler populates every chunk.
        self.map(cap, false, 0)?;
        self.fill_now();
        Ok(())
    }

    /// Starts populating a reserved pool now (tests, and a VM that wants
    /// its pool before its first snapshot).
    pub fn fill_now(&self) {
        if let PoolState::Ready(a) | PoolState::Lent(a) = &*lock(&self.state) {
            a.start_filling();
        }
    }

    /// Waits until the population has stopped (every chunk ready, or it
    /// failed), at most `timeout`; returns the bytes ready. Does not start
    /// it.
    pub fn wait_filled(&self, timeout: Duration) -> u64 {
        let area = match &*lock(&self.state) {
            PoolState::Ready(a) | PoolState::Lent(a) => a.clone(),
            PoolState::Empty => return 0,
        };
        let deadline = Instant::now() + timeout;
        while area.started.load(Ordering::Acquire)
            && !area.done.load(Ordering::Acquire)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        area.ready.load(Ordering::Acquire) as u64 * CHUNK_SIZE
    }

    /// The pool for one snapshot, cut into slots of `unit` bytes; None if
    /// it has no memory or is lent already.
    pub(crate) fn lend(self: &Arc<Self>, unit: u64) -> Option<Staging> {
        let mut st = lock(&self.state);
        match &*st {
            PoolState::Ready(area) => {
                let area = area.clone();
                *st = PoolState::Lent(area.clone());
                Some(Staging::new(self.clone(), area, unit))
            }
            PoolState::Empty | PoolState::Lent(_) => None,
        }
    }

    fn give_back(&self, area: Arc<Area>) {
        let mut st = lock(&self.state);
        // A population that failed before its first chunk is retried.
        *st = if area.done.load(Ordering::Acquire) && area.ready.load(Ordering::Acquire) == 0 {
            PoolState::Empty
        } else {
            PoolState::Ready(area)
        };
    }
}

/// The filler thread: populates the rest of the area chunk by chunk.
fn fill(area: &Area) {
    let t = Instant::now();
    populate(area, area.chunks);
    tracing::info!(
        "snapshot staging pool ready: {} MiB in {:.2} s",
        (area.ready.load(Ordering::Acquire) as u64 * CHUNK_SIZE) >> 20,
        t.elapsed().as_secs_f64()
    );
    area.done.store(true, Ordering::Release);
}

/// Populates chunks from the first not ready up to `until`, publishing
/// each as it is done; false if it failed (logged) or was told to stop.
fn populate(area: &Area, until: usize) -> bool {
    for c in area.ready.load(Ordering::Acquire)..until {
        if area.stop.load(Ordering::Acquire) {
            return false;
        }
        let res = if area.fail {
            Err(Error::Memory {
                phase: Phase::Sync,
                op: "populate the staging pool (injected)",
                start: 0,
                len: CHUNK_SIZE,
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            })
        } else {
            area.map
                .populate(c as u64 * CHUNK_SIZE, CHUNK_SIZE, Phase::Sync)
        };
        if let Err(e) = res {
            tracing::warn!(
                "snapshot staging pool unavailable past {} MiB ({e}): write faults during snapshots will wait for the disk",
                (c as u64 * CHUNK_SIZE) >> 20
            );
            return false;
        }
        area.ready.store(c + 1, Ordering::Release);
    }
    true
}

/// A slot holding a unit copied on the fault path, not yet written out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Filled {
    pub slot: usize,
    pub unit: usize,
}

#[derive(Debug)]
struct Slots {
    /// Slots handed back, ready for reuse.
    free: Vec<usize>,
    /// Populated slots never handed out yet start at this one.
    fresh: usize,
    filled: VecDeque<Filled>,
}

/// One snapshot's loan of the pool; back to the pool when dropped.
#[derive(Debug)]
pub(crate) struct Staging {
    owner: Arc<StagingPool>,
    area: Option<Arc<Area>>,
    unit: u64,
    /// Slots of `unit` bytes per pool chunk.
    per_chunk: usize,
    slots: usize,
    state: Mutex<Slots>,
    in_use: AtomicUsize,
    peak: AtomicUsize,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(area) = self.area.take() {
            self.owner.give_back(area);
        }
    }
}

impl Staging {
    fn new(owner: Arc<StagingPool>, area: Arc<Area>, unit: u64) -> Staging {
        let per_chunk = (CHUNK_SIZE / unit) as usize;
        let slots = area.chunks * per_chunk;
        Staging {
            owner,
            area: Some(area),
            unit,
            per_chunk,
            slots,
            state: Mutex::new(Slots {
                free: Vec::with_capacity(slots),
                fresh: 0,
                filled: VecDeque::with_capacity(slots),
            }),
            in_use: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    fn area(&self) -> &Arc<Area> {
        match &self.area {
            Some(a) => a,
            None => unreachable!("the area is only taken in drop"),
        }
    }

    /// Starts populating the pool if nobody has (the first snapshot's
    /// supervisor calls it once its workers have started; module docs).
    pub fn start_filling(&self) {
        self.area().start_filling();
    }

    /// A free populated slot, if any: the caller fills it and hands it back
    /// with `fill` or `give_back`.
    pub fn take_free(&self) -> Option<usize> {
        let slot = {
            let mut s = lock(&self.state);
            match s.free.pop() {
                Some(slot) => slot,
                None => {
                    let ready = self.area().ready.load(Ordering::Acquire) * self.per_chunk;
                    if s.fresh >= ready {
                        return None;
                    }
                    s.fresh += 1;
                    s.fresh - 1
                }
            }
        };
        let n = self.in_use.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(n, Ordering::Relaxed);
        Some(slot)
    }

    /// Start of `slot`'s `unit` bytes (only its current owner touches them).
    pub fn slot_ptr(&self, slot: usize) -> *mut u8 {
        debug_assert!(slot < self.slots);
        self.area().map.ptr(slot as u64 * self.unit)
    }

    /// `slot` now holds unit `unit`, for a worker to write out.
    pub fn fill(&self, slot: usize, unit: usize) {
        lock(&self.state).filled.push_back(Filled { slot, unit });
    }

    /// A slot back on the free list (written out, or not needed).
    pub fn give_back(&self, slot: usize) {
        lock(&self.state).free.push(slot);
        self.in_use.fetch_sub(1, Ordering::Relaxed);
    }

    /// The oldest filled slot, for a worker that writes it out and then
    /// calls `give_back`.
    pub fn take_filled(&self) -> Option<Filled> {
        lock(&self.state).filled.pop_front()
    }

    /// The most bytes held in slots at once during this loan.
    pub fn peak_bytes(&self) -> u64 {
        self.peak.load(Ordering::Relaxed) as u64 * self.unit
    }

    /// Bytes of the pool populated (usable) now.
    pub fn bytes(&self) -> u64 {
        self.area().ready.load(Ordering::Acquire) as u64 * CHUNK_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(30);

    #[test]
    fn slots_cycle_free_filled_free_and_are_lent_once() {
        let pool = Arc::new(StagingPool::new(2 * CHUNK_SIZE + 5));
        assert_eq!(pool.budget(), 2 * CHUNK_SIZE, "whole chunks");
        assert!(pool.lend(CHUNK_SIZE).is_none(), "not started yet");
        assert!(pool.reserve(u64::MAX, false).unwrap());
        assert!(!pool.reserve(u64::MAX, false).unwrap(), "reserved once");
        assert_eq!(
            pool.wait_filled(LONG),
            2 * CHUNK_SIZE,
            "both primed (the filler has not started)"
        );
        pool.fill_now();
        assert_eq!(pool.wait_filled(LONG), 2 * CHUNK_SIZE);
        assert_eq!(pool.resident_bytes(), 2 * CHUNK_SIZE);
        let st = pool.lend(CHUNK_SIZE).expect("prepared");
        assert!(
            pool.lend(CHUNK_SIZE).is_none(),
            "lent to one snapshot at a time"
        );
        let a = st.take_free().unwrap();
        let b = st.take_free().unwrap();
        assert_ne!(a, b);
        assert!(st.take_free().is_none(), "only two slots");
        assert_eq!(st.peak_bytes(), 2 * CHUNK_SIZE);
        st.fill(a, 4);
        st.give_back(b);
        let f = st.take_filled().unwrap();
        assert_eq!((f.slot, f.unit), (a, 4));
        assert!(st.take_filled().is_none());
        st.give_back(f.slot);
        assert!(st.take_free().is_some() && st.take_free().is_some());
        drop(st);
        assert!(pool.lend(CHUNK_SIZE).is_some(), "back after the snapshot");
    }

    #[test]
    fn page_units_cut_the_same_pool_finer_and_the_pool_is_capped() {
        let pool = Arc::new(StagingPool::new(8 * CHUNK_SIZE));
        pool.reserve(CHUNK_SIZE, false).unwrap();
        pool.fill_now();
        assert_eq!(pool.wait_filled(LONG), CHUNK_SIZE, "capped at the guest");
        let st = pool.lend(4096).expect("prepared");
        let mut n = 0;
        while let Some(s) = st.take_free() {
            // SAFETY: the slot is 4096 bytes of the area, taken above.
            unsafe { st.slot_ptr(s).write_bytes(7, 4096) };
            n += 1;
        }
        assert_eq!(n, 512);
        assert_eq!(st.bytes(), CHUNK_SIZE);
    }

    #[test]
    fn a_large_pool_is_primed_then_filled() {
        let pool = Arc::new(StagingPool::new(12 * CHUNK_SIZE));
        pool.reserve(u64::MAX, false).unwrap();
        assert_eq!(pool.resident_bytes(), PRIMED_CHUNKS as u64 * CHUNK_SIZE);
        let st = pool.lend(CHUNK_SIZE).expect("lent");
        st.start_filling();
        drop(st);
        assert_eq!(pool.wait_filled(LONG), 12 * CHUNK_SIZE);
    }

    #[test]
    fn a_prepared_pool_is_populated_before_any_snapshot_and_lent_whole() {
        let pool = Arc::new(StagingPool::new(6 * CHUNK_SIZE));
        pool.prepare(4 * CHUNK_SIZE).unwrap();
        assert_eq!(
            pool.wait_filled(LONG),
            4 * CHUNK_SIZE,
            "capped at the guest"
        );
        assert_eq!(pool.resident_bytes(), 4 * CHUNK_SIZE);
        // The first snapshot's reserve finds it mapped and primes nothing.
        assert!(!pool.reserve(u64::MAX, false).unwrap());
        let st = pool.lend(CHUNK_SIZE).unwrap();
        let slots: Vec<_> = std::iter::from_fn(|| st.take_free()).collect();
        assert_eq!(slots, vec![0, 1, 2, 3]);
    }

    #[test]
    fn zero_budget_and_a_failed_population_disable_staging_until_retried() {
        let pool = Arc::new(StagingPool::new(0));
        pool.reserve(u64::MAX, false).unwrap();
        assert!(pool.lend(CHUNK_SIZE).is_none());
        let pool = Arc::new(StagingPool::new(CHUNK_SIZE));
        pool.reserve(u64::MAX, true).unwrap();
        assert_eq!(pool.wait_filled(LONG), 0);
        let st = pool.lend(CHUNK_SIZE).expect("lent, empty");
        assert!(st.take_free().is_none(), "no slot ready");
        drop(st);
        // The next snapshot tries again.
        assert!(pool.reserve(u64::MAX, false).unwrap());
        pool.fill_now();
        assert_eq!(pool.wait_filled(LONG), CHUNK_SIZE);
    }
}
