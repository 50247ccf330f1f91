//! The engine: the VMM's entry points (`arm`, `begin`, `start_copy`,
//! `before_write`, `before_discard`, `cancel`, `wait`, `progress`).
//!
//! A snapshot streams guest RAM into a memory image (`persist::ImageFile`,
//! memory.img of a snapshot directory being written): nothing proportional
//! to the guest's memory is allocated, only the VM's staging pool
//! (staging.rs) and tables of a few bytes per chunk.
//!
//! # Invariants
//! - **The image equals guest RAM at the instant `begin` ran**, bit for bit:
//!   a unit is written (or staged) while it is write-protected, and its
//!   protection is lifted only after the write returned (so no writer can
//!   change bytes the kernel is still reading). A write fault on a unit
//!   being saved waits for that save.
//! - **`begin` is O(regions + chunks) while the writers are paused**, and
//!   after `arm` O(chunks written since arm): registration and
//!   write-protection (one `UFFDIO_WRITEPROTECT` per region; THP makes it
//!   one PMD bit per chunk) happen in `arm` while the writers run. A write
//!   fault before the pause is let through at once and its chunk noted;
//!   `begin` protects just those again. Correct because a chunk not noted
//!   has not been written since its protection landed.
//! - **Never-touched pages stay holes and never trap a copier**: regions are
//!   registered MISSING|WP for the snapshot's lifetime, so a first touch
//!   during the snapshot traps to the handler, which saves the chunk first
//!   and then maps a zero page; savers read only pages pagemap shows
//!   populated (`UFFD_FEATURE_WP_UNPOPULATED` instead would make the
//!   protection O(pages) in the pause and split huge pages).
//! - **Bounded memory**: the fault path stages into the pool or, when it is
//!   full, writes the unit itself; it never allocates.
//! - **Rollback leaves the VM as it was**: on any failure or `cancel` every
//!   protection is lifted and every blocked writer woken; the image's
//!   directory is the caller's to remove.
//!
//! Measurements behind these choices: docs/BENCHMARKS.md (current) and
//! docs/journal/ (the experiments).

pub(crate) mod config;
mod standby;
mod stop_the_world;
mod sync_phase;

pub use config::{Config, Strategy};
use standby::{Pending, Standby};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Phase};
use crate::finished::Snapshot;
use crate::inject::EnvInjection;
use crate::metrics::{Counters, HandlerStats, Progress, SyncMetrics};
use crate::persist::ImageFile;
use crate::region::Region;
use crate::shared::Shared;
use crate::sync::lock;
use crate::uffd::Uffd;

/// Armed ahead of the pause, guest RAM is write-protected this much at a
/// time, with [`ARM_STEP_GAP`] between steps: on shadow-paging hosts (nested
/// KVM) a vCPU makes no progress while the protection of its memory
/// changes, so one call over all of guest RAM stalls the guest for all of
/// it; in steps it runs in between, and the pause re-protects the few
/// chunks it wrote. Larger and smaller steps measured worse
/// (docs/journal/2026-12-02-arm-steps.md).
pub const ARM_STEP: u64 = 256 << 20;
const ARM_STEP_GAP: Duration = Duration::from_micros(100);

/// Snapshots one VM's memory; one snapshot in flight at a time.
#[derive(Debug)]
pub struct Engine {
    config: Config,
    /// Fast path for hooks: false when no snapshot is in flight.
    active: AtomicBool,
    current: Mutex<Option<Arc<Shared>>>,
    supervisor: Mutex<Option<Pending>>,
    /// Set between `arm` and `begin` (or `disarm`).
    armed: Mutex<Option<Armed>>,
}

/// Protection set up ahead of the pause by `arm`.
#[derive(Debug)]
struct Armed {
    regions: Vec<Region>,
    image: Arc<ImageFile>,
    shared: Arc<Shared>,
    handler: JoinHandle<HandlerStats>,
    sync: SyncMetrics,
    /// The supervisor thread, created now rather than in the pause (thread
    /// creation is a fraction of a millisecond); None if it could not be
    /// created (`begin` then creates it).
    standby: Option<Standby>,
}

