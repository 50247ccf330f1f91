//! Warm landing slots for the fault path when the destination is cold.
//!
//! A write fault on an uncopied chunk waits for that chunk's copy. Into a
//! fresh destination the copy first has to populate 2 MiB of memory the
//! host has never backed, which on the nested hosts here faults in the
//! outer host 4 KiB at a time: fault p50 4.3–5.1 ms and p99 10–15 ms at
//! 8 GiB against 0.21–0.25 ms into warm memory (docs/BENCHMARKS.md,
//! 2026-12-02). The guest's first writes after the pause are such faults,
//! so on a first (cold) snapshot they were 20–50 ms of the guest's stall
//! across the pause.
//!
//! So each VM keeps a few chunks of populated memory (`StagingSlots`,
//! [`DEFAULT_STAGING_SLOTS`] × 2 MiB, populated when its first snapshot is
//! armed, then kept and lent to each snapshot in turn). On a cold destination the fault
//! path copies its chunk into a free slot — warm memory, no populate — and
//! releases the writer at once; a worker later populates the real
//! destination chunk and moves the slot's bytes there (`Shared::drain_one`),
//! which frees the slot for the next fault. The snapshot completes only
//! once every slot is drained. When all slots are full the fault path
//! copies directly, as before. A warm (prepared or kept) destination does
//! not use the slots: its chunks are already backed.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Phase};
use crate::memory::Mapping;
use crate::region::CHUNK_SIZE;

/// Slots kept by default: 32 MiB of memory per VM, enough for the guest's
/// first faults after the pause (2–10 chunks in the benchmarks) with room
/// while the workers drain.
pub const DEFAULT_STAGING_SLOTS: usize = 16;

/// The staging slots of one VM, shared by its successive snapshots' engines
/// (`Config::staging`): populated by the first `arm`, lent to one snapshot
/// at a time, kept mapped in between (memory kept mapped stays backed here;
/// freed memory goes back to the outer host and is cold again).
#[derive(Debug)]
pub struct StagingSlots {
    slots: usize,
    state: Mutex<AreaState>,
}

#[derive(Debug)]
enum AreaState {
    Unprepared,
    Ready(StagingArea),
    Lent,
}

impl Default for StagingSlots {
    fn default() -> StagingSlots {
        StagingSlots::new(DEFAULT_STAGING_SLOTS)
    }
}

impl StagingSlots {
    /// `slots` chunks' worth, prepared on first use; 0 disables staging.
    pub fn new(slots: usize) -> StagingSlots {
        StagingSlots {
            slots,
            state: Mutex::new(AreaState::Unprepared),
        }
    }

    fn lock(&self) -> MutexGuard<'_, AreaState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Populates the slots the first time (at most `max` of them). Without
    /// them snapshots still work, with slower first faults, so a failure
    /// is only logged.
    pub(crate) fn prepare(&self, max: usize) {
        let mut st = self.lock();
        if !matches!(*st, AreaState::Unprepared) || self.slots == 0 {
            return;
        }
        let slots = self.slots.min(max);
        let t = std::time::Instant::now();
        match StagingArea::prepare(slots) {
            Ok(a) => {
                tracing::debug!(slots, took = ?t.elapsed(), "fault-path staging slots ready");
                *st = AreaState::Ready(a);
            }
            Err(e) => tracing::warn!("fault-path staging slots unavailable: {e}"),
        }
    }

    /// The prepared slots for one snapshot, if ready and not lent already.
    pub(crate) fn lend(self: &Arc<Self>) -> Option<Staging> {
        let mut st = self.lock();
        match std::mem::replace(&mut *st, AreaState::Lent) {
            AreaState::Ready(area) => Some(Staging::new(self.clone(), area)),
            other => {
                *st = other;
                None
            }
        }
    }

    fn give_back(&self, area: StagingArea) {
        *self.lock() = AreaState::Ready(area);
    }
}

/// Populated memory for `slots` chunks.
#[derive(Debug)]
struct StagingArea {
    map: Mapping,
    slots: usize,
}

impl StagingArea {
    /// Maps and populates `slots` chunks now (slow on fresh memory: call it
    /// off the vCPU path).
    fn prepare(slots: usize) -> Result<StagingArea, Error> {
        let len = slots as u64 * CHUNK_SIZE;
        let map = Mapping::new(len)?;
        map.populate(0, len, Phase::Prepare)?;
        Ok(StagingArea { map, slots })
    }

