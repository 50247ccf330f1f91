//! One atomic state per 2 MiB chunk: the hypervisor's "PMD R/W bit".
//!
//! `Protected → Copying → Copied`, or `Copying → Failed`. The CAS from
//! Protected to Copying is the claim: exactly one thread (a worker, the fault
//! handler or a `before_write` hook) copies a chunk; others wait for it.
//! A high `WAITER` bit tells the copier that the fault handler parked a fault
//! on this chunk and wants a nudge when it settles (the handler never blocks
//! on another thread, see fault_handler.rs).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
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
    /// Chunk had no populated page at the fork: reads as zero, persisted as a hole.
    zero: Box<[AtomicBool]>,
    /// Workers' claim cursor: chunks below it were offered to a worker.
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
            zero: (0..chunks).map(|_| AtomicBool::new(false)).collect(),
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

    /// Next chunk for a worker, in address order, skipping chunks already
    /// claimed by the fault path. Each index is offered to one worker only.
    pub fn claim_next(&self) -> Option<usize> {
        loop {
            let i = self.cursor.fetch_add(1, Ordering::Relaxed);
            if i >= self.len() {
                return None;
            }
            if self.try_claim(i) {
                return Some(i);
            }
        }
    }

    /// Settles a claimed chunk. Returns true if the fault handler parked a
    /// fault on it and must be nudged.
    pub fn settle(&self, i: usize, ok: bool, zero: bool) -> bool {
        if ok {
            self.zero[i].store(zero, Ordering::Relaxed);
        }
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

    pub fn is_zero(&self, i: usize) -> bool {
        self.zero[i].load(Ordering::Relaxed)
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
        assert!(t.claim_next().is_none());
    }

    #[test]
    fn waiter_bit_reported_on_settle() {
        let t = ChunkTable::new(2);
        assert_eq!(t.mark_waiter(0), ChunkState::Protected);
        assert!(t.try_claim(0));
        assert_eq!(t.mark_waiter(0), ChunkState::Copying);
        assert_eq!(t.state(0), ChunkState::Copying);
        assert!(t.settle(0, true, true));
        assert_eq!(t.state(0), ChunkState::Copied);
        assert!(t.is_zero(0));
        assert_eq!(t.claim_next(), Some(1));
        assert!(!t.settle(1, false, false));
        assert_eq!(t.wait_settled(1), ChunkState::Failed);
        assert_eq!(t.settled(), 2);
    }
}
