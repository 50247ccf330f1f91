//! State shared by one in-flight snapshot's threads: the "twin" of the
//! running VM's memory map (DESIGN.md §2), and the save-first primitives
//! used by workers, the fault handler and the VMM's hooks alike.
//!
//! Saving a unit means getting its bytes as of the fork instant somewhere
//! the guest can no longer change them — the image (`save_units`, straight
//! from guest RAM) or a staging slot (`stage`, written out later by
//! `drain_one`) — and only then lifting its write protection. A unit being
//! saved is `Copying` in the table; a fault on it waits until it settles,
//! so protection is never lifted while a write still reads guest RAM.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::chunk_table::{ChunkState, ChunkTable, Copier, Record};
use crate::error::{Error, Phase};
use crate::eventfd::EventFd;
use crate::inject::FaultInjection;
use crate::memory::{copy_populated, Pagemap};
use crate::metrics::Counters;
use crate::parent::ParentLink;
use crate::persist::ImageFile;
use crate::region::{Layout, CHUNK_SIZE, PAGES_PER_CHUNK, PAGE_SIZE};
use crate::save::{examine, write_runs};
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
    /// memory.img, being written.
    pub image: Arc<ImageFile>,
    pub pagemap: Pagemap,
    /// The snapshot's own, or (with `parent`) the loader's.
    pub uffd: Arc<Uffd>,
    /// The VM is still loading from a snapshot (parent.rs).
    pub parent: Option<ParentLink>,
    /// Guest RAM is hugetlbfs (`Config::hugetlb`).
    pub hugetlb: bool,
    /// Guest RAM is THP-advised (`Config::thp`).
    pub thp: bool,
    /// Writes are tracked after this snapshot (`Config::track`): workers
    /// leave a saved chunk protected, and every chunk written after the
    /// instant is marked in `dirty_after`.
    pub tracking: bool,
    /// Where the tracker goes at the end (with `tracking`).
    pub track_slot: Option<Arc<crate::tracking::TrackerSlot>>,
    pub dirty_after: Vec<AtomicBool>,
    /// Taken over from the last snapshot's tracker: chunks written since
    /// that snapshot (None: no tracker ran).
    pub dirty_before: Option<Vec<bool>>,
    pub counters: Counters,
    pub injection: FaultInjection,
    /// Fault-path saves started (for `fail_fault_path_at`).
    pub fault_copies: AtomicUsize,
    /// Worker saves started (for `fail_worker_copy_at`).
    pub worker_copies: AtomicUsize,
    /// Set on the first failure or on cancel: stop copying, roll back.
    pub aborted: AtomicBool,
    /// Set once every unit is saved: hooks return at once (the O(1)
    /// check async-fork gets from clearing the VMA's twin pointer).
    pub all_copied: AtomicBool,
    pub error: Mutex<Option<Error>>,
    /// Copier → handler: a unit with a parked fault settled.
    pub handler_nudge: EventFd,
    /// Supervisor → handler: registrations are gone, drain and exit.
    pub handler_stop: EventFd,
    /// Between `Engine::arm` and the pause: the fork instant has not come,
    /// so a write fault just lifts its unit's protection and notes it.
    pub armed: AtomicBool,
    /// Chunks whose protection a write lifted while armed.
    pub written_while_armed: Mutex<Vec<usize>>,
    /// The VM's staging pool, lent to this snapshot (None: no budget).
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

    fn pages_per_unit(&self) -> usize {
        (self.unit / PAGE_SIZE) as usize
    }

    /// Lifts the write protection of units `first..first + n` (adjacent,
    /// in one chunk) and wakes threads blocked on them.
    fn unprotect_units(&self, first: usize, n: usize, phase: Phase) -> Result<(), Error> {
        let host = self.layout.unit(first, self.unit).host_addr;
        self.uffd
            .write_protect(host, n as u64 * self.unit, false, false)
            .map_err(|source| Error::Uffd { phase, source })
    }

    /// Lifts unit `i`'s write protection and wakes threads blocked on it.
    pub fn unprotect_unit(&self, i: usize, phase: Phase) -> Result<(), Error> {
        self.unprotect_units(i, 1, phase)
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
                "injected {who} panic at copy {n} (unit {i})"
            )));
        }
        (fail == Some(n)).then(|| {
            Injected::Fail(Error::Injected {
                phase,
                what: format!("{who} failure at copy {n} (unit {i})"),
            })
        })
    }

    /// Runs a save: injections first, and a panic (a bug) becomes this
    /// save's error instead of leaving its units Copying forever.
    fn guarded(
        &self,
        i: usize,
        copier: Copier,
        save: impl FnOnce() -> Result<(), Error>,
    ) -> Result<(), Error> {
        let phase = phase_of(copier);
        crate::recover::catching(phase, || match self.injected(i, copier) {
            Some(Injected::Fail(e)) => Err(e),
            Some(Injected::Panic(what)) => std::panic::panic_any(what),
            None => save(),
        })
        .map_err(|e| match e {
            Error::Panicked { phase, what } => Error::Panicked {
                phase,
                what: format!("copying unit {i}: {what}"),
            },
            e => e,
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

    /// The end of the snapshot (or its rollback): every protection lifted
    /// and the regions unregistered, which also wakes threads parked on a
    /// missing page. Guest RAM still loading stays registered with its
    /// loader (whose registration this was), with the protection lifted.
    pub fn release_regions(&self) -> Result<(), crate::error::UffdError> {
        let mut res = Ok(());
        for r in self.layout.regions() {
            let r = if self.parent.is_some() {
                self.uffd.write_protect(r.host_addr, r.len, false, false)
            } else {
                self.uffd.unregister(r.host_addr, r.len)
            };
            if let Err(e) = r {
                res = res.and(Err(e));
            }
        }
        res
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
    pub fn reprotect_written_while_armed(&self) -> Result<Vec<usize>, Error> {
        let mut chunks = match self.written_while_armed.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        chunks.sort_unstable();
        chunks.dedup();
        self.protect_chunks(&chunks)?;
        Ok(chunks)
    }

    /// Protects `chunks` (ascending), adjacent ones in one call.
    pub fn protect_chunks(&self, chunks: &[usize]) -> Result<(), Error> {
        for (start, len) in self.runs(chunks) {
            self.protect(start, len)?;
        }
        Ok(())
    }

    /// As [`Shared::protect_chunks`], at most `step` bytes per call with
    /// `gap` between calls: armed ahead of the pause, the guest runs
    /// between the steps instead of stalling for the whole range (the
    /// engine's `ARM_STEP`).
    pub fn protect_chunks_stepped(
        &self,
        chunks: &[usize],
        step: u64,
        gap: std::time::Duration,
    ) -> Result<(), Error> {
        let step = step.max(self.unit);
        let mut first = true;
        for (start, len) in self.runs(chunks) {
            let mut at = start;
            while at < start + len {
                if !first {
                    std::thread::sleep(gap);
                }
                first = false;
                let n = step.min(start + len - at);
                self.protect(at, n)?;
                at += n;
            }
        }
        Ok(())
    }

    /// Runs of adjacent units as (host address, length), ascending.
    fn runs(&self, units: &[usize]) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &i in units {
            let at = self.layout.unit(i, self.unit).host_addr;
            match out.last_mut() {
                Some((start, len)) if *start + *len == at => *len += self.unit,
                _ => out.push((at, self.unit)),
            }
        }
        out
    }

    /// Tracking: chunk `i` was (or is about to be) written after the
    /// instant.
    pub fn mark_dirty_after(&self, i: usize) {
        if let Some(d) = self.dirty_after.get(i / self.units_per_chunk()) {
            d.store(true, Ordering::Release);
        }
    }

    fn protect(&self, start: u64, len: u64) -> Result<(), Error> {
        self.uffd
            .write_protect(start, len, true, false)
            .map_err(|source| Error::Uffd {
                phase: Phase::Sync,
                source,
            })
    }

    /// Saves the claimed units `units` (ascending, all in one chunk)
    /// straight from guest RAM into the image: checksums them, writes
    /// their populated pages (holes stay holes), and only then lifts their
    /// protection and settles them. On failure the protection is lifted
    /// all the same (a writer must never stay blocked), the units are
    /// Failed and the snapshot switches to rollback. Returns whether the
    /// save succeeded.
    pub fn save_units(&self, units: &[usize], copier: Copier) -> bool {
        let Some(&first) = units.first() else {
            return true;
        };
        let phase = phase_of(copier);
        let res = self.guarded(first, copier, || {
            // SAFETY: the units are claimed by this thread (no other
            // saver) and write-protected (no writer) until settled below;
            // the layout maps every unit inside a registered region.
            unsafe { self.write_units(units, phase) }
        });
        // Lift protection run by run of adjacent units (one ioctl per run).
        // Tracking writes after the snapshot, a worker leaves it: a later
        // write faults and marks the chunk dirty (a writer waiting on the
        // chunk is woken all the same and faults again).
        let mut unprotect = Ok(());
        let mut k = if self.tracking && copier == Copier::Worker {
            units.len()
        } else {
            for &u in units {
                if self.tracking {
                    self.mark_dirty_after(u);
                }
            }
            0
        };
        while k < units.len() {
            let start = k;
            while k + 1 < units.len() && units[k + 1] == units[k] + 1 {
                k += 1;
            }
            k += 1;
            if let Err(e) = self.unprotect_units(units[start], k - start, phase) {
                unprotect = unprotect.and(Err(e));
            }
        }
        let res = res.and(unprotect);
        let ok = res.is_ok();
        if ok {
            Counters::add(self.counter_of(copier), units.len() as u64);
        }
        let mut nudge = false;
        for &u in units {
            nudge |= self.table.settle(u, ok);
        }
        if nudge {
            self.handler_nudge.signal();
        }
        if let Err(e) = res {
            self.fail(e);
        }
        ok
    }

    fn counter_of(&self, copier: Copier) -> &std::sync::atomic::AtomicU64 {
        match copier {
            Copier::Worker => &self.counters.by_workers,
            Copier::FaultPath => &self.counters.by_fault_path,
            Copier::Hook => &self.counters.by_hook,
        }
    }

    /// The I/O of `save_units`: records every unit and writes the data
    /// ones' populated pages, in as few writes as the runs allow.
    ///
    /// # Safety
    /// As `save_units` guarantees: the units are claimed and protected.
    unsafe fn write_units(&self, units: &[usize], phase: Phase) -> Result<(), Error> {
        let per = self.units_per_chunk();
        let ppu = self.pages_per_unit();
        let chunk = units[0] / per;
        let loc = self.layout.chunk(chunk);
        if let Some(p) = self.parent.as_ref().filter(|p| p.is_from_parent(chunk)) {
            // Not in guest RAM at the instant: the parent's bytes (async-fork
            // only, so the unit is the chunk).
            let rec = p.copy_chunk(chunk, &self.image, loc.image_offset, &self.counters, phase)?;
            self.table.record(units[0], rec);
            if rec == Record::Zero {
                Counters::add(&self.counters.zero_units, 1);
            }
            return Ok(());
        }
        let pop = self
            .pagemap
            .populated(loc.host_addr, PAGES_PER_CHUNK, phase)?;
        let mut write = [false; PAGES_PER_CHUNK];
        for &u in units {
            debug_assert_eq!(u / per, chunk, "units of one chunk");
            let p0 = (u % per) * ppu;
            // SAFETY: the unit's populated pages are mapped, readable and
            // not written (claimed and protected).
            let rec = unsafe {
                examine(
                    (loc.host_addr + p0 as u64 * PAGE_SIZE) as *const u8,
                    &pop[p0..p0 + ppu],
                )
            };
            if rec != Record::Zero {
                write[p0..p0 + ppu].copy_from_slice(&pop[p0..p0 + ppu]);
            }
            self.table.record(u, rec);
            if rec == Record::Zero {
                Counters::add(&self.counters.zero_units, 1);
            }
        }
        let written = unsafe {
            // SAFETY: the marked pages are populated (readable) guest RAM
            // of claimed, protected units: nobody writes them until the
            // write returned and the protection is lifted.
            write_runs(&self.image, loc.host_addr, loc.image_offset, &write)
        }
        .map_err(|source| Error::Write { phase, source })?;
        Counters::add(&self.counters.bytes_written, written);
        Ok(())
    }

    /// The fault path's save of claimed unit `i`: into a free staging slot
    /// (one memcpy; a worker writes it out), or, with the pool full or
    /// absent, straight to the image on this thread. Then the protection
    /// goes and the unit settles. Returns whether it succeeded (on failure
    /// the snapshot rolls back and the writer is released all the same).
    pub fn save_for_fault(&self, i: usize, copier: Copier) -> bool {
        if self.parent.as_ref().is_some_and(|p| p.is_from_parent(i)) {
            // Nothing in guest RAM to stage: copy from the parent's image.
            return self.save_units(&[i], copier);
        }
        let slot = self
            .staging
            .as_ref()
            .and_then(|st| st.take_free().map(|slot| (st, slot)));
        let Some((st, slot)) = slot else {
            Counters::add(&self.counters.direct_fault_writes, 1);
            return self.save_units(&[i], copier);
        };
        let phase = phase_of(copier);
        let loc = self.layout.unit(i, self.unit);
        let pages = self.pages_per_unit();
        let mut filled = false;
        let res = self.guarded(i, copier, || {
            let pop = self.pagemap.populated(loc.host_addr, pages, phase)?;
            if !pop.iter().any(|&p| p) {
                self.table.record(i, Record::Zero);
                Counters::add(&self.counters.zero_units, 1);
                return Ok(());
            }
            // SAFETY: the source unit is claimed and write-protected; the
            // slot is `unit` bytes taken by this thread alone. Gaps are
            // zeroed: the slot holds an earlier unit's bytes.
            unsafe {
                copy_populated(&pop, loc.host_addr, st.slot_ptr(slot), pages, true);
            }
            filled = true;
            Ok(())
        });
        if self.tracking {
            self.mark_dirty_after(i);
        }
        if filled {
            st.fill(slot, i);
            Counters::add(&self.counters.staged, 1);
        } else {
            st.give_back(slot);
        }
        let res = res.and(self.unprotect_unit(i, phase));
        let ok = res.is_ok();
        if ok {
            Counters::add(self.counter_of(copier), 1);
        }
        if self.table.settle(i, ok) {
            self.handler_nudge.signal();
        }
        if let Err(e) = res {
            self.fail(e);
        }
        ok
    }

    /// Writes one staged unit out and frees its slot. Returns whether there
    /// was one. A failure (the disk) fails the snapshot.
    pub fn drain_one(&self) -> bool {
        let Some(st) = &self.staging else {
            return false;
        };
        let Some(f) = st.take_filled() else {
            return false;
        };
        let ptr = st.slot_ptr(f.slot);
        let pages = self.pages_per_unit();
        let all = [true; PAGES_PER_CHUNK];
        // SAFETY: the slot is this thread's (taken off the filled queue)
        // and holds the whole unit (gaps zeroed when it was filled).
        let rec = unsafe { examine(ptr, &all[..pages]) };
        let res = match rec {
            Record::Zero | Record::Inherited(_) => Ok(()),
            Record::Data(_) => {
                let off = self.layout.unit(f.unit, self.unit).image_offset;
                // SAFETY: as above; the slot stays untouched until
                // `give_back` below.
                unsafe { self.image.write_from(ptr, self.unit as usize, off) }
                    .map(|()| Counters::add(&self.counters.bytes_written, self.unit))
                    .map_err(|source| Error::Write {
                        phase: Phase::Worker,
                        source,
                    })
            }
        };
        st.give_back(f.slot);
        match res {
            Ok(()) => {
                self.table.record(f.unit, rec);
                if rec == Record::Zero {
                    Counters::add(&self.counters.zero_units, 1);
                }
                true
            }
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    /// Save-first for a thread that may block (a VMM hook): make sure unit
    /// `i` is saved before the caller modifies it. Never fails the caller:
    /// on error the snapshot is failed and the write may proceed.
    pub fn ensure_copied(&self, i: usize) {
        if self.table.try_claim(i) {
            self.save_for_fault(i, Copier::Hook);
            return;
        }
        if self.table.state(i) == ChunkState::Copying {
            self.table.wait_settled(i);
        }
    }
}

fn phase_of(copier: Copier) -> Phase {
    match copier {
        Copier::Worker => Phase::Worker,
        Copier::FaultPath | Copier::Hook => Phase::FaultPath,
    }
}
