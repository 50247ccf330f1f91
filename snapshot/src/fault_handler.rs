//! The fault path: the running VM's "proactive synchronisation" (DESIGN.md
//! §1.3). One thread reads the uffd; for a write to a protected chunk it
//! saves the chunk first — into a staging slot, or with the pool full
//! straight to the image (`Shared::save_for_fault`) — then lifts the
//! protection and wakes the writer.
//!
//! (The sync-wp baseline runs this same handler with 4 KiB units: "chunk"
//! below then means one page.)
//!
//! # Granularity: whole 2 MiB chunk, not 4 KiB page
//! Per-page unprotect splits the huge PMD (and KVM's 2 MiB stage-2 mapping)
//! for the rest of the VM's life, makes every further page of the chunk fault
//! again, and needs a per-page bitmap race with the workers. A writer that
//! touches ≥ ~6 pages of a chunk is already better off with one chunk copy,
//! and a chunk is copied at most once per snapshot, so chunk granularity
//! bounds the total fault count by the chunk count. Hence: chunk
//! (`bench/examples/uffd_probe.rs` measures both; docs/journal/ has the numbers).
//!
//! # Never blocking on others
//! The handler never waits for another thread: if a worker (or a hook) is
//! copying the faulting chunk, the fault is parked and the chunk gets a
//! WAITER bit; the copier signals `handler_nudge` when it settles it. (A
//! worker's unprotect already wakes WP waiters; missing-page waiters need
//! the handler to map a page, hence the nudge.) Faults on other chunks keep
//! being served meanwhile.
//!
//! # Never-touched pages
//! Regions are registered MISSING|WP: the first touch of a page with no
//! page-table entry traps here too. We copy its chunk first (reading only
//! populated pages, per pagemap), then resolve the fault: UFFDIO_ZEROPAGE
//! for a read, UFFDIO_COPY of a zero page for a write (saves the second,
//! copy-on-write fault). See engine.rs for why not WP_UNPOPULATED.

use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::chunk_table::{ChunkState, Copier};
use crate::error::{panic_message, Error, Phase};
use crate::metrics::HandlerStats;
use crate::region::{CHUNK_SIZE, PAGE_SIZE};
use crate::shared::Shared;
use crate::uffd::{Event, FaultKind};
use crate::zero_fill::ZeroFill;

struct Parked {
    chunk: usize,
    address: u64,
    kind: FaultKind,
    since: Instant,
}

pub(crate) fn run(shared: Arc<Shared>) -> HandlerStats {
    if let Err(e) =
        crate::priority::adjust_current_thread(crate::priority::FAULT_HANDLER_NICE_DELTA)
    {
        tracing::debug!("fault handler keeps the VMM's priority: {e}");
    }
    let zero = ZeroFill::new(&shared.uffd, shared.thp, shared.hugetlb);
    let mut h = Handler {
        zero,
        shared,
        stats: HandlerStats::new(),
        parked: Vec::new(),
        events: Vec::with_capacity(64),
        read_errors: 0,
    };
    h.serve();
    h.stats
}

struct Handler {
    zero: ZeroFill,
    shared: Arc<Shared>,
    stats: HandlerStats,
    parked: Vec<Parked>,
    events: Vec<Event>,
    read_errors: u64,
}

impl Handler {
    fn serve(&mut self) {
        loop {
            // A VM still loading from a snapshot: its loader reads the
            // uffd and passes our faults on (lazy/sink.rs).
            let events_fd = match &self.shared.parent {
                Some(p) => p.sink.as_raw_fd(),
                None => self.shared.uffd.as_raw_fd(),
            };
            let [events, nudged, stopped] = crate::uffd::wait_readable([
                events_fd,
                self.shared.handler_nudge.as_raw_fd(),
                self.shared.handler_stop.as_raw_fd(),
            ]);
            if nudged {
                self.shared.handler_nudge.drain();
                self.retry_parked();
            }
            if events {
                self.read_and_handle();
            }
            if stopped {
                // The supervisor has unregistered every region (which wakes
                // missing-page waiters) and lifted every protection (which
                // wakes WP waiters). Queued events are stale; answer them
                // anyway and leave.
                self.read_and_handle();
                self.retry_parked();
                for p in std::mem::take(&mut self.parked) {
                    self.resolve(p.address, p.kind, p.since);
                }
                return;
            }
        }
    }

