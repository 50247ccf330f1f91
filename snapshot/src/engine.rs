//! The engine: the VMM's entry points (`begin`, `before_write`,
//! `before_discard`, `cancel`, `wait`, `progress`).
//!
//! # Sync phase (`begin`, writers paused) is O(regions + chunks)
//! Measured on this kernel (examples/uffd_probe.rs, 1 GiB populated):
//! UFFDIO_WRITEPROTECT takes 92 µs on THP memory (one PMD bit per chunk) and
//! 18.5 ms on 4 KiB-backed memory (one PTE per page) — so regions are
//! protected with one ioctl each and the memory must be THP-backed for the
//! pause to stay flat. UFFDIO_REGISTER costs ~7 µs per region. The
//! destination is a prepared/kept mapping taken from the engine's pool, or
//! an untouched MAP_NORESERVE mapping (O(1) either way); the chunk table is
//! one byte per chunk. Measured at 8 GiB: 0.6–0.8 ms in all (table below).
//!
//! # `arm`: the protection moves out of the pause
//! At 8 GiB on the nested hosts here the write-protect grew to 1.1–1.9 ms
//! (the shadow MMU's invalidation behind each PMD change), most of the
//! pause, and splitting it across threads made it slower (1.8–4.8 ms). So
//! `arm` registers and protects everything while the writers still run;
//! a write fault before the pause is let through at once and its chunk
//! noted, and `begin` protects only those chunks again. Correctness: a
//! chunk not noted has not been written since its protection landed, so it
//! holds its value at the fork instant; a noted one is protected again
//! while the writers are paused (every fault answered before they could
//! acknowledge the pause, and the note is taken before the answer).
//!
//! # Never-touched pages: MODE_MISSING, not WP_UNPOPULATED
//! A WP-only registration does not see the first write to a page with no
//! page-table entry (measured: no event). UFFD_FEATURE_WP_UNPOPULATED makes
//! it trap, but write-protecting 1 GiB of never-touched memory then costs
//! 5.5 ms (the kernel allocates page tables and writes a marker per 4 KiB
//! page: proportional to size, in the pause) and those chunks come back
//! 4 KiB-mapped (AnonHugePages 0 after). So regions are registered
//! MISSING|WP for the snapshot's lifetime instead: a first touch traps to
//! the handler, which copies the chunk first (copiers read only pages that
//! pagemap shows populated, ~1.8 µs per chunk, so they never trip MISSING
//! themselves) and then maps a zero page. Cost: first touches of new pages
//! during the snapshot take a handler round trip and map 4 KiB pages; it
//! ends when the regions are unregistered after the last chunk is copied.
//!
//! # Destination preparation
//! Measured per 2 MiB chunk (earlier, on warm memory): copy into cold
//! destination 166 µs, warm 111 µs, MADV_POPULATE_WRITE alone 94 µs.
//! Pre-populating everything in begin() would be O(size) in the pause (and
//! waste memory on never-touched chunks). So each copier populates its
//! destination chunk with MADV_POPULATE_WRITE right before copying, only if
//! the source chunk has a populated page: never-touched chunks cost no
//! memory, and an allocation failure is an error code (→ rollback) rather
//! than an OOM kill inside memcpy.
//!
//! ## Fresh memory is the whole cost here: prepare and keep the destination
//! The machines here are themselves VMs (Firecracker, nested PVM) with free
//! page reporting (`page_reporting.page_reporting_order=11` on the kernel
//! command line): memory the kernel frees goes back to the outer host within
//! seconds, and the next touch of it faults in the outer host, 4 KiB at a
//! time. `examples/mem_probe.rs` (1 GiB, THP, 1 thread): MADV_POPULATE_WRITE
//! of memory idle for 6 s takes 2.0–4.9 s/GiB; of memory freed a moment ago
//! 35–90 ms/GiB (the "90 ms/GiB" seen at 1–3 GiB: back-to-back runs reuse
//! what the previous run freed). A profile of `bench 4096 2 1` (`perf
//! record -e cpu-clock -g`) is 96.7 % `clear_page_erms` under
//! `madvise(MADV_POPULATE_WRITE)` → `do_huge_pmd_anonymous_page`, 0.9 %
//! memcpy; /proc/vmstat over the run: compact_stall 0, thp_fault_fallback 0,
//! compact_fail 0. So not compaction: that only appears when source,
//! destination and page cache together exceed free memory (8 + 8 GiB here:
//! compact_stall 1563, thp_fault_fallback 279 over a run whose snapshots
//! still copied at 14–21 GiB/s, so the stalls hit the preparation below). Missing faults were 1–2 k per
//! 4 GiB snapshot, each a 4 KiB UFFDIO_COPY: not a storm.
//!
//! So the engine can take destination memory that is already backed:
//! `Engine::prepare_destination(bytes)` maps and populates it ahead of time
//! (off the vCPU path, O(size), slow on fresh memory), and
//! `Config::keep_destination` hands a dropped snapshot's memory back to the
//! engine for the next snapshot (memory kept mapped is not reported, so it
//! stays fast). `begin()` takes it in O(1). A reused destination may hold the
//! previous image: copiers zero the never-populated pages of a chunk they
//! copy and MADV_DONTNEED the destination of zero chunks. A sync-phase
//! failure gives the untouched destination back to the pool.
//!
//! Measured with `examples/bench.rs` (async-fork, 1 writer, 75 % populated
//! before the snapshot; the writer first-touches the rest; 2 cores shared
//! with other jobs, so ±30 %). "GiB/s" is bytes copied / copy time.
//!
//! | command (`bench …`) | sync phase | copy | fault p50 / p99 |
//! | --- | --- | --- | --- |
//! | `4096 1 1` fresh memory (before) | 0.40 ms | 7.55 s, 0.41 GiB/s | 7 µs / 15.2 ms |
//! | `4096 2 1` fresh memory (before) | 0.44 ms | 8.11 s, 0.38 GiB/s | 6 µs / 29.2 ms |
//! | `8192 2 1` fresh memory (before) | 0.59 ms | 14.0 s, 0.43 GiB/s | 13 µs / 23.1 ms |
//! | `1024 1 1` just-freed memory (before) | 0.25 ms | 158 ms, 6.4 GiB/s | 180 µs / 4.3 ms |
//! | `1024 1 1 prepare=1 keep=1` | 0.18–0.27 ms | 64–70 ms, 14–16 GiB/s | 121–141 µs / 0.9–3.9 ms |
//! | `1024 2 1 prepare=1 keep=1` | 0.21–0.25 ms | 64–95 ms, 11–16 GiB/s | 114–160 µs / 5.7–8.0 ms |
//! | `4096 1 1 prepare=1 keep=1` | 0.42–0.47 ms | 0.53–0.59 s, 6.8–7.5 GiB/s | 122 µs / 4.0–4.2 ms |
//! | `4096 2 1 prepare=1 keep=1` | 0.37–0.40 ms | 0.37–0.40 s, 9.9–10.9 GiB/s | 120 µs / 4.3–7.7 ms |
//! | `4096 2 1 pop=50 keep=1 repeat=3` | 0.40–0.48 ms | 1st 8.98 s (0.44 GiB/s), then 0.17–0.20 s (20–24 GiB/s) | 1st 9.2 ms / 41 ms, then 150 µs / 0.3–3.4 ms |
//! | `8192 2 1 prepare=1 keep=1 repeat=3` | 0.64–0.80 ms | 0.38–0.58 s, 14–21 GiB/s | 134–159 µs / 0.35–4.2 ms |
//! | `8192 1 1 prepare=1 keep=1 repeat=2` | 0.66–0.90 ms | 0.53–0.68 s, 12–15 GiB/s | 121–128 µs / 0.37–0.63 ms |
//! | `4096 1 0 prepare=1 keep=1 repeat=2` (no writer) | 0.26–0.40 ms | 0.21–0.51 s, 5.9–14 GiB/s | – |
//! | `4096 2 0 prepare=1 keep=1 repeat=2` (no writer) | 0.27–0.39 ms | 0.19 s, 16 GiB/s | – |
//!
//! `prepare_destination` itself: 4 GiB 8–23 s and 8 GiB 34 s on fresh
//! memory (0.17–0.5 GiB/s, with a writer running), 1 GiB 0.15 s on
//! just-freed memory. Fault p99 in the prepared runs is scheduling (two
//! workers, the handler and the writer on 2 shared cores), p50 is one 2 MiB
//! chunk copy. Without preparation the first snapshot still pays the fresh
//! memory (and a fault that lands on an uncopied chunk pays one cold 2 MiB
//! populate, 5–10 ms): the VMM should prepare at boot, or keep.
//!
//! Without a prepared or kept destination, the fault path no longer pays
//! that populate: it copies into a warm staging slot and a worker moves the
//! chunk later (staging.rs). The workers still populate cold memory.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::chunk_table::ChunkTable;
use crate::cpus::CpuSet;
use crate::error::{Error, Phase};
use crate::eventfd::EventFd;
use crate::fault_handler;
use crate::inject::{EnvInjection, FaultInjection};
use crate::memory::{copy_unit, DestPool, Destination, Pagemap, PrepareControl};
use crate::metrics::{new_histogram, Counters, HandlerStats, Metrics, Progress, SyncMetrics};
use crate::region::{Layout, Region, CHUNK_SIZE, PAGES_PER_CHUNK, PAGE_SIZE};
use crate::shared::Shared;
use crate::snapshot::Snapshot;
use crate::staging::{StagingSlots, DEFAULT_STAGING_SLOTS};
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
    /// Baseline (Firecracker, Cloud Hypervisor): `begin()` copies every
    /// populated page itself, with `workers` threads, while the caller keeps
    /// the vCPUs paused; no protection at all. `wait()` returns at once.
    StopTheWorld,
    /// Baseline (QEMU background-snapshot): `begin()` write-protects every
    /// 4 KiB page with its own UFFDIO_WRITEPROTECT (cost grows with memory,
    /// and splits THP mappings), then one copier walks pages in order; a
    /// write fault copies just its 4 KiB page. `workers` is ignored (1).
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
    /// Keep the destination memory when a snapshot is dropped and reuse it
    /// for the next one (module docs, "Destination preparation"): later
    /// snapshots copy at memory speed instead of paying the first touch of
    /// fresh memory, at the price of holding one guest-sized buffer between
    /// snapshots. `Engine::release_destination` gives it back.
    pub keep_destination: bool,
    /// Bytes write-protected per step when armed ahead of the pause
    /// ([`ARM_STEP`] by default; tests use small steps so that small
    /// regions take several).
    pub arm_step: u64,
    /// Warm 2 MiB slots the fault path copies into when the destination is
    /// fresh (staging.rs), populated by the first `arm`. Share one between
    /// a VM's successive engines so they are prepared once;
    /// `StagingSlots::new(0)` disables staging.
    pub staging: Arc<StagingSlots>,
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
            keep_destination: false,
            arm_step: ARM_STEP,
            staging: Arc::new(StagingSlots::new(DEFAULT_STAGING_SLOTS)),
            background_cpus: None,
        }
    }
}

