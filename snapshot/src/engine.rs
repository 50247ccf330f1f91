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

use crate::sync::lock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::chunk_table::ChunkTable;
use crate::cpus::CpuSet;
use crate::error::{Error, Phase};
use crate::eventfd::EventFd;
use crate::fault_handler;
use crate::finished::Snapshot;
use crate::inject::{EnvInjection, FaultInjection};
use crate::memory::Pagemap;
use crate::metrics::{new_histogram, Counters, HandlerStats, Metrics, Progress, SyncMetrics};
use crate::persist::{ChunkEntry, ImageFile};
use crate::region::{Layout, Region, CHUNK_SIZE, PAGES_PER_CHUNK, PAGE_SIZE};
use crate::save::{examine, write_runs, Record};
use crate::shared::Shared;
use crate::staging::{StagingPool, DEFAULT_BUDGET};
use crate::supervisor::{self, Plan};
use crate::uffd::{feature, RegisterMode, Uffd};

/// How a snapshot is taken (DESIGN.md §2: the baselines live beside the
/// real thing). All engine strategies return the same `Snapshot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Write-protect per region (one PMD bit per 2 MiB chunk with THP),
    /// copy in the background, copy-first on write, chunk granularity.
    #[default]
    AsyncFork,
    /// Baseline (Firecracker, Cloud Hypervisor): `begin()` writes every
    /// populated page to the image itself, with `workers` threads, while
    /// the caller keeps the vCPUs paused; no protection at all. `wait()`
    /// returns at once.
    StopTheWorld,
    /// Baseline (QEMU background-snapshot): `begin()` write-protects every
    /// 4 KiB page with its own UFFDIO_WRITEPROTECT (cost grows with memory,
    /// and splits THP mappings), then one copier walks pages in order
    /// (writing each chunk's unclaimed pages together); a write fault saves
    /// just its 4 KiB page. `workers` is ignored (1).
    SyncWp,
    /// Baseline: the VMM process forks and the child writes memory. Needs
    /// process-level fork, so it is wired in the VMM, not here:
    /// `Engine::new` refuses it.
    Fork,
}

impl Strategy {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::AsyncFork => "async-fork",
            Strategy::StopTheWorld => "stop-the-world",
            Strategy::SyncWp => "sync-wp",
            Strategy::Fork => "fork",
        }
    }

    /// Parses `name()` back.
    pub fn from_name(s: &str) -> Option<Strategy> {
        [
            Strategy::AsyncFork,
            Strategy::StopTheWorld,
            Strategy::SyncWp,
            Strategy::Fork,
        ]
        .into_iter()
        .find(|x| x.name() == s)
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Engine configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Background copier threads (≥ 1).
    pub workers: usize,
    pub strategy: Strategy,
    pub injection: FaultInjection,
    /// Bytes write-protected per step when armed ahead of the pause
    /// ([`ARM_STEP`] by default; tests use small steps so that small
    /// regions take several).
    pub arm_step: u64,
    /// The VM's staging pool (staging.rs): where the fault path puts a
    /// unit before it is written. Populated by the first `arm`; share one
    /// between a VM's successive engines so it is allocated once.
    /// `StagingPool::new(0)` disables staging.
    pub staging: Arc<StagingPool>,
    /// Host CPUs for the supervisor and the copiers (cpus.rs says why);
    /// None leaves them wherever the scheduler puts them. A failure to pin
    /// only costs the placement (logged).
    pub background_cpus: Option<CpuSet>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            workers: 2,
            strategy: Strategy::AsyncFork,
            injection: FaultInjection::default(),
            arm_step: ARM_STEP,
            staging: Arc::new(StagingPool::new(DEFAULT_BUDGET)),
            background_cpus: None,
        }
    }
}

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

type SupervisorHandle = JoinHandle<Result<Snapshot, Error>>;

/// What a standby supervisor waits for.
type Launch = Box<(Arc<Shared>, Plan)>;

/// A supervisor thread waiting for its plan. Dropped unlaunched (disarm,
/// a failed `begin`), it is told there is none and joined.
#[derive(Debug)]
struct Standby {
    plan_tx: Option<mpsc::Sender<Launch>>,
    thread: Option<SupervisorHandle>,
}

