//! State shared by one in-flight snapshot's threads: the "twin" of the
//! running VM's memory map (DESIGN.md §2), and the copy-first primitive used
//! by workers, the fault handler and the VMM's hooks alike.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::chunk_table::{ChunkState, ChunkTable, Copier};
use crate::error::{Error, Phase};
use crate::eventfd::EventFd;
use crate::inject::FaultInjection;
use crate::memory::{copy_populated, copy_unit, Destination, Pagemap};
use crate::metrics::Counters;
use crate::region::{ChunkLoc, Layout, CHUNK_SIZE, PAGE_SIZE};
use crate::staging::Staging;
use crate::uffd::Uffd;

/// An injected failure: an error to return, or a panic to raise.
enum Injected {
    Fail(Error),
    Panic(String),
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub layout: Layout,
    /// Copy and protection unit: CHUNK_SIZE (async-fork) or PAGE_SIZE
    /// (sync-wp). The table has one entry per unit, numbered like chunks.
    pub unit: u64,
    pub table: ChunkTable,
    pub dest: Arc<Destination>,
    pub pagemap: Pagemap,
    pub uffd: Uffd,
    pub counters: Counters,
    pub injection: FaultInjection,
    /// Fault-path copies started (for `fail_fault_path_at`).
    pub fault_copies: AtomicUsize,
    /// Worker copies started (for `fail_worker_copy_at`).
    pub worker_copies: AtomicUsize,
    /// Set on the first failure or on cancel: stop copying, roll back.
    pub aborted: AtomicBool,
    /// Set once every chunk is copied: hooks return at once (the O(1)
    /// check async-fork gets from clearing the VMA's twin pointer).
    pub all_copied: AtomicBool,
    pub error: Mutex<Option<Error>>,
    /// Copier → handler: a chunk with a parked fault settled.
    pub handler_nudge: EventFd,
    /// Supervisor → handler: registrations are gone, drain and exit.
    pub handler_stop: EventFd,
    /// Between `Engine::arm` and the pause: the fork instant has not come,
    /// so a write fault just lifts its chunk's protection and notes it.
    pub armed: AtomicBool,
    /// Chunks whose protection a write lifted while armed.
    pub written_while_armed: Mutex<Vec<usize>>,
    /// Warm slots for fault-path copies when the destination is fresh
    /// (staging.rs); None on a warm destination and for sync-wp.
    pub staging: Option<Staging>,
}

impl Shared {
    /// Records the first error and switches the snapshot to rollback.
    pub fn fail(&self, e: Error) {
        let mut slot = match self.error.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if slot.is_none() {
            *slot = Some(e);
        }
        self.aborted.store(true, Ordering::Release);
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    pub fn take_error(&self) -> Option<Error> {
        match self.error.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        }
    }

    /// The unit holding host address `addr`, if any.
    pub fn unit_of_host(&self, addr: u64) -> Option<usize> {
        self.layout.unit_of_host(addr, self.unit)
    }

    /// Units per 2 MiB chunk (1 or 512).
    pub fn units_per_chunk(&self) -> usize {
        (CHUNK_SIZE / self.unit) as usize
    }

    /// Lifts unit `i`'s write protection and wakes threads blocked on it.
    pub fn unprotect_unit(&self, i: usize, phase: Phase) -> Result<(), Error> {
        let host = self.layout.unit(i, self.unit).host_addr;
        self.uffd
            .write_protect(host, self.unit, false, false)
            .map_err(|source| Error::Uffd { phase, source })
    }

    fn injected(&self, i: usize, copier: Copier) -> Option<Injected> {
        let (n, fail, panic, phase, who) = match copier {
            Copier::Worker => (
                self.worker_copies.fetch_add(1, Ordering::Relaxed),
                self.injection.fail_worker_copy_at,
                self.injection.panic_worker_copy_at,
                Phase::Worker,
                "worker",
            ),
            Copier::FaultPath => (
                self.fault_copies.fetch_add(1, Ordering::Relaxed),
                self.injection.fail_fault_path_at,
                self.injection.panic_fault_path_at,
                Phase::FaultPath,
                "fault-path",
            ),
            Copier::Hook => return None,
        };
        if panic == Some(n) {
            return Some(Injected::Panic(format!(
                "injected {who} panic at copy {n} (chunk {i})"
            )));
        }
        (fail == Some(n)).then(|| {
            Injected::Fail(Error::Injected {
                phase,
                what: format!("{who} failure at copy {n} (chunk {i})"),
            })
        })
    }

