//! One atomic state per copy unit (a 2 MiB chunk; a 4 KiB page for the
//! sync-wp baseline): the hypervisor's "PMD R/W bit".
//!
//! `Protected → Copying → Copied`, or `Copying → Failed`. The CAS from
//! Protected to Copying is the claim: exactly one thread (a worker, the fault
//! handler or a `before_write` hook) saves a unit; others wait for it.
//! `Copied` means the unit's bytes as of the fork instant are safe — written
//! to the image or held in a staging slot — and its protection is gone.
//! A high `WAITER` bit tells the copier that the fault handler parked a fault
//! on this unit and wants a nudge when it settles (the handler never blocks
//! on another thread, see fault_handler.rs).
//!
//! Beside the state, each unit gets a [`Record`] once its bytes are in the
//! image: a hole, or data with its crc32c. A staged unit is `Copied` before
//! it is recorded (a worker writes it out later); the snapshot completes
//! only when every unit is recorded.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

const PROTECTED: u8 = 0;
const COPYING: u8 = 1;
const COPIED: u8 = 2;
const FAILED: u8 = 3;
const WAITER: u8 = 0x80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    Protected,
    Copying,
    Copied,
    Failed,
}

fn decode(v: u8) -> ChunkState {
    match v & !WAITER {
        PROTECTED => ChunkState::Protected,
        COPYING => ChunkState::Copying,
        COPIED => ChunkState::Copied,
        _ => ChunkState::Failed,
    }
}

/// What the image holds for a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// No populated page, or only zero bytes: a hole in memory.img.
    Zero,
    /// Written; crc32c of the unit's bytes (zero where no page was
    /// populated).
    Data(u32),
    /// Not written: an incremental snapshot's parent chain holds these
    /// bytes (with this crc32c) — the guest did not write the chunk since.
    Inherited(u32),
}

const REC_NONE: u64 = 0;
const REC_ZERO: u64 = 1 << 32;
const REC_DATA: u64 = 2 << 32;
const REC_INHERITED: u64 = 3 << 32;

/// Who copied a chunk (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copier {
    Worker,
    FaultPath,
    Hook,
}