impl Standby {
    /// `cpus`: where it and the workers it starts (which inherit its
    /// affinity) run.
    fn spawn(cpus: Option<CpuSet>) -> std::io::Result<Standby> {
        let (tx, rx) = mpsc::channel::<Launch>();
        let thread = std::thread::Builder::new()
            .name("snap-supervisor".into())
            .spawn(move || {
                if let Some(cpus) = cpus {
                    if let Err(e) = cpus.pin_current_thread() {
                        tracing::warn!("snapshot copiers not kept on CPUs {cpus}: {e}");
                    }
                }
                Self::wait_for_plan(rx)
            })?;
        Ok(Standby {
            plan_tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn wait_for_plan(rx: mpsc::Receiver<Launch>) -> Result<Snapshot, Error> {
        match rx.recv() {
            Ok(launch) => {
                let (shared, plan) = *launch;
                supervisor::run_guarded(shared, plan)
            }
            Err(_) => Err(Error::Cancelled),
        }
    }

    /// Hands the plan over; gives it back if the thread is gone.
    fn launch(mut self, launch: Launch) -> Result<SupervisorHandle, Launch> {
        let (Some(tx), Some(thread)) = (self.plan_tx.take(), self.thread.take()) else {
            return Err(launch);
        };
        match tx.send(launch) {
            Ok(()) => Ok(thread),
            Err(mpsc::SendError(back)) => {
                let _ = thread.join();
                Err(back)
            }
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        drop(self.plan_tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A begun snapshot not yet collected by `wait()`.
#[derive(Debug)]
enum Pending {
    /// Set up by `begin()`; the copiers start with `start_copy()` (or
    /// `wait()`), once the caller has resumed the writers.
    Ready(Option<Standby>, Launch),
    /// `start_copy()` could not start them; rolled back.
    Failed(Error),
    /// Background copy running under the supervisor thread.
    Running(JoinHandle<Result<Snapshot, Error>>),
    /// Stop-the-world: finished inside `begin()`.
    Done(Box<Snapshot>),
}

const UFFD_FEATURES: u64 = feature::PAGEFAULT_FLAG_WP;

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
        Uffd::new(UFFD_FEATURES).map_err(|source| Error::Uffd {
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

    /// Maps the VM's staging pool the first time (populated on a thread of
    /// its own once the workers run: staging.rs). A pool that cannot be
    /// had only costs fault latency (faults then write their unit
    /// themselves): logged. Returns how long that took (zero when it
    /// existed already).
    fn start_staging(&self, layout: &Layout) -> Duration {
        let t = Instant::now();
        let fail = self.config.injection.fail_staging;
        match self.config.staging.reserve(layout.total_bytes(), fail) {
            Ok(true) => t.elapsed(),
            Ok(false) => Duration::ZERO,
            Err(e) => {
                tracing::warn!(
                    "snapshot staging pool unavailable ({e}): write faults during snapshots will wait for the disk"
                );
                Duration::ZERO
            }
        }
    }

    /// First half of the sync phase: call with the writers still running,
    /// then pause them and call `begin` with the same image. It allocates
    /// the staging pool the first time, and for async-fork does everything
    /// `begin` would do that grows with memory — registering, and above all
    /// write-protecting every region — while the guest runs. Writes that
    /// land after a chunk was protected and before the pause fault as usual;
    /// the handler lets them through at once (no copy: the fork instant has
    /// not come yet) and notes the chunk, and `begin` protects just those
    /// chunks again. The pause then costs O(chunks written in between), not
    /// O(memory).
    ///
    /// Only the pool for sync-wp (its per-page protection in the pause is
    /// the baseline's cost); nothing for stop-the-world. If `begin` does not
    /// follow (the pause failed), call `disarm`; `begin` with other regions
    /// or another image disarms and takes the full path.
    ///
    /// # Safety
    /// As for `begin`, from this call on.
    pub unsafe fn arm(&self, regions: &[Region], image: &Arc<ImageFile>) -> Result<(), Error> {
        if self.in_progress() {
            return Err(Error::SnapshotInProgress);
        }
        let layout = Layout::new(regions)?;
        match self.config.strategy {
            Strategy::AsyncFork => {}
            Strategy::SyncWp => {
                self.start_staging(&layout);
                return Ok(());
            }
            Strategy::StopTheWorld | Strategy::Fork => return Ok(()),
        }
        let staging_alloc = self.start_staging(&layout);
        let t = Instant::now();
        let (shared, handler, mut m) = self.set_up(layout, image, CHUNK_SIZE, true)?;
        m.staging_alloc = staging_alloc;
        let standby = Standby::spawn(self.config.background_cpus.clone())
            .map_err(|e| tracing::debug!("supervisor starts in the pause instead: {e}"))
            .ok();
        m.arm = t.elapsed();
        *lock(&self.armed) = Some(Armed {
            regions: regions.to_vec(),
            image: image.clone(),
            shared,
            handler,
            sync: m,
            standby,
        });
        Ok(())
    }

    /// Undoes `arm` when no `begin` follows: protections and registrations
    /// gone, handler stopped, the staging pool back. No-op when not armed.
    pub fn disarm(&self) {
        if let Some(a) = lock(&self.armed).take() {
            tear_down(&a.shared, a.handler);
        }
    }

    /// The sync phase: the snapshot's instant. Call with every writer of
    /// the regions paused; returns as soon as protection is in place, after
    /// which writers may resume (then call `start_copy`). `image` receives
    /// the memory: it must be as long as the regions together. Nothing here
    /// is proportional to the number of pages; after `arm`, nothing is
    /// proportional to memory at all (stop-the-world writes everything
    /// here: that is the baseline).
    ///
    /// On error nothing is left behind: protections undone, registrations
    /// removed, no thread running.
    ///
    /// # Safety
    /// Each region's host range must be anonymous private memory mapped
    /// read-write, and must stay mapped (not munmapped or remapped) until
    /// `wait()` returns. Other discards must go through `before_discard`.
    pub unsafe fn begin(
        &self,
        regions: &[Region],
        image: &Arc<ImageFile>,
    ) -> Result<SyncMetrics, Error> {
        let t_total = Instant::now();
        let mut current = lock(&self.current);
        if current.is_some() || lock(&self.supervisor).is_some() {
            self.disarm();
            return Err(Error::SnapshotInProgress);
        }
        let armed = lock(&self.armed).take();
        let layout = match Layout::new(regions) {
            Ok(l) => l,
            Err(e) => {
                if let Some(a) = armed {
                    tear_down(&a.shared, a.handler);
                }
                return Err(e);
            }
        };
        if image.len() != layout.total_bytes() {
            if let Some(a) = armed {
                tear_down(&a.shared, a.handler);
            }
            return Err(Error::InvalidConfig(
                "the memory image's length differs from the regions'",
            ));
        }
        let unit = match self.config.strategy {
            Strategy::StopTheWorld => return self.begin_stop_the_world(layout, image, t_total),
            Strategy::SyncWp => PAGE_SIZE,
            Strategy::AsyncFork | Strategy::Fork => CHUNK_SIZE,
        };
        let (shared, handler, mut m, standby) = match armed {
            Some(a) if a.regions == regions && Arc::ptr_eq(&a.image, image) => {
                let mut m = SyncMetrics {
                    arm: a.sync.arm,
                    staging_alloc: a.sync.staging_alloc,
                    ..SyncMetrics::default()
                };
                let t = Instant::now();
                let reprotected = a.shared.reprotect_written_while_armed();
                m.write_protect = t.elapsed();
                match reprotected {
                    Ok(n) if !a.shared.is_aborted() => m.reprotected_chunks = n,
                    Ok(_) => {
                        tear_down(&a.shared, a.handler);
                        return Err(a.shared.take_error().unwrap_or(Error::Cancelled));
                    }
                    Err(e) => {
                        tear_down(&a.shared, a.handler);
                        return Err(e);
                    }
                }
                a.shared.armed.store(false, Ordering::Release);
                (a.shared, a.handler, m, a.standby)
            }
            other => {
                if let Some(a) = other {
                    tear_down(&a.shared, a.handler);
                }
                let (shared, handler, m) = self.set_up(layout, image, unit, false)?;
                (shared, handler, m, None)
            }
        };

        if self.config.injection.fail_sync {
            drop(standby);
            tear_down(&shared, handler);
            return Err(Error::Injected {
                phase: Phase::Sync,
                what: "sync-phase failure after write-protect".into(),
            });
        }

        let t = Instant::now();
        m.total = t_total.elapsed();
        let plan = Plan {
            workers: if unit == PAGE_SIZE {
                1
            } else {
                self.config.workers
            },
            handler,
            sync: m.clone(),
            resumed: Instant::now(),
        };
        // Handing the plan over wakes the supervisor, which starts the
        // copiers on the background CPUs: done from here, in the pause, the
        // woken threads could take this thread's CPU before it resumes the
        // writers (0.5-5.8 ms in `spawn` seen at 8 GiB). So the caller
        // starts them once the writers run (`start_copy`); until then the
        // fault handler copies whatever the writers touch.
        let launch: Launch = Box::new((shared.clone(), plan));
        *lock(&self.supervisor) = Some(Pending::Ready(standby, launch));
        m.spawn += t.elapsed();
        m.total = t_total.elapsed();
        *current = Some(shared);
        self.active.store(true, Ordering::Release);
        Ok(m)
    }

    /// Registers and protects `layout` with a running fault handler: the
    /// part of the sync phase `arm` moves out of the pause. With `armed`,
    /// the handler lets writes through (noting their chunks) until
    /// `Shared::armed` is cleared.
    fn set_up(
        &self,
        layout: Layout,
        image: &Arc<ImageFile>,
        unit: u64,
        armed: bool,
    ) -> Result<(Arc<Shared>, JoinHandle<HandlerStats>, SyncMetrics), Error> {
        let mut m = SyncMetrics::default();
        let pagemap = Pagemap::open()?;
        let uffd = Uffd::new(UFFD_FEATURES).map_err(|source| Error::Uffd {
            phase: Phase::Sync,
            source,
        })?;
        let sync_err = |source| Error::Uffd {
            phase: Phase::Sync,
            source,
        };

        let t = Instant::now();
        for (i, r) in layout.regions().iter().enumerate() {
            if let Err(e) = uffd.register(
                r.host_addr,
                r.len,
                RegisterMode::MISSING.union(RegisterMode::WP),
            ) {
                undo_sync(&uffd, &layout.regions()[..i]);
                return Err(sync_err(e));
            }
        }
        m.register = t.elapsed();

        let t = Instant::now();
        let table = ChunkTable::new(layout.total_chunks() * (CHUNK_SIZE / unit) as usize);
        m.table_init = t.elapsed();

        let (nudge, stop) = match (EventFd::new(), EventFd::new()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(source), _) | (_, Err(source)) => {
                undo_sync(&uffd, layout.regions());
                return Err(Error::Memory {
                    phase: Phase::Sync,
                    op: "eventfd",
                    start: 0,
                    len: 0,
                    source,
                });
            }
        };
        let staging = self.config.staging.lend(unit);
        let shared = Arc::new(Shared {
            layout,
            unit,
            table,
            image: image.clone(),
            pagemap,
            uffd,
            counters: Counters::default(),
            injection: self.config.injection.clone(),
            fault_copies: AtomicUsize::new(0),
            worker_copies: AtomicUsize::new(0),
            aborted: AtomicBool::new(false),
            all_copied: AtomicBool::new(false),
            error: Mutex::new(None),
            handler_nudge: nudge,
            handler_stop: stop,
            armed: AtomicBool::new(armed),
            written_while_armed: Mutex::new(Vec::new()),
            staging,
        });

        // The handler runs before anything is protected: with `armed` the
        // writers are running and fault as soon as protection lands.
        let t = Instant::now();
        let sh = shared.clone();
        let handler = match std::thread::Builder::new()
            .name("snap-faults".into())
            .spawn(move || fault_handler::run(sh))
        {
            Ok(h) => h,
            Err(source) => {
                undo_sync(&shared.uffd, shared.layout.regions());
                return Err(Error::Spawn {
                    phase: Phase::Sync,
                    name: "snap-faults".into(),
                    source,
                });
            }
        };
        m.spawn = t.elapsed();

        let t = Instant::now();
        // Whole chunks, so a step never splits a huge page's protection.
        let step = (self.config.arm_step.max(1)).div_ceil(CHUNK_SIZE) * CHUNK_SIZE;
        for r in shared.layout.regions() {
            // Async-fork: one call per region, or per ARM_STEP when armed
            // ahead of the pause. Sync-wp: one per page, as QEMU's
            // background-snapshot pays it.
            let mut at = r.host_addr;
            while at < r.host_addr + r.len {
                let len = if unit == PAGE_SIZE {
                    PAGE_SIZE
                } else if armed {
                    if at > r.host_addr {
                        std::thread::sleep(ARM_STEP_GAP);
                    }
                    step.min(r.host_addr + r.len - at)
                } else {
                    r.len
                };
                if let Err(e) = shared.uffd.write_protect(at, len, true, false) {
                    tear_down(&shared, handler);
                    return Err(sync_err(e));
                }
                at += len;
            }
        }
        m.write_protect = t.elapsed();
        Ok((shared, handler, m))
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

impl Engine {
    /// Stop-the-world: write every populated page to the image now, with
    /// `workers` threads (this one included), while the caller keeps
    /// writers paused.
    fn begin_stop_the_world(
        &self,
        layout: Layout,
        image: &Arc<ImageFile>,
        t_total: Instant,
    ) -> Result<SyncMetrics, Error> {
        let mut m = SyncMetrics::default();
        let pagemap = Pagemap::open()?;
        let n = layout.total_chunks();
        let t = Instant::now();
        let records: Vec<Mutex<Option<Record>>> = (0..n).map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let bytes = AtomicU64::new(0);
        let error: Mutex<Option<Error>> = Mutex::new(None);
        let failed = AtomicBool::new(false);
        let copier = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n || failed.load(Ordering::Relaxed) {
                return;
            }
            let res = if self.config.injection.fail_worker_copy_at == Some(i) {
                Err(Error::Injected {
                    phase: Phase::Worker,
                    what: format!("stop-the-world copy failure at chunk {i}"),
                })
            } else {
                let loc = layout.chunk(i);
                // A panic (a bug) fails this snapshot instead of the
                // caller, which holds the VM paused.
                crate::recover::catching(Phase::Sync, || {
                    let pop = pagemap.populated(loc.host_addr, PAGES_PER_CHUNK, Phase::Sync)?;
                    // SAFETY: chunk i is this thread's alone (claimed
                    // through `next`); the caller keeps every writer paused
                    // during begin() and the regions mapped (begin's
                    // contract), so its populated pages are readable and
                    // still.
                    let rec = unsafe { examine(loc.host_addr as *const u8, &pop) };
                    if rec == Record::Zero {
                        return Ok((rec, 0));
                    }
                    // SAFETY: as above.
                    let written =
                        unsafe { write_runs(image, loc.host_addr, loc.image_offset, &pop) }
                            .map_err(|source| Error::Write {
                                phase: Phase::Sync,
                                source,
                            })?;
                    Ok((rec, written))
                })
            };
            match res {
                Ok((rec, b)) => {
                    *lock(&records[i]) = Some(rec);
                    bytes.fetch_add(b, Ordering::Relaxed);
                }
                Err(e) => {
                    lock(&error).get_or_insert(e);
                    failed.store(true, Ordering::Relaxed);
                    return;
                }
            }
        };
        let workers = self.config.workers.min(n).max(1);
        std::thread::scope(|s| {
            for w in 1..workers {
                // A helper that cannot be spawned only costs speed: this
                // thread copies too.
                let _ = std::thread::Builder::new()
                    .name(format!("snap-stw-{w}"))
                    .spawn_scoped(s, copier);
            }
            copier();
        });
        m.copy = t.elapsed();
        if let Some(e) = lock(&error).take() {
            return Err(e);
        }
        if self.config.injection.fail_sync {
            return Err(Error::Injected {
                phase: Phase::Sync,
                what: "sync-phase failure after the copy".into(),
            });
        }
        m.total = t_total.elapsed();
        let chunks: Vec<ChunkEntry> = records
            .into_iter()
            .map(
                |r| match r.into_inner().unwrap_or_else(|p| p.into_inner()) {
                    Some(Record::Data(crc)) => ChunkEntry { zero: false, crc },
                    _ => ChunkEntry { zero: true, crc: 0 },
                },
            )
            .collect();
        let metrics = Metrics {
            sync: m.clone(),
            copy_total: Duration::ZERO,
            finish: Duration::ZERO,
            unit_size: CHUNK_SIZE,
            chunks_total: n,
            chunks_by_workers: n as u64,
            chunks_by_fault_path: 0,
            chunks_by_hook: 0,
            chunks_staged: 0,
            direct_fault_writes: 0,
            zero_chunks: chunks.iter().filter(|c| c.zero).count() as u64,
            bytes_written: bytes.into_inner(),
            wp_faults: 0,
            missing_faults: 0,
            fault_latency_ns: new_histogram(),
            staging_bytes: 0,
            staging_peak_bytes: 0,
            workers,
            direct_io: image.is_direct(),
        };
        *lock(&self.supervisor) = Some(Pending::Done(Box::new(Snapshot {
            layout,
            chunks,
            metrics,
        })));
        Ok(m)
    }
}

/// Rolls back a set-up (armed or begun, before the supervisor exists):
/// protections and registrations gone, handler stopped and joined.
fn tear_down(shared: &Shared, handler: JoinHandle<HandlerStats>) {
    undo_sync(&shared.uffd, shared.layout.regions());
    shared.handler_stop.signal();
    let _ = handler.join();
}

/// Sync-phase rollback: lift protection (waking any writer blocked on it)
/// and unregister. Errors are ignored: closing the uffd, which the caller
/// does next, clears all of it too.
fn undo_sync(uffd: &Uffd, regions: &[Region]) {
    for r in regions {
        let _ = uffd.write_protect(r.host_addr, r.len, false, false);
        let _ = uffd.unregister(r.host_addr, r.len);
    }
}
