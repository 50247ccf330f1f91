//! The staging pool: where the fault path puts a unit so the writer can go
//! on before the unit is on disk.
//!
//! A write fault on a unit not yet saved must wait until the unit's bytes
//! as of the fork instant are safe. Written straight to the image that is a
//! disk write of up to 2 MiB on the faulting vCPU's time; copied into a warm
//! slot it is one memcpy, and a worker writes the slot out later. So each
//! VM keeps a pool of `budget` bytes (`--snapshot-memory-budget`, default
//! [`DEFAULT_BUDGET`]), allocated and populated once — before the first
//! snapshot's pause — and kept: nothing is allocated on the fault path, and
//! the pool is the only memory a snapshot adds (DESIGN.md §2, "bounded
//! extra memory"). With every slot full the fault path writes the unit from
//! guest RAM itself (`Shared::save_units`), so a guest writing faster than
//! the disk slows down instead of growing the snapvm process.
//!
//! Invariants: a slot is owned by exactly one of the free list, one filler
//! (between `take_free` and `fill`/`give_back`), the filled queue, or one
//! drainer (between `take_filled` and `give_back`); the queues are sized to
//! the slot count when lent, so pushing never allocates.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Phase};
use crate::memory::Mapping;
use crate::region::CHUNK_SIZE;

/// The default staging budget: 256 MiB (128 chunks).
pub const DEFAULT_BUDGET: u64 = 256 << 20;

/// One VM's staging memory, shared by its successive snapshots' engines
/// (`Config::staging`), lent to one snapshot at a time.
#[derive(Debug)]
pub struct StagingPool {
    budget: u64,
    state: Mutex<PoolState>,
}

#[derive(Debug)]
enum PoolState {
    Unprepared,
    Ready(Mapping),
    Lent,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl StagingPool {
    /// A pool of `budget` bytes (rounded down to whole 2 MiB chunks),
    /// allocated on first use; 0 disables staging (every fault then
    /// writes its unit itself).
    pub fn new(budget: u64) -> StagingPool {
        StagingPool {
            budget: budget / CHUNK_SIZE * CHUNK_SIZE,
            state: Mutex::new(PoolState::Unprepared),
        }
    }

    /// Bytes the pool holds once prepared (at most this; capped at the
    /// guest's size by `prepare`).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes allocated now.
    pub fn resident_bytes(&self) -> u64 {
        match &*lock(&self.state) {
            PoolState::Ready(m) => m.len() as u64,
            _ => 0,
        }
    }

    /// Allocates and populates the pool the first time, at most `cap`
    /// bytes (a pool larger than the guest is never needed). Returns how
    /// long that took (zero when already prepared or lent). Call it with
    /// nothing protected: on a host where fresh memory is slow this takes
    /// a while, and the guest runs meanwhile.
    pub(crate) fn prepare(&self, cap: u64, fail: bool) -> Result<Duration, Error> {
        let mut st = lock(&self.state);
        if !matches!(*st, PoolState::Unprepared) {
            return Ok(Duration::ZERO);
        }
        let len = self.budget.min(cap / CHUNK_SIZE * CHUNK_SIZE);
        if len == 0 {
            return Ok(Duration::ZERO);
        }
        let t = Instant::now();
        let map = Mapping::new(len)?;
        if fail {
            return Err(Error::Memory {
                phase: Phase::Sync,
                op: "populate the staging pool (injected)",
                start: 0,
                len,
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        map.populate(0, len, Phase::Sync)?;
        *st = PoolState::Ready(map);
        Ok(t.elapsed())
    }

    /// The pool for one snapshot, cut into slots of `unit` bytes; None if
    /// it is not prepared (or empty) or lent already.
    pub(crate) fn lend(self: &Arc<Self>, unit: u64) -> Option<Staging> {
        let mut st = lock(&self.state);
        match std::mem::replace(&mut *st, PoolState::Lent) {
            PoolState::Ready(map) => Some(Staging::new(self.clone(), map, unit)),
            other => {
                *st = other;
                None
            }
        }
    }

    fn give_back(&self, map: Mapping) {
        *lock(&self.state) = PoolState::Ready(map);
    }
}

/// A slot holding a unit copied on the fault path, not yet written out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Filled {
    pub slot: usize,
    pub unit: usize,
}

#[derive(Debug)]
struct Slots {
    free: Vec<usize>,
    filled: VecDeque<Filled>,
}

/// One snapshot's loan of the pool; back to the pool when dropped.
#[derive(Debug)]
pub(crate) struct Staging {
    owner: Arc<StagingPool>,
    area: Option<Mapping>,
    unit: u64,
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
    fn new(owner: Arc<StagingPool>, area: Mapping, unit: u64) -> Staging {
        let slots = (area.len() as u64 / unit) as usize;
        Staging {
            owner,
            area: Some(area),
            unit,
            slots,
            state: Mutex::new(Slots {
                free: (0..slots).rev().collect(),
                filled: VecDeque::with_capacity(slots),
            }),
            in_use: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// A free slot, if any: the caller fills it and hands it back with
    /// `fill` or `give_back`.
    pub fn take_free(&self) -> Option<usize> {
        let slot = lock(&self.state).free.pop()?;
        let n = self.in_use.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(n, Ordering::Relaxed);
        Some(slot)
    }

    /// Start of `slot`'s `unit` bytes (only its current owner touches them).
    pub fn slot_ptr(&self, slot: usize) -> *mut u8 {
        debug_assert!(slot < self.slots);
        match &self.area {
            Some(a) => a.ptr(slot as u64 * self.unit),
            None => unreachable!("the area is only taken in drop"),
        }
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

    /// Bytes of the pool lent.
    pub fn bytes(&self) -> u64 {
        self.slots as u64 * self.unit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cycle_free_filled_free_and_are_lent_once() {
        let pool = Arc::new(StagingPool::new(2 * CHUNK_SIZE + 5));
        assert_eq!(pool.budget(), 2 * CHUNK_SIZE, "whole chunks");
        assert!(pool.lend(CHUNK_SIZE).is_none(), "not prepared yet");
        pool.prepare(u64::MAX, false).unwrap();
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
        pool.prepare(CHUNK_SIZE, false).unwrap();
        assert_eq!(pool.resident_bytes(), CHUNK_SIZE, "capped at the guest");
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
    fn zero_budget_and_a_failed_preparation_disable_staging() {
        let pool = Arc::new(StagingPool::new(0));
        pool.prepare(u64::MAX, false).unwrap();
        assert!(pool.lend(CHUNK_SIZE).is_none());
        let pool = Arc::new(StagingPool::new(CHUNK_SIZE));
        let e = pool.prepare(u64::MAX, true).unwrap_err();
        assert!(e.to_string().contains("staging pool"), "{e}");
        assert!(pool.lend(CHUNK_SIZE).is_none());
        assert_eq!(pool.resident_bytes(), 0);
    }
}