    /// While armed: lets a write to chunk `i` through. The chunk is noted
    /// before its protection goes, so once the writers are paused (every
    /// fault answered) the list holds every chunk written since `arm`.
    pub fn let_through_while_armed(&self, i: usize) {
        match self.written_while_armed.lock() {
            Ok(mut g) => g.push(i),
            Err(p) => p.into_inner().push(i),
        }
        if let Err(e) = self.unprotect_unit(i, Phase::Sync) {
            // The writer must not stay blocked: lift everything and fail;
            // `begin` sees the abort and rolls back.
            self.fail(e);
            self.lift_all_protection();
        }
    }

    /// Rollback's last resort: every region unprotected (one ioctl each,
    /// waking blocked writers), errors ignored.
    pub fn lift_all_protection(&self) {
        for r in self.layout.regions() {
            let _ = self.uffd.write_protect(r.host_addr, r.len, false, false);
        }
    }

    /// In the pause after `arm`: protects again the chunks written since
    /// (adjacent ones in one call). Returns how many.
    pub fn reprotect_written_while_armed(&self) -> Result<u64, Error> {
        let mut chunks = match self.written_while_armed.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        chunks.sort_unstable();
        chunks.dedup();
        let mut run: Option<(u64, u64)> = None;
        for &i in &chunks {
            let at = self.layout.unit(i, self.unit).host_addr;
            run = match run {
                Some((start, len)) if start + len == at => Some((start, len + self.unit)),
                Some((start, len)) => {
                    self.protect(start, len)?;
                    Some((at, self.unit))
                }
                None => Some((at, self.unit)),
            };
        }
        if let Some((start, len)) = run {
            self.protect(start, len)?;
        }
        Ok(chunks.len() as u64)
    }

    fn protect(&self, start: u64, len: u64) -> Result<(), Error> {
        self.uffd
            .write_protect(start, len, true, false)
            .map_err(|source| Error::Uffd {
                phase: Phase::Sync,
                source,
            })
    }