/// Armed ahead of the pause, guest RAM is write-protected this much at a
/// time, with [`ARM_STEP_GAP`] between steps. On shadow-paging hosts (nested
/// KVM here) a vCPU makes no progress while the protection of its memory
/// changes, so one 8 GiB call stalled the guest for the whole 2-6 ms of it;
/// in steps it runs in between, and the pause re-protects the few chunks it
/// wrote (7-66 at 8 GiB). The guest's own stall across the pause, 8 GiB THP,
/// 3 A/B runs each: part before the fork instant 1.8-5.2 ms -> 0.2-0.7 ms,
/// whole stall 2.5-30 ms -> 0.8-3.7 ms; arming takes 9-18 ms instead of
/// 2-6 (the snapshot starts that much later; the guest runs meanwhile).
/// 64 MiB steps were worse (35-100 ms armed, up to 205 chunks to
/// re-protect in the pause). docs/BENCHMARKS.md, 2026-12-02.
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
    /// Prepared or kept destination memory for the next snapshot.
    pool: Arc<DestPool>,
    /// Set between `arm` and `begin` (or `disarm`).
    armed: Mutex<Option<Armed>>,
}

/// Protection set up ahead of the pause by `arm`.
#[derive(Debug)]
struct Armed {
    regions: Vec<Region>,
    shared: Arc<Shared>,
    handler: JoinHandle<HandlerStats>,
    sync: SyncMetrics,
    /// The supervisor thread, created now rather than in the pause (0.06–
    /// 0.32 ms of it measured); None if it could not be created (`begin`
    /// then creates it).
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
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
                    pool: Arc::default(),
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
            pool: Arc::default(),
            armed: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Destination memory for a snapshot of `layout` (pooled or fresh).
    fn destination(&self, layout: &Layout) -> Result<Destination, Error> {
        let mut dest = Destination::from_pool(
            &self.pool,
            layout.total_bytes(),
            self.config.keep_destination,
        )?;
        dest.inject_populate_failure(self.config.injection.fail_populate_at);
        Ok(dest)
    }