    fn read_and_handle(&mut self) {
        self.events.clear();
        if let Some(p) = &self.shared.parent {
            p.sink.take(&mut self.events);
        } else if let Err(e) = self.shared.uffd.read_events(&mut self.events) {
            // Cannot happen on a valid uffd; keep serving regardless, but
            // fail the snapshot so it is rolled back, and back off so a
            // persistent error cannot spin a core.
            self.read_errors += 1;
            self.shared.fail(Error::uffd(Phase::FaultPath, e));
            std::thread::sleep(std::time::Duration::from_millis(1));
            return;
        }
        let events = std::mem::take(&mut self.events);
        for ev in &events {
            if let Event::PageFault { address, kind } = *ev {
                let since = Instant::now();
                // Save panics are caught in the save; this is the last
                // line for a bug elsewhere here. The handler must outlive
                // it: a dead handler strands every faulting writer.
                let handled =
                    std::panic::catch_unwind(AssertUnwindSafe(|| self.handle(address, kind)));
                if let Err(p) = handled {
                    self.shared.fail(Error::Panicked {
                        phase: Phase::FaultPath,
                        what: format!("fault handler: {}", panic_message(p)),
                    });
                    self.shared.lift_all_protection();
                    self.resolve(address, kind, since);
                }
            }
        }
        self.events = events;
    }

    fn handle(&mut self, address: u64, kind: FaultKind) {
        let since = Instant::now();
        if self.shared.armed.load(Ordering::Acquire) {
            // Before the fork instant: not a snapshot fault, nothing to copy.
            if let Some(chunk) = self.shared.unit_of_host(address) {
                self.shared.let_through_while_armed(chunk);
            }
            self.settle(address, kind);
            return;
        }
        match kind {
            FaultKind::WriteProtect => self.stats.wp_faults += 1,
            FaultKind::Missing { .. } => self.stats.missing_faults += 1,
        }
        let Some(chunk) = self.shared.unit_of_host(address) else {
            // Not ours (cannot happen: we register only our regions).
            self.resolve(address, kind, since);
            return;
        };
        let sh = &self.shared;
        if sh.tracking {
            // Whatever happens below, the writer writes this chunk.
            sh.mark_dirty_after(chunk);
        }
        if sh.is_aborted() {
            // Rolling back: never block or corrupt the writer. Lift the
            // chunk's protection and let it go.
            let _ = sh.unprotect_unit(chunk, Phase::FaultPath);
            self.resolve(address, kind, since);
            return;
        }
        if sh.table.try_claim(chunk) {
            // Save first. On failure the save lifts the protection and
            // fails the snapshot; the writer is released either way.
            sh.save_for_fault(chunk, Copier::FaultPath);
            self.resolve(address, kind, since);
            return;
        }
        match sh.table.mark_waiter(chunk) {
            ChunkState::Copying => self.parked.push(Parked {
                chunk,
                address,
                kind,
                since,
            }),
            ChunkState::Failed => {
                // Failed chunks may still carry protection (rollback lifts
                // it region-wide, maybe not yet): lift it now.
                let _ = sh.unprotect_unit(chunk, Phase::FaultPath);
                self.resolve(address, kind, since);
            }
            // Copied: a worker won the race and already lifted protection.
            // Protected is impossible after a failed claim.
            // (Tracking writes: a saved chunk keeps its protection until
            // written; this is that write.)
            ChunkState::Copied if sh.tracking && kind == FaultKind::WriteProtect => {
                let _ = sh.unprotect_unit(chunk, Phase::FaultPath);
                self.resolve(address, kind, since)
            }
            ChunkState::Copied | ChunkState::Protected => self.resolve(address, kind, since),
        }
    }

    fn retry_parked(&mut self) {
        let mut still = Vec::new();
        for p in std::mem::take(&mut self.parked) {
            match self.shared.table.state(p.chunk) {
                ChunkState::Copying => still.push(p),
                ChunkState::Failed => {
                    let _ = self.shared.unprotect_unit(p.chunk, Phase::FaultPath);
                    self.resolve(p.address, p.kind, p.since);
                }
                _ => self.resolve(p.address, p.kind, p.since),
            }
        }
        // Re-arm the WAITER bit in case a chunk settles between our check
        // and the next poll (mark_waiter reports a settled state instead).
        for p in std::mem::take(&mut still) {
            if self.shared.table.mark_waiter(p.chunk) == ChunkState::Copying {
                self.parked.push(p);
            } else {
                self.resolve(p.address, p.kind, p.since);
            }
        }
    }

    /// Lets the faulting thread go once its chunk is no longer protected.
    fn resolve(&mut self, address: u64, kind: FaultKind, since: Instant) {
        self.settle(address, kind);
        let ns = since.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        let _ = self.stats.latency_ns.record(ns.max(1));
    }

    /// Wakes the faulting thread, or maps zeros where it first touched.
    fn settle(&mut self, address: u64, kind: FaultKind) {
        let uffd = &self.shared.uffd;
        let page = address & !(PAGE_SIZE - 1);
        let done = match kind {
            FaultKind::WriteProtect => uffd.wake(page, PAGE_SIZE).is_ok(),
            FaultKind::Missing { write } => {
                let chunk = address & !(CHUNK_SIZE - 1);
                self.zero.resolve(uffd, address, chunk, write)
            }
        };
        if !done {
            // After unregister these ioctls fail (the kernel already woke the
            // thread); a wake is harmless in every case.
            let _ = uffd.wake(page, PAGE_SIZE);
        }
    }
}