    /// Copies chunk `i`, which the caller has claimed, then lifts its
    /// protection and settles it. On failure the protection is lifted all
    /// the same (a writer must never stay blocked), the chunk is Failed and
    /// the snapshot switches to rollback (the error is kept in `error`).
    /// Returns whether the copy succeeded.
    pub fn copy_claimed(&self, i: usize, copier: Copier) -> bool {
        let phase = match copier {
            Copier::Worker => Phase::Worker,
            Copier::FaultPath | Copier::Hook => Phase::FaultPath,
        };
        let loc = self.layout.unit(i, self.unit);
        // A panic while copying (a bug) must not leave the chunk Copying and
        // protected forever: it becomes this chunk's error, and the snapshot
        // rolls back like any other failure.
        let res = crate::recover::catching(phase, || match self.injected(i, copier) {
            Some(Injected::Fail(e)) => Err(e),
            Some(Injected::Panic(what)) => std::panic::panic_any(what),
            // SAFETY: the chunk is claimed (no other copier) and
            // write-protected (no writer); source and destination chunks are
            // mapped for `unit` bytes (layout validated, dest sized to it).
            None if copier == Copier::FaultPath => unsafe { self.copy_for_fault(&loc, phase) },
            // SAFETY: as above.
            None => unsafe {
                copy_unit(
                    &self.pagemap,
                    &self.dest,
                    loc.host_addr,
                    loc.dest_offset,
                    (self.unit / PAGE_SIZE) as usize,
                    phase,
                )
            },
        })
        .map_err(|e| match e {
            Error::Panicked { phase, what } => Error::Panicked {
                phase,
                what: format!("copying unit {i}: {what}"),
            },
            e => e,
        });
        let unprotect = self.unprotect_unit(i, phase);
        let res = res.and_then(|r| unprotect.map(|()| r));
        let nudge = match &res {
            Ok((zero, bytes)) => {
                Counters::add(&self.counters.bytes_copied, *bytes);
                if *zero {
                    Counters::add(&self.counters.zero_chunks, 1);
                } else {
                    Counters::add(&self.counters.dest_chunks, 1);
                }
                Counters::add(
                    match copier {
                        Copier::Worker => &self.counters.by_workers,
                        Copier::FaultPath => &self.counters.by_fault_path,
                        Copier::Hook => &self.counters.by_hook,
                    },
                    1,
                );
                self.table.settle(i, true, *zero)
            }
            Err(_) => self.table.settle(i, false, false),
        };
        if nudge {
            self.handler_nudge.signal();
        }
        match res {
            Ok(_) => true,
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    /// The fault path's copy: into a free staging slot when there is one
    /// (fresh destination: no populate on the writer's path), else straight
    /// into the destination. A zero chunk needs neither (a fresh
    /// destination reads as zero).
    ///
    /// # Safety
    /// As for `copy_unit`: `loc`'s unit is claimed and write-protected.
    unsafe fn copy_for_fault(&self, loc: &ChunkLoc, phase: Phase) -> Result<(bool, u64), Error> {
        let pages = (self.unit / PAGE_SIZE) as usize;
        let slot = self
            .staging
            .as_ref()
            .and_then(|st| st.take_free().map(|slot| (st, slot)));
        let Some((st, slot)) = slot else {
            // SAFETY: forwarded from this function's contract.
            return unsafe {
                copy_unit(
                    &self.pagemap,
                    &self.dest,
                    loc.host_addr,
                    loc.dest_offset,
                    pages,
                    phase,
                )
            };
        };
        let pop = match self.pagemap.populated(loc.host_addr, pages, phase) {
            Ok(p) => p,
            Err(e) => {
                st.give_back(slot);
                return Err(e);
            }
        };
        if !pop.iter().any(|&p| p) {
            st.give_back(slot);
            return Ok((true, 0));
        }
        // SAFETY: the source unit as per this function's contract; the slot
        // is CHUNK_SIZE (= unit) bytes taken by this thread alone. Gaps are
        // zeroed: the slot holds an earlier chunk's bytes.
        let copied = unsafe { copy_populated(&pop, loc.host_addr, st.slot_ptr(slot), pages, true) };
        st.fill(slot, loc.dest_offset);
        Counters::add(&self.counters.staged, 1);
        Ok((false, copied))
    }

    /// Moves one staged chunk to the destination (populating it there) and
    /// frees its slot. Returns whether there was one to move. A failure
    /// (the destination cannot be allocated) fails the snapshot.
    pub fn drain_one(&self) -> bool {
        let Some(st) = &self.staging else {
            return false;
        };
        let Some(f) = st.take_filled() else {
            return false;
        };
        let res = self.dest.populate(f.dest_offset, CHUNK_SIZE, Phase::Worker);
        if res.is_ok() {
            // SAFETY: the slot was filled by a settled fault-path copy and
            // is this thread's (taken off the filled list); its destination
            // chunk is written by nobody else (the chunk is Copied, so no
            // copier claims it again) and is CHUNK_SIZE bytes inside the
            // destination.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    st.slot_ptr(f.slot),
                    self.dest.ptr(f.dest_offset),
                    CHUNK_SIZE as usize,
                )
            };
        }
        st.give_back(f.slot);
        match res {
            Ok(()) => true,
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    /// Copy-first for a thread that may block (a VMM hook): make sure chunk
    /// `i` is in the snapshot before the caller modifies it. Never fails the
    /// caller: on error the snapshot is failed and the write may proceed.
    pub fn ensure_copied(&self, i: usize) {
        if self.table.try_claim(i) {
            self.copy_claimed(i, Copier::Hook);
            return;
        }
        if self.table.state(i) == ChunkState::Copying {
            self.table.wait_settled(i);
        }
    }
}