    /// Makes destination memory for a snapshot of `bytes` of guest RAM ready
    /// now (mapped and populated), so the next snapshot's copiers only copy.
    /// O(bytes) and slow on fresh memory here (seconds per GiB, see
    /// module docs, "Destination preparation"): call it off the vCPU path, e.g. on a
    /// thread after boot or after the previous snapshot was persisted. Does
    /// not pause or touch the running VM. Refused while a snapshot is in
    /// flight. On error (ENOMEM) nothing is kept and snapshots work as
    /// before (populating as they copy).
    pub fn prepare_destination(&self, bytes: u64) -> Result<(), Error> {
        if self.in_progress() {
            return Err(Error::SnapshotInProgress);
        }
        self.pool
            .prepare(bytes, self.config.injection.fail_prepare_at)
    }

    /// Prepares the destination of the next snapshot of `regions` now,
    /// while the guest runs and nothing is protected: the chunks of guest RAM
    /// that hold data (have a populated page) get their destination chunk
    /// populated, so that after the fork the copiers and the fault path
    /// copy into warm memory instead of first-touching fresh memory (module
    /// docs, "Destination preparation"). O(populated memory), at the host's
    /// rate for fresh memory; the pause is not affected. Chunks populated in
    /// the guest after this call are populated by their copier, as without
    /// it. Kept for the next `begin` (O(1) there); given back to the kernel
    /// after that snapshot unless `keep_destination`.
    ///
    /// `control` cancels between chunks and reports progress. On error
    /// (ENOMEM, cancelled) nothing is kept and nothing about the VM changed.
    pub fn prepare_for(&self, regions: &[Region], control: &PrepareControl) -> Result<(), Error> {
        if self.in_progress() {
            return Err(Error::SnapshotInProgress);
        }
        let layout = Layout::new(regions)?;
        let pagemap = Pagemap::open()?;
        let mut offsets = Vec::new();
        for i in 0..layout.total_chunks() {
            let loc = layout.chunk(i);
            let pages = pagemap.populated(loc.host_addr, PAGES_PER_CHUNK, Phase::Prepare)?;
            if pages.iter().any(|&p| p) {
                offsets.push(loc.dest_offset);
            }
        }
        control
            .total
            .store(offsets.len() as u64 * CHUNK_SIZE, Ordering::Relaxed);
        if self.config.injection.hold_prepare {
            while !control.cancel.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.pool.prepare_chunks(
            layout.total_bytes(),
            &offsets,
            self.config.injection.fail_prepare_at,
            control,
        )
    }

    /// Bytes of destination mapping held for the next snapshot.
    pub fn kept_destination_bytes(&self) -> u64 {
        self.pool.kept_bytes()
    }

    /// Gives prepared or kept destination memory back to the kernel.
    pub fn release_destination(&self) {
        self.pool.release();
    }

    /// Optional first half of the sync phase, for async-fork: call with the
    /// writers still running, then pause them and call `begin`. Everything
    /// `begin` would do that grows with memory — registering, and above all
    /// write-protecting every region (1.1–1.9 ms at 8 GiB on these hosts,
    /// most of the pause) — happens here while the guest runs. Writes that
    /// land after a chunk was protected and before the pause fault as usual;
    /// the handler lets them through at once (no copy: the fork instant has
    /// not come yet) and notes the chunk, and `begin` protects just those
    /// chunks again. The pause then costs O(chunks written in between), not
    /// O(memory).
    ///
    /// A no-op for the other strategies. If `begin` does not follow (the
    /// pause failed), call `disarm`; `begin` with other regions disarms and
    /// takes the full path.
    ///
    /// # Safety
    /// As for `begin`, from this call on.
    pub unsafe fn arm(&self, regions: &[Region]) -> Result<(), Error> {
        if self.config.strategy != Strategy::AsyncFork {
            return Ok(());
        }
        if self.in_progress() {
            return Err(Error::SnapshotInProgress);
        }
        let t = Instant::now();
        let layout = Layout::new(regions)?;
        // The first time: ~5 ms per slot on fresh memory here, with the
        // writers running and nothing protected yet. Not needed when the
        // destination is prepared or kept (the fault path stages only into
        // fresh destinations), and that is when fresh memory is slowest:
        // right after a preparation, 16 slots took ~120 ms of `arm`.
        if self.pool.kept_bytes() < layout.total_bytes() {
            self.config.staging.prepare(layout.total_chunks());
        }
        let (shared, handler, mut m) = self.set_up(layout, CHUNK_SIZE, true)?;
        let standby = Standby::spawn(self.config.background_cpus.clone())
            .map_err(|e| tracing::debug!("supervisor starts in the pause instead: {e}"))
            .ok();
        m.arm = t.elapsed();
        *lock(&self.armed) = Some(Armed {
            regions: regions.to_vec(),
            shared,
            handler,
            sync: m,
            standby,
        });
        Ok(())
    }

    /// Undoes `arm` when no `begin` follows: protections and registrations
    /// gone, handler stopped, the untouched destination back in the pool
    /// (with `keep_destination`) or unmapped. No-op when not armed.
    pub fn disarm(&self) {
        if let Some(a) = lock(&self.armed).take() {
            tear_down(&a.shared, a.handler);
        }
    }

    /// The sync phase. Call with every writer of the regions paused; returns
    /// as soon as protection is in place and the copiers are started, after
    /// which writers may resume. Nothing here is proportional to the number
    /// of pages; after `arm`, nothing is proportional to memory at all.
    ///
    /// On error nothing is left behind: protections undone, registrations
    /// removed, no thread running.
    ///
    /// # Safety
    /// Each region's host range must be anonymous private memory mapped
    /// read-write, and must stay mapped (not munmapped or remapped) until
    /// `wait()` returns. Other discards must go through `before_discard`.
    pub unsafe fn begin(&self, regions: &[Region]) -> Result<SyncMetrics, Error> {
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
        let unit = match self.config.strategy {
            Strategy::StopTheWorld => return self.begin_stop_the_world(layout, t_total),
            Strategy::SyncWp => PAGE_SIZE,
            Strategy::AsyncFork | Strategy::Fork => CHUNK_SIZE,
        };
        let (shared, handler, mut m, standby) = match armed {
            Some(a) if a.regions == regions => {
                let mut m = SyncMetrics {
                    arm: a.sync.arm,
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
                let (shared, handler, m) = self.set_up(layout, unit, false)?;
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
        unit: u64,
        armed: bool,
    ) -> Result<(Arc<Shared>, JoinHandle<HandlerStats>, SyncMetrics), Error> {
        let mut m = SyncMetrics::default();
        let t = Instant::now();
        let dest = Arc::new(self.destination(&layout)?);
        m.dest_alloc = t.elapsed();
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
        // Only a fresh destination needs them; with sync-wp the fault path
        // copies 4 KiB units.
        let staging = if unit == CHUNK_SIZE && dest.is_fresh() {
            self.config.staging.lend()
        } else {
            None
        };
        let shared = Arc::new(Shared {
            layout,
            unit,
            table,
            dest,
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

    /// Copy-first hook for the VMM's own writes into guest RAM (device
    /// emulation): call before writing `[guest_addr, +len)`. Returns once
    /// the chunks involved are in the snapshot, copying them on this thread
    /// if nobody has yet. Without it the VMM thread would fault on its own
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

    /// Copy-first hook for discards (MADV_DONTNEED, balloon): call before
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
            bytes_copied: Counters::get(&sh.counters.bytes_copied),
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
    /// Stop-the-world: copy every populated page now, with `workers`
    /// threads (this one included), while the caller keeps writers paused.
    fn begin_stop_the_world(&self, layout: Layout, t_total: Instant) -> Result<SyncMetrics, Error> {
        let mut m = SyncMetrics::default();
        let t = Instant::now();
        let dest = Arc::new(self.destination(&layout)?);
        m.dest_alloc = t.elapsed();
        let pagemap = Pagemap::open()?;
        let n = layout.total_chunks();
        let t = Instant::now();
        let zero: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
        let next = AtomicUsize::new(0);
        let bytes = AtomicU64::new(0);
        let populated = AtomicU64::new(0);
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
                    // SAFETY: chunk i is this thread's alone (claimed
                    // through `next`); the caller keeps every writer paused
                    // during begin() and the regions mapped (begin's
                    // contract); the destination is sized to the layout.
                    unsafe {
                        copy_unit(
                            &pagemap,
                            &dest,
                            loc.host_addr,
                            loc.dest_offset,
                            PAGES_PER_CHUNK,
                            Phase::Sync,
                        )
                    }
                })
            };
            match res {
                Ok((z, b)) => {
                    zero[i].store(z, Ordering::Relaxed);
                    bytes.fetch_add(b, Ordering::Relaxed);
                    if !z {
                        populated.fetch_add(1, Ordering::Relaxed);
                    }
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
        let zero: Vec<bool> = zero.into_iter().map(AtomicBool::into_inner).collect();
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
            zero_chunks: zero.iter().filter(|z| **z).count() as u64,
            bytes_copied: bytes.into_inner(),
            wp_faults: 0,
            missing_faults: 0,
            fault_latency_ns: new_histogram(),
            peak_extra_memory: populated.into_inner() * CHUNK_SIZE,
            workers,
        };
        *lock(&self.supervisor) = Some(Pending::Done(Box::new(Snapshot {
            dest,
            layout,
            zero,
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