#[derive(Debug)]
pub struct ChunkTable {
    states: Box<[AtomicU8]>,
    /// What the image holds for each unit (`REC_*`, crc in the low bits).
    records: Box<[AtomicU64]>,
    /// Workers' claim cursor: units (or, with `next_chunk`, chunks) below
    /// it were offered to a worker.
    cursor: AtomicUsize,
    settled: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

impl ChunkTable {
    /// O(chunks): zeroed allocations (all Protected).
    pub fn new(chunks: usize) -> ChunkTable {
        ChunkTable {
            states: (0..chunks).map(|_| AtomicU8::new(PROTECTED)).collect(),
            records: (0..chunks).map(|_| AtomicU64::new(REC_NONE)).collect(),
            cursor: AtomicUsize::new(0),
            settled: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn state(&self, i: usize) -> ChunkState {
        decode(self.states[i].load(Ordering::Acquire))
    }

    /// Claims chunk `i` for copying; true if this caller must copy it.
    pub fn try_claim(&self, i: usize) -> bool {
        self.states[i]
            .compare_exchange(PROTECTED, COPYING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Next chunk for a worker that saves a chunk's units together
    /// (`per` units per chunk, `len() / per` chunks), in address order.
    /// Each chunk is offered to one worker only; its units may already be
    /// claimed by the fault path.
    pub fn next_chunk(&self, per: usize) -> Option<usize> {
        let c = self.cursor.fetch_add(1, Ordering::Relaxed);
        (c < self.len() / per).then_some(c)
    }

    /// Records what the image holds for unit `i`.
    pub fn record(&self, i: usize, r: Record) {
        let v = match r {
            Record::Zero => REC_ZERO,
            Record::Data(crc) => REC_DATA | u64::from(crc),
            Record::Inherited(crc) => REC_INHERITED | u64::from(crc),
        };
        self.records[i].store(v, Ordering::Release);
    }

    /// What the image holds for unit `i`, once recorded.
    pub fn recorded(&self, i: usize) -> Option<Record> {
        let v = self.records[i].load(Ordering::Acquire);
        match v & !0xffff_ffff {
            REC_ZERO => Some(Record::Zero),
            REC_DATA => Some(Record::Data(v as u32)),
            REC_INHERITED => Some(Record::Inherited(v as u32)),
            _ => None,
        }
    }

    /// An incremental snapshot, in its pause: unit `i` is settled with
    /// `rec` before anyone could claim it (nobody copies it).
    pub fn pre_settle(&self, i: usize, rec: Record) {
        self.states[i].store(COPIED, Ordering::Release);
        self.record(i, rec);
        self.settled.fetch_add(1, Ordering::AcqRel);
    }

    /// Settles a claimed unit. Returns true if the fault handler parked a
    /// fault on it and must be nudged.
    pub fn settle(&self, i: usize, ok: bool) -> bool {
        let prev = self.states[i].swap(if ok { COPIED } else { FAILED }, Ordering::AcqRel);
        self.settled.fetch_add(1, Ordering::AcqRel);
        // Take the lock so a waiter between its check and its wait cannot miss
        // the notification.
        drop(self.lock.lock());
        self.cv.notify_all();
        prev & WAITER != 0
    }

    /// Marks that the handler parked a fault on chunk `i`; returns the state
    /// seen (if already settled, the caller resolves the fault itself).
    pub fn mark_waiter(&self, i: usize) -> ChunkState {
        let mut cur = self.states[i].load(Ordering::Acquire);
        loop {
            if decode(cur) != ChunkState::Copying {
                return decode(cur);
            }
            match self.states[i].compare_exchange(
                cur,
                cur | WAITER,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return ChunkState::Copying,
                Err(v) => cur = v,
            }
        }
    }

    /// Blocks until chunk `i` is Copied or Failed. Only for threads that are
    /// not the fault handler (they may block: the copier never waits on them).
    pub fn wait_settled(&self, i: usize) -> ChunkState {
        let mut guard = match self.lock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        loop {
            let s = self.state(i);
            if matches!(s, ChunkState::Copied | ChunkState::Failed) {
                return s;
            }
            guard = match self.cv.wait(guard) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }

    pub fn settled(&self) -> usize {
        self.settled.load(Ordering::Acquire)
    }

    /// Fails every chunk nobody claimed yet, so nothing new starts copying
    /// during a rollback. Returns how many were still Protected.
    pub fn fail_unclaimed(&self) -> usize {
        let mut n = 0;
        for s in self.states.iter() {
            if s.compare_exchange(PROTECTED, FAILED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                n += 1;
                self.settled.fetch_add(1, Ordering::AcqRel);
            }
        }
        drop(self.lock.lock());
        self.cv.notify_all();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn exactly_one_claimer_per_chunk() {
        let t = Arc::new(ChunkTable::new(1000));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..1000 {
                        if t.try_claim(i) {
                            mine.push(i);
                        }
                    }
                    mine
                })
            })
            .collect();
        let mut all: Vec<usize> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert!((0..1000).all(|i| !t.try_claim(i)));
    }

    #[test]
    fn waiter_bit_reported_on_settle() {
        let t = ChunkTable::new(2);
        assert_eq!(t.mark_waiter(0), ChunkState::Protected);
        assert!(t.try_claim(0));
        assert_eq!(t.mark_waiter(0), ChunkState::Copying);
        assert_eq!(t.state(0), ChunkState::Copying);
        assert!(t.settle(0, true));
        assert_eq!(t.state(0), ChunkState::Copied);
        assert_eq!(t.recorded(0), None);
        t.record(0, Record::Zero);
        assert_eq!(t.recorded(0), Some(Record::Zero));
        t.record(0, Record::Data(0xdead_beef));
        assert_eq!(t.recorded(0), Some(Record::Data(0xdead_beef)));
        assert!(t.try_claim(1));
        assert!(!t.settle(1, false));
        assert_eq!(t.wait_settled(1), ChunkState::Failed);
        assert_eq!(t.settled(), 2);
    }

    #[test]
    fn chunks_are_offered_once_each() {
        let t = ChunkTable::new(4 * 512);
        let got: Vec<usize> = std::iter::from_fn(|| t.next_chunk(512)).collect();
        assert_eq!(got, vec![0, 1, 2, 3]);
    }
}