impl Engine {
    /// Creates an engine and checks that this process can use userfaultfd
    /// write-protect (root, kernel support), so a VM learns at start-up, not
    /// at its first snapshot, that snapshots cannot work.
    pub fn new(mut config: Config) -> Result<Engine, Error> {
        // Test hook: SNAPVM_INJECT reaches engines inside a real snapvm.
        if let Some(injection) = EnvInjection::next_engine().map_err(Error::InvalidInjection)? {
            config.injection = injection;
        }
        if config.workers == 0 {
            return Err(Error::InvalidConfig("workers must be at least 1"));
        }
        match config.strategy {
            Strategy::Fork => {
                return Err(Error::InvalidConfig(
                    "the fork strategy runs in the VMM (process fork), not in the engine",
                ))
            }
            Strategy::StopTheWorld => {
                return Ok(Engine {
                    config,
                    active: AtomicBool::new(false),
                    current: Mutex::new(None),
                    supervisor: Mutex::new(None),
                    armed: Mutex::new(None),
                })
            }
            Strategy::AsyncFork | Strategy::SyncWp => {}
        }
        Uffd::new(crate::zero_fill::uffd_features()).map_err(|source| Error::Uffd {
            phase: Phase::Sync,
            source,
        })?;
        Ok(Engine {
            config,
            active: AtomicBool::new(false),
            current: Mutex::new(None),
            supervisor: Mutex::new(None),
            armed: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn current(&self) -> Option<Arc<Shared>> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.current).clone()
    }

    /// Save-first hook for the VMM's own writes into guest RAM (device
    /// emulation): call before writing `[guest_addr, +len)`. Returns once
    /// the chunks involved are saved (staged or written), saving them on
    /// this thread if nobody has yet. Without it the VMM thread would fault on its own
    /// uffd — harmless while the handler runs, but this is cheaper and keeps
    /// working if the handler is the thread writing. Never fails the caller:
    /// a copy error fails the snapshot instead. O(1) when no snapshot runs.
    pub fn before_write(&self, guest_addr: u64, len: u64) {
        let Some(sh) = self.current() else {
            return;
        };
        if sh.all_copied.load(Ordering::Acquire) || sh.is_aborted() {
            return;
        }
        for range in sh.layout.units_of_guest(guest_addr, len, sh.unit) {
            for i in range {
                sh.ensure_copied(i);
            }
        }
    }

    /// Save-first hook for discards (MADV_DONTNEED, balloon): call before
    /// discarding `[guest_addr, +len)`. After it, the discard is safe: the
    /// pages are in the snapshot, and later touches of the now-empty pages
    /// trap as MISSING and read zero, as a discard should.
    pub fn before_discard(&self, guest_addr: u64, len: u64) {
        self.before_write(guest_addr, len);
    }

    /// Live progress of the snapshot in flight.
    pub fn progress(&self) -> Option<Progress> {
        let sh = lock(&self.current).clone()?;
        Some(Progress {
            chunks_done: sh.table.settled(),
            chunks_total: sh.table.len(),
            bytes_written: Counters::get(&sh.counters.bytes_written),
            failed: sh.is_aborted(),
        })
    }

    /// Whether a snapshot is in flight (begun and not yet collected by `wait`).
    pub fn in_progress(&self) -> bool {
        lock(&self.current).is_some()
            || lock(&self.supervisor).is_some()
            || lock(&self.armed).is_some()
    }

    /// Cancels the snapshot in flight: same rollback as a worker failure.
    /// `wait()` then returns `Error::Cancelled`.
    pub fn cancel(&self) -> Result<(), Error> {
        let sh = lock(&self.current).clone().ok_or(Error::NoSnapshot)?;
        sh.fail(Error::Cancelled);
        Ok(())
    }

    /// Starts the background copiers of the snapshot `begin()` set up:
    /// call it once the writers run again (so the threads it wakes do not
    /// compete with the pause). `wait()` calls it if nobody did. A no-op
    /// when there is nothing to start. If the supervisor thread cannot be
    /// had, the snapshot is rolled back (protections lifted, writers
    /// woken) and `wait()` returns the error too.
    pub fn start_copy(&self) -> Result<(), Error> {
        let mut sup = lock(&self.supervisor);
        let (standby, launch) = match sup.take() {
            Some(Pending::Ready(standby, launch)) => (standby, launch),
            other => {
                *sup = other;
                return Ok(());
            }
        };
        // Without a standby from `arm` (or if it died), start one now.
        let back = match standby {
            Some(s) => match s.launch(launch) {
                Ok(h) => {
                    *sup = Some(Pending::Running(h));
                    return Ok(());
                }
                Err(back) => back,
            },
            None => launch,
        };
        let (back, source) = match Standby::spawn(self.config.background_cpus.clone()) {
            Ok(s) => match s.launch(back) {
                Ok(h) => {
                    *sup = Some(Pending::Running(h));
                    return Ok(());
                }
                Err(back) => (
                    back,
                    std::io::Error::other("the supervisor thread exited before its plan"),
                ),
            },
            Err(e) => (back, e),
        };
        let (shared, plan) = *back;
        tear_down(&shared, plan.handler);
        let copy = std::io::Error::new(source.kind(), source.to_string());
        *sup = Some(Pending::Failed(Error::Spawn {
            phase: Phase::Worker,
            name: "snap-supervisor".into(),
            source,
        }));
        Err(Error::Spawn {
            phase: Phase::Worker,
            name: "snap-supervisor".into(),
            source: copy,
        })
    }

    /// Blocks until the snapshot in flight completes or is rolled back, and
    /// returns it. Afterwards a new `begin()` may run.
    pub fn wait(&self) -> Result<Snapshot, Error> {
        // Its failure is recorded for the match below.
        let _ = self.start_copy();
        let pending = lock(&self.supervisor).take().ok_or(Error::NoSnapshot)?;
        let res = match pending {
            Pending::Ready(..) => Err(Error::ThreadPanicked(
                "snapshot copiers were never started".into(),
            )),
            Pending::Failed(e) => Err(e),
            Pending::Done(snap) => Ok(*snap),
            Pending::Running(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(Error::ThreadPanicked("snap-supervisor".into()))),
        };
        self.active.store(false, Ordering::Release);
        *lock(&self.current) = None;
        res
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Threads must not outlive the engine: they read guest memory whose
        // lifetime the caller ties to `wait()`.
        self.disarm();
        if self.in_progress() {
            // (Stop-the-world has nothing to cancel: wait() just collects.)
            let _ = self.cancel();
            let _ = self.wait();
        }
    }
}

/// Rolls back a set-up (armed or begun, before the supervisor exists):
/// protections and registrations gone, handler stopped and joined.
fn tear_down(shared: &Shared, handler: JoinHandle<HandlerStats>) {
    shared.lift_all_protection();
    let _ = shared.release_regions();
    shared.handler_stop.signal();
    let _ = handler.join();
    if let Some(p) = &shared.parent {
        p.loader.stop_tracking();
        p.loader.detach();
    }
}

/// Sync-phase rollback: lift protection (waking any writer blocked on it)
/// and unregister. Errors are ignored: closing the uffd, which the caller
/// does next, clears all of it too.
fn undo_sync(uffd: &Uffd, regions: &[Region], registered_here: bool) {
    for r in regions {
        let _ = uffd.write_protect(r.host_addr, r.len, false, false);
        if registered_here {
            let _ = uffd.unregister(r.host_addr, r.len);
        }
    }
}