    fn ptr(&self, slot: usize) -> *mut u8 {
        debug_assert!(slot < self.slots);
        self.map.ptr(slot as u64 * CHUNK_SIZE)
    }
}

/// A slot holding a chunk copied on the fault path, not yet moved to the
/// destination.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Filled {
    pub slot: usize,
    pub dest_offset: u64,
}

#[derive(Debug)]
struct SlotState {
    free: Vec<usize>,
    filled: Vec<Filled>,
}

/// One snapshot's loan of the VM's staging slots; back to the
/// `StagingSlots` when dropped.
#[derive(Debug)]
pub(crate) struct Staging {
    owner: Arc<StagingSlots>,
    area: Option<StagingArea>,
    state: Mutex<SlotState>,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(area) = self.area.take() {
            self.owner.give_back(area);
        }
    }
}

impl Staging {
    fn new(owner: Arc<StagingSlots>, area: StagingArea) -> Staging {
        let free = (0..area.slots).rev().collect();
        Staging {
            owner,
            area: Some(area),
            state: Mutex::new(SlotState {
                free,
                filled: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A free slot for the fault path, if any: the caller fills it and
    /// hands it back with `fill` or `give_back`.
    pub fn take_free(&self) -> Option<usize> {
        self.lock().free.pop()
    }

    /// Start of `slot`'s 2 MiB (only its taker writes it).
    pub fn slot_ptr(&self, slot: usize) -> *mut u8 {
        match &self.area {
            Some(a) => a.ptr(slot),
            None => unreachable!("the area is only taken in drop"),
        }
    }

    /// `slot` now holds the chunk for `dest_offset`.
    pub fn fill(&self, slot: usize, dest_offset: u64) {
        self.lock().filled.push(Filled { slot, dest_offset });
    }

    /// A slot taken and not filled (zero chunk, or a failed copy).
    pub fn give_back(&self, slot: usize) {
        self.lock().free.push(slot);
    }

    /// The oldest filled slot, for a drainer that moves it to the
    /// destination and then calls `give_back`.
    pub fn take_filled(&self) -> Option<Filled> {
        let mut s = self.lock();
        if s.filled.is_empty() {
            None
        } else {
            Some(s.filled.remove(0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cycle_free_filled_free_and_are_lent_once() {
        let slots = Arc::new(StagingSlots::new(2));
        assert!(slots.lend().is_none(), "not prepared yet");
        slots.prepare(16);
        let st = slots.lend().expect("prepared");
        assert!(slots.lend().is_none(), "lent to one snapshot at a time");
        let a = st.take_free().unwrap();
        let b = st.take_free().unwrap();
        assert_ne!(a, b);
        assert!(st.take_free().is_none(), "only two slots");
        st.fill(a, 4 * CHUNK_SIZE);
        st.give_back(b);
        let f = st.take_filled().unwrap();
        assert_eq!((f.slot, f.dest_offset), (a, 4 * CHUNK_SIZE));
        assert!(st.take_filled().is_none());
        st.give_back(f.slot);
        assert!(st.take_free().is_some() && st.take_free().is_some());
        drop(st);
        assert!(slots.lend().is_some(), "back after the snapshot");
    }

    #[test]
    fn slots_are_populated_writable_and_capped() {
        let slots = Arc::new(StagingSlots::new(8));
        slots.prepare(1);
        let st = slots.lend().expect("prepared");
        let p = st.take_free().expect("one slot");
        assert!(st.take_free().is_none(), "capped at the VM's chunk count");
        // SAFETY: the slot is CHUNK_SIZE bytes of the area, taken above.
        let s = unsafe { std::slice::from_raw_parts_mut(st.slot_ptr(p), CHUNK_SIZE as usize) };
        s[0] = 7;
        s[CHUNK_SIZE as usize - 1] = 9;
        assert_eq!((s[0], s[CHUNK_SIZE as usize - 1]), (7, 9));
    }

    #[test]
    fn zero_slots_disable_staging() {
        let slots = Arc::new(StagingSlots::new(0));
        slots.prepare(16);
        assert!(slots.lend().is_none());
    }
}
