//! Snapshots of a running VM (DESIGN.md §2): [`Vm::start_snapshot`] first
//! has the snapshot thread prepare the snapshot's memory while the guest
//! runs (`SnapshotRequest::prepare`, state `Preparing`); then
//! [`Vm::fork_prepared`], called by the VM's owner, runs the sync phase
//! (pause vCPUs, capture VM state, `Engine::begin` over guest RAM, resume,
//! start the copiers) and returns as soon as the guest runs again; the
//! snapshot thread then waits for the engine's copy and persists the
//! snapshot atomically with [`snapshot::write_snapshot`]. [`Vm::snapshot`]
//! does both, blocking through the preparation. One snapshot is in flight
//! per VM: from the request until it is persisted (or failed).
//!
//! A failure at any point rolls back through the engine (which lifts every
//! protection) and leaves the VM running; the handle records why.
//!
//! `Strategy::Fork` (the baseline the engine does not do) is wired here, in
//! [`fork`]: the sync phase forks the VMM process and the child writes the
//! snapshot directory from its copy-on-write image of guest RAM.
//!
//! The metrics of a finished snapshot are also written as `metrics.json`
//! inside the snapshot directory, after it was renamed into place: the
//! file is not part of the checksummed format and the reader ignores it.

mod fork;
pub mod restore_cli;
pub mod trigger;

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use snapshot::persist::WriteSummary;
use snapshot::{
    BackgroundPriority, Config, Engine, FaultInjection, Metrics, PrepareControl, Region,
    StagingSlots, Strategy, SyncMetrics, WriteOptions, CHUNK_SIZE,
};

use crate::vcpu_control::PauseError;
use crate::vm::Vm;
use crate::vmstate::{VcpuState, VmStateError};

/// File with the metrics of a finished snapshot, inside its directory.
pub const METRICS_FILE: &str = "metrics.json";

/// What to snapshot and how.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    /// Target directory (created atomically; see `overwrite`).
    pub dir: PathBuf,
    pub mode: Strategy,
    /// Background copier threads (async-fork) or copiers in the pause
    /// (stop-the-world); sync-wp always uses one, fork one child process.
    pub workers: usize,
    /// Replace an existing snapshot directory atomically.
    pub overwrite: bool,
    /// Test hook: make the engine fail on purpose (rollback tests).
    pub injection: FaultInjection,
    /// Test hook: while the vCPUs are paused, checksum every 2 MiB chunk of
    /// guest RAM (O(memory) in the pause: for tests only), so the persisted
    /// image can be compared bit for bit. See
    /// [`SnapshotHandle::sync_checksums`].
    pub capture_checksums: bool,
    /// Keep the engine's destination memory after this snapshot and reuse
    /// it for the next one with the same mode and workers, so later
    /// snapshots copy at memory speed instead of first-touching fresh
    /// memory (the engine docs measure the difference), at the price of a
    /// guest-sized buffer held between snapshots.
    pub keep_memory: bool,
    /// Scheduling of the persist thread (`snapshot::priority`): normal by
    /// default; idle lets the guest's vCPUs win every contended core while
    /// the image is written, but starves the writer on a host whose cores
    /// the guest saturates. The engine's copiers keep normal priority: a vCPU
    /// write fault on a chunk a copier holds waits for that copier, and an
    /// idle copier starved by other load turned such waits into
    /// 0.3-1.4 s stalls (docs/BENCHMARKS.md). The fork baseline's child is
    /// left as it is.
    pub priority: BackgroundPriority,
    /// Populate the snapshot's memory before the fork (engine modes; the
    /// fork baseline has none): the guest keeps running unprotected while
    /// the chunks that hold data get their destination allocated, then the
    /// sync phase runs and the copy goes into warm memory. The snapshot is
    /// of the moment of the pause, after the preparation, not of the
    /// request. On a host where fresh memory is slow (here: the outer
    /// hypervisor backs it, 0.3-1 GiB/s) this moves that cost from the
    /// write-protected copy window, where every guest write fault waits on
    /// it, to before the fork (engine.rs, "Destination preparation").
    pub prepare: bool,
}

impl SnapshotRequest {
    /// Async-fork with two workers into `dir`, no overwrite.
    pub fn new(dir: impl Into<PathBuf>) -> SnapshotRequest {
        SnapshotRequest {
            dir: dir.into(),
            mode: Strategy::AsyncFork,
            workers: 2,
            overwrite: false,
            injection: FaultInjection::default(),
            capture_checksums: false,
            keep_memory: false,
            priority: BackgroundPriority::default(),
            prepare: true,
        }
    }
}

/// Why a snapshot could not be started (the VM keeps running).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot in progress")]
    InProgress,
    #[error("snapshot strategy {0} is not supported by snapvm yet")]
    Unsupported(Strategy),
    #[error("invalid snapshot request: {0}")]
    Invalid(String),
    #[error("cannot pause the VM for a snapshot: {0}")]
    Pause(#[from] PauseError),
    #[error("cannot pause the devices for a snapshot: {0}")]
    Devices(crate::vm::VmError),
    #[error("cannot capture the VM state: {0}")]
    State(#[from] VmStateError),
    #[error("snapshot engine: {0}")]
    Engine(#[from] snapshot::Error),
    #[error("cannot start the snapshot thread: {0}")]
    Spawn(std::io::Error),
    #[error("snapshot failed: {0}")]
    Failed(String),
}

/// Where a snapshot is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotState {
    /// Populating the snapshot's memory before the fork (the guest runs,
    /// nothing is protected yet).
    Preparing,
    /// The engine is copying guest memory (the guest runs).
    Copying,
    /// Memory copied; writing the snapshot directory.
    Persisting,
    Done,
    Failed(String),
}

impl SnapshotState {
    pub fn is_finished(&self) -> bool {
        matches!(self, SnapshotState::Done | SnapshotState::Failed(_))
    }

    pub fn name(&self) -> &'static str {
        match self {
            SnapshotState::Preparing => "preparing",
            SnapshotState::Copying => "copying",
            SnapshotState::Persisting => "persisting",
            SnapshotState::Done => "done",
            SnapshotState::Failed(_) => "failed",
        }
    }
}

/// Live progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotProgress {
    pub state: SnapshotState,
    /// Copy units settled (2 MiB chunks; 4 KiB pages for sync-wp).
    pub chunks_done: usize,
    pub chunks_total: usize,
    pub bytes_copied: u64,
    /// Persisting: bytes written of the total.
    pub bytes_written: u64,
    pub bytes_to_write: u64,
    /// Preparing: bytes of snapshot memory populated of the total (the
    /// total is known once the populated chunks were counted).
    pub bytes_prepared: u64,
    pub bytes_to_prepare: u64,
}

/// The preparation before the fork ([`SnapshotRequest::prepare`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct PrepareMetrics {
    pub elapsed: Duration,
    /// Snapshot memory populated (the chunks that held data).
    pub bytes: u64,
}

/// The sync phase as the VM saw it (the vCPUs are paused from the start of
/// `pause` to the end of `resume`).
#[derive(Debug, Clone, Default)]
pub struct SyncPhase {
    /// Kicking every vCPU out of KVM_RUN until all are held.
    pub pause: Duration,
    /// `save_state` + encode.
    pub state_capture: Duration,
    /// Test-only chunk checksums (zero unless requested).
    pub checksums: Duration,
    /// `Engine::begin` as a whole (register + write-protect + ...; the whole
    /// copy for stop-the-world).
    pub begin: Duration,
    /// The engine's own breakdown of `begin`.
    pub engine: SyncMetrics,
    /// Releasing the vCPUs.
    pub resume: Duration,
    /// From the pause request until `resume` returned: the guest's stall.
    pub total: Duration,
    /// vCPU 0's TSC as captured in the pause: a guest-clock instant inside
    /// it, to find the guest's own stall across the pause (`ProbeBlock`
    /// gap log). None if the state has no TSC MSR.
    pub guest_tsc: Option<u64>,
}

/// Everything measured about one snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotMetrics {
    pub strategy: Strategy,
    pub workers: usize,
    /// Scheduling of the persist thread.
    pub priority: BackgroundPriority,
    /// None without preparation.
    pub prepare: Option<PrepareMetrics>,
    pub sync: SyncPhase,
    /// The engine's final numbers (copy time, chunks by path, faults).
    pub engine: Option<Metrics>,
    /// From the end of the sync phase until `wait()` returned.
    pub copy_wait: Duration,
    pub persist: Option<WriteSummary>,
    /// From the request until the snapshot was persisted or failed.
    pub total: Duration,
}

impl SnapshotMetrics {
    fn new(strategy: Strategy, workers: usize, priority: BackgroundPriority) -> SnapshotMetrics {
        SnapshotMetrics {
            strategy,
            workers,
            priority,
            prepare: None,
            sync: SyncPhase::default(),
            engine: None,
            copy_wait: Duration::ZERO,
            persist: None,
            total: Duration::ZERO,
        }
    }

    /// One JSON object (hand-written: no serde_json in the VMM).
    pub fn to_json(&self) -> String {
        fn us(d: Duration) -> String {
            format!("{:.1}", d.as_secs_f64() * 1e6)
        }
        let s = &self.sync;
        let e = &s.engine;
        let mut out = format!(
            "{{\"strategy\":\"{}\",\"workers\":{},\"priority\":\"{}\",\"sync_us\":{{\"total\":{},\"pause\":{},\"state_capture\":{},\"checksums\":{},\"begin\":{},\"dest_alloc\":{},\"register\":{},\"write_protect\":{},\"table_init\":{},\"stw_copy\":{},\"spawn\":{},\"resume\":{},\"arm\":{}}},\"reprotected_chunks\":{},\"copy_wait_us\":{},\"total_us\":{}",
            self.strategy,
            self.workers,
            self.priority.name(),
            us(s.total),
            us(s.pause),
            us(s.state_capture),
            us(s.checksums),
            us(s.begin),
            us(e.dest_alloc),
            us(e.register),
            us(e.write_protect),
            us(e.table_init),
            us(e.copy),
            us(e.spawn),
            us(s.resume),
            us(e.arm),
            e.reprotected_chunks,
            us(self.copy_wait),
            us(self.total),
        );
        if let Some(p) = &self.prepare {
            out.push_str(&format!(
                ",\"prepare\":{{\"elapsed_us\":{},\"bytes\":{}}}",
                us(p.elapsed),
                p.bytes
            ));
        }
        if let Some(m) = &self.engine {
            let h = &m.fault_latency_ns;
            out.push_str(&format!(
                ",\"engine\":{{\"copy_total_us\":{},\"finish_us\":{},\"unit_size\":{},\"chunks_total\":{},\"chunks_by_workers\":{},\"chunks_by_fault_path\":{},\"chunks_by_hook\":{},\"chunks_staged\":{},\"zero_chunks\":{},\"bytes_copied\":{},\"wp_faults\":{},\"missing_faults\":{},\"fault_latency_us\":{{\"count\":{},\"p50\":{:.1},\"p99\":{:.1},\"max\":{:.1}}},\"peak_extra_memory\":{}}}",
                us(m.copy_total),
                us(m.finish),
                m.unit_size,
                m.chunks_total,
                m.chunks_by_workers,
                m.chunks_by_fault_path,
                m.chunks_by_hook,
                m.chunks_staged,
                m.zero_chunks,
                m.bytes_copied,
                m.wp_faults,
                m.missing_faults,
                h.len(),
                h.value_at_quantile(0.5) as f64 / 1e3,
                h.value_at_quantile(0.99) as f64 / 1e3,
                h.max() as f64 / 1e3,
                m.peak_extra_memory,
            ));
        }
        if let Some(p) = &self.persist {
            out.push_str(&format!(
                ",\"persist\":{{\"elapsed_us\":{},\"image_len\":{},\"data_bytes\":{},\"zero_chunks\":{},\"state_bytes\":{}}}",
                us(p.elapsed),
                p.image_len,
                p.data_bytes,
                p.zero_chunks,
                p.state_bytes
            ));
        }
        out.push('}');
        out
    }

    /// One human-readable line for the log.
    pub fn summary(&self) -> String {
        let s = &self.sync;
        let mut out = format!(
            "{} x{}: pause {:?} (pause {:?}, state {:?}, begin {:?} [write-protect {:?}, {} chunks armed-then-written], resume {:?}; armed beforehand in {:?})",
            self.strategy,
            self.workers,
            s.total,
            s.pause,
            s.state_capture,
            s.begin,
            s.engine.write_protect,
            s.engine.reprotected_chunks,
            s.resume,
            s.engine.arm
        );
        if let Some(p) = &self.prepare {
            out.push_str(&format!(
                "; memory prepared before the fork: {} MiB in {:?}",
                p.bytes >> 20,
                p.elapsed
            ));
        }
        if let Some(m) = &self.engine {
            out.push_str(&format!(
                "; copy {:?}, chunks {} (workers {}, fault path {} [staged {}], hooks {}, zero {}), {} bytes copied, faults {} (p50 {} us, p99 {} us, max {} us)",
                m.copy_total,
                m.chunks_total,
                m.chunks_by_workers,
                m.chunks_by_fault_path,
                m.chunks_staged,
                m.chunks_by_hook,
                m.zero_chunks,
                m.bytes_copied,
                m.faults(),
                m.fault_latency_at(0.5) / 1000,
                m.fault_latency_at(0.99) / 1000,
                m.fault_latency_ns.max() / 1000
            ));
        }
        if let Some(p) = &self.persist {
            out.push_str(&format!(
                "; persisted {} data bytes ({} zero chunks) in {:?}",
                p.data_bytes, p.zero_chunks, p.elapsed
            ));
        }
        out
    }
}

/// Per-VM snapshot bookkeeping: "one snapshot in flight".
#[derive(Debug, Default)]
pub struct SnapshotSlot {
    busy: AtomicBool,
    /// The engine of the last `keep_memory` snapshot (holding its kept
    /// destination), reused by the next request with the same config.
    kept: Mutex<Option<Arc<Engine>>>,
    /// The fault path's warm staging slots, prepared by the first snapshot
    /// and lent to every later one (snapshot/src/staging.rs).
    staging: Arc<StagingSlots>,
}

impl SnapshotSlot {
    fn try_claim(&self) -> bool {
        self.busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn release(&self) {
        self.busy.store(false, Ordering::Release);
    }

    /// The engine for `config`: the kept one if it matches, else a new one
    /// (kept for next time if `config.keep_destination`). Call with the
    /// slot claimed (so the kept engine is idle).
    fn engine(&self, mut config: Config) -> Result<Arc<Engine>, snapshot::Error> {
        config.staging = self.staging.clone();
        let mut kept = lock(&self.kept);
        if let Some(e) = kept.as_ref() {
            let c = e.config();
            if config.keep_destination
                && c.strategy == config.strategy
                && c.workers == config.workers
                && c.injection == config.injection
                && c.keep_destination
            {
                return Ok(e.clone());
            }
            e.release_destination();
            *kept = None;
        }
        let keep = config.keep_destination;
        let engine = Arc::new(Engine::new(config)?);
        if keep {
            *kept = Some(engine.clone());
        }
        Ok(engine)
    }

    /// Bytes of destination memory kept for the next snapshot.
    pub fn kept_bytes(&self) -> u64 {
        lock(&self.kept)
            .as_ref()
            .map_or(0, |e| e.kept_destination_bytes())
    }

    pub fn in_progress(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }
}

/// Releases the slot when dropped (even if the snapshot thread panics).
struct SlotGuard(Arc<SnapshotSlot>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Who copies the memory of a snapshot in flight.
#[derive(Debug, Clone)]
enum Copier {
    Engine(Arc<Engine>),
    /// The `fork` baseline's writer process.
    Fork(libc::pid_t),
}

/// What the snapshot thread waits for.
enum Work {
    Engine(Arc<Engine>),
    Fork(fork::ForkChild),
}

/// What the snapshot thread runs once the sync phase is over.
type Job = Box<dyn FnOnce() + Send>;

/// A snapshot set up but not forked yet: what the sync phase consumes.
/// Dropping it (a failure or cancel before the fork) releases the VM's
/// snapshot slot and lets the snapshot thread exit.
struct Pending {
    guard: SlotGuard,
    engine: Option<Arc<Engine>>,
    req: SnapshotRequest,
    /// Whether the snapshot thread prepares memory before the fork.
    prepare: bool,
    job_tx: std::sync::mpsc::Sender<Job>,
    t_request: Instant,
}

struct Tracker {
    dir: PathBuf,
    /// Set by the sync phase.
    copier: Mutex<Option<Copier>>,
    /// Until the sync phase takes it.
    pending: Mutex<Option<Pending>>,
    /// Progress and cancel of the preparation before the fork.
    prepare: Arc<PrepareControl>,
    inner: Mutex<TrackerInner>,
    changed: Condvar,
    checksums: OnceLock<Vec<u32>>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("dir", &self.dir)
            .field("state", &lock(&self.inner).state)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct TrackerInner {
    state: SnapshotState,
    /// Preparing: the memory is ready and the snapshot waits for its fork.
    prepared: bool,
    metrics: SnapshotMetrics,
    bytes_written: u64,
    bytes_to_write: u64,
}

/// Releases an `Engine::arm` that no `begin` consumed (an error between
/// the two); after `begin` it finds nothing to do.
struct DisarmOnDrop<'a>(&'a snapshot::Engine);

impl Drop for DisarmOnDrop<'_> {
    fn drop(&mut self) {
        self.0.disarm();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A snapshot begun by [`Vm::snapshot`] or [`Vm::start_snapshot`]. Cheap
/// to clone.
#[derive(Debug, Clone)]
pub struct SnapshotHandle {
    t: Arc<Tracker>,
}

impl SnapshotHandle {
    pub fn dir(&self) -> &Path {
        &self.t.dir
    }

    pub fn state(&self) -> SnapshotState {
        lock(&self.t.inner).state.clone()
    }

    pub fn progress(&self) -> SnapshotProgress {
        let inner = lock(&self.t.inner);
        let mut p = SnapshotProgress {
            state: inner.state.clone(),
            chunks_done: 0,
            chunks_total: 0,
            bytes_copied: 0,
            bytes_written: inner.bytes_written,
            bytes_to_write: inner.bytes_to_write,
            bytes_prepared: self.t.prepare.done.load(Ordering::Relaxed),
            bytes_to_prepare: self.t.prepare.total.load(Ordering::Relaxed),
        };
        drop(inner);
        let live = match lock(&self.t.copier).as_ref() {
            Some(Copier::Engine(e)) => e.progress(),
            Some(Copier::Fork(_)) | None => None,
        };
        if let Some(e) = live {
            p.chunks_done = e.chunks_done;
            p.chunks_total = e.chunks_total;
            p.bytes_copied = e.bytes_copied;
        } else if let Some(m) = &lock(&self.t.inner).metrics.engine {
            p.chunks_done = m.chunks_total;
            p.chunks_total = m.chunks_total;
            p.bytes_copied = m.bytes_copied;
        }
        p
    }

    /// Cancels the snapshot. Before the fork (preparing) nothing was
    /// protected: the preparation stops and its memory is freed. Copying:
    /// the engine rolls back (protections lifted, the VM untouched). Either
    /// way the snapshot ends as failed. Too late once persisting has begun
    /// (then it is an error, and nothing changes).
    pub fn cancel(&self) -> Result<(), SnapshotError> {
        let copier = lock(&self.t.copier).clone();
        match copier {
            None => {
                self.t.prepare.cancel.store(true, Ordering::SeqCst);
                Ok(())
            }
            Some(Copier::Engine(e)) => e.cancel().map_err(SnapshotError::Engine),
            Some(Copier::Fork(pid)) => {
                // SAFETY: signalling our own child (not yet reaped: the
                // snapshot thread reaps it), no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                Ok(())
            }
        }
    }

    /// Prepared and waiting for [`Vm::fork_prepared`] (or cancelled while
    /// waiting, which `fork_prepared` then finishes).
    pub fn ready_to_fork(&self) -> bool {
        let inner = lock(&self.t.inner);
        inner.state == SnapshotState::Preparing && inner.prepared && lock(&self.t.pending).is_some()
    }

    /// Ends a snapshot that has not forked yet because its VM is going away:
    /// a preparation in flight is cancelled, a prepared one is failed with
    /// `why`. No effect once forked.
    pub fn abandon(&self, why: &str) {
        self.t.prepare.cancel.store(true, Ordering::SeqCst);
        if self.ready_to_fork() {
            self.fail_before_fork(why.to_string());
        }
    }

    /// Blocks until the preparation is over: prepared (true) or failed.
    fn wait_prepared(&self) -> bool {
        let mut inner = lock(&self.t.inner);
        loop {
            match &inner.state {
                SnapshotState::Preparing if inner.prepared => return true,
                SnapshotState::Preparing => {}
                SnapshotState::Failed(_) => return false,
                _ => return true,
            }
            inner = match self.t.changed.wait(inner) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }

    /// Fails a snapshot that never forked: releases its slot first (so a
    /// waiter woken by the failure may start the next one), then records
    /// why.
    fn fail_before_fork(&self, why: String) {
        let pending = lock(&self.t.pending).take();
        let t_request = pending.as_ref().map(|p| p.t_request);
        drop(pending);
        if let Some(t) = t_request {
            lock(&self.t.inner).metrics.total = t.elapsed();
        }
        tracing::error!(
            "snapshot {} failed before the fork: {why}; the VM keeps running",
            self.t.dir.display()
        );
        self.set_state(SnapshotState::Failed(why));
    }

    /// Runs on the snapshot thread before the fork: populates the
    /// snapshot's memory (Engine::prepare_for). False if it failed or was
    /// cancelled (the snapshot is then failed).
    fn run_preparation(&self, engine: &Engine, regions: &[Region]) -> bool {
        let t = Instant::now();
        match engine.prepare_for(regions, &self.t.prepare) {
            Ok(()) => {
                let bytes = self.t.prepare.done.load(Ordering::Relaxed);
                tracing::info!(
                    "snapshot {}: memory prepared before the fork: {} MiB in {:.2} s",
                    self.t.dir.display(),
                    bytes >> 20,
                    t.elapsed().as_secs_f64()
                );
                let mut inner = lock(&self.t.inner);
                inner.metrics.prepare = Some(PrepareMetrics {
                    elapsed: t.elapsed(),
                    bytes,
                });
                inner.prepared = true;
                drop(inner);
                self.t.changed.notify_all();
                true
            }
            Err(snapshot::Error::Cancelled) => {
                self.fail_before_fork("snapshot cancelled while preparing its memory".into());
                false
            }
            Err(e) => {
                self.fail_before_fork(format!("cannot prepare the snapshot's memory: {e}"));
                false
            }
        }
    }

    /// Metrics so far (complete once finished).
    pub fn metrics(&self) -> SnapshotMetrics {
        lock(&self.t.inner).metrics.clone()
    }

    /// Blocks until the snapshot is persisted (Ok) or failed.
    pub fn wait(&self) -> Result<SnapshotMetrics, SnapshotError> {
        self.wait_timeout(Duration::MAX)
            .unwrap_or_else(|| Err(SnapshotError::Failed("wait timed out".into())))
    }

    /// As [`Self::wait`], giving up (None) after `timeout`.
    pub fn wait_timeout(
        &self,
        timeout: Duration,
    ) -> Option<Result<SnapshotMetrics, SnapshotError>> {
        let deadline = Instant::now().checked_add(timeout);
        let mut inner = lock(&self.t.inner);
        loop {
            match &inner.state {
                SnapshotState::Done => return Some(Ok(inner.metrics.clone())),
                SnapshotState::Failed(why) => return Some(Err(SnapshotError::Failed(why.clone()))),
                _ => {}
            }
            let left = match deadline {
                Some(d) => d.checked_duration_since(Instant::now())?,
                None => Duration::from_secs(3600),
            };
            inner = match self.t.changed.wait_timeout(inner, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// With [`SnapshotRequest::capture_checksums`]: crc32c of every 2 MiB
    /// chunk of guest RAM taken while paused, regions in order (the order
    /// of the snapshot image).
    pub fn sync_checksums(&self) -> Option<&[u32]> {
        self.t.checksums.get().map(Vec::as_slice)
    }

    fn set_state(&self, state: SnapshotState) {
        lock(&self.t.inner).state = state;
        self.t.changed.notify_all();
    }
}

/// crc32c of every 2 MiB chunk of `regions`' host memory, in order, as the
/// snapshot image holds it: pages never touched count as zero and are not
/// read — after `Engine::arm` guest RAM is registered for first-touch
/// faults, and reading 100 k untouched pages one handler round trip at a
/// time took seconds in the pause. Call only while nothing writes the
/// memory. A pagemap failure is reported as no checksums.
fn checksum_chunks(regions: &[Region]) -> Option<Vec<u32>> {
    const PAGES: usize = (CHUNK_SIZE / snapshot::PAGE_SIZE) as usize;
    static ZERO: [u8; snapshot::PAGE_SIZE as usize] = [0; snapshot::PAGE_SIZE as usize];
    let pagemap = snapshot::Pagemap::open()
        .map_err(|e| tracing::warn!("chunk checksums: {e}"))
        .ok()?;
    let mut out = Vec::new();
    for r in regions {
        let mut at = r.host_addr;
        while at < r.host_addr + r.len {
            let pages = (((r.host_addr + r.len - at) / snapshot::PAGE_SIZE) as usize).min(PAGES);
            let populated = pagemap
                .populated(at, pages, snapshot::Phase::Sync)
                .map_err(|e| tracing::warn!("chunk checksums: {e}"))
                .ok()?;
            let mut crc = 0u32;
            for (p, &present) in populated.iter().take(pages).enumerate() {
                let page = at + p as u64 * snapshot::PAGE_SIZE;
                let bytes: &[u8] = if present {
                    // SAFETY: the page lies in live guest RAM (the VM owns
                    // the mapping and outlives this call), is populated (so
                    // reading it does not fault), and the vCPUs are paused.
                    unsafe {
                        std::slice::from_raw_parts(page as *const u8, snapshot::PAGE_SIZE as usize)
                    }
                } else {
                    &ZERO
                };
                crc = snapshot::persist::format::checksum_append(crc, bytes);
            }
            out.push(crc);
            at += pages as u64 * snapshot::PAGE_SIZE;
        }
    }
    Some(out)
}

/// crc32c of every 2 MiB chunk of an opened snapshot's memory (via
/// `map_all`), in image order: compare with
/// [`SnapshotHandle::sync_checksums`].
pub fn snapshot_checksums(dir: &Path) -> Result<Vec<u32>, snapshot::PersistError> {
    let opened = snapshot::SnapshotDir::open(dir)?;
    let mut out = Vec::new();
    for m in opened.map_all()? {
        out.extend(
            m.as_slice()
                .chunks(CHUNK_SIZE as usize)
                .map(snapshot::persist::format::checksum),
        );
    }
    Ok(out)
}

impl Vm {
    /// Takes a snapshot of the running VM into `req.dir` (see the module
    /// docs). Returns once the guest runs again (after the preparation, if
    /// `req.prepare`); the copy and the write continue in the background
    /// (follow them with the handle). A second request while one is in
    /// flight gets [`SnapshotError::InProgress`].
    pub fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotHandle, SnapshotError> {
        let h = self.start_snapshot(req)?;
        if h.state() == SnapshotState::Preparing {
            if !h.wait_prepared() {
                return Err(match h.state() {
                    SnapshotState::Failed(why) => SnapshotError::Failed(why),
                    _ => SnapshotError::Failed("the preparation ended without a result".into()),
                });
            }
            self.fork_prepared(&h)?;
        }
        Ok(h)
    }

    /// As [`Vm::snapshot`], without blocking on the preparation: with
    /// `req.prepare` (and an engine mode) it returns at once in
    /// [`SnapshotState::Preparing`] while the snapshot thread populates the
    /// snapshot's memory; once [`SnapshotHandle::ready_to_fork`], the VM's
    /// owner calls [`Vm::fork_prepared`] to run the sync phase (on its own
    /// thread, where pause/resume requests are serialised). Otherwise the
    /// sync phase runs now, as in `snapshot`.
    pub fn start_snapshot(&self, req: SnapshotRequest) -> Result<SnapshotHandle, SnapshotError> {
        self.check_snapshottable(req.workers)?;
        let slot = self.snapshot_slot().clone();
        if !slot.try_claim() {
            return Err(SnapshotError::InProgress);
        }
        let guard = SlotGuard(slot);
        let t_request = Instant::now();
        let workers = copier_count(req.mode, req.workers);
        let engine = if req.mode == Strategy::Fork {
            None
        } else {
            Some(self.snapshot_slot().engine(Config {
                workers,
                strategy: req.mode,
                injection: req.injection.clone(),
                keep_destination: req.keep_memory,
                background_cpus: self.background_cpus().cloned(),
                ..Config::default()
            })?)
        };
        let prepare = req.prepare && engine.is_some();
        let handle = SnapshotHandle {
            t: Arc::new(Tracker {
                dir: req.dir.clone(),
                copier: Mutex::new(None),
                pending: Mutex::new(None),
                prepare: Arc::new(PrepareControl::default()),
                inner: Mutex::new(TrackerInner {
                    state: SnapshotState::Preparing,
                    prepared: false,
                    metrics: SnapshotMetrics::new(req.mode, workers, req.priority),
                    bytes_written: 0,
                    bytes_to_write: 0,
                }),
                changed: Condvar::new(),
                checksums: OnceLock::new(),
            }),
        };

        // The thread that prepares, waits for the copy and persists exists
        // before the copiers start: creating a thread maps its stack
        // (mmap_lock taken for writing), which after the pause would queue
        // behind a copier populating fresh memory (mmap_lock read-held for
        // milliseconds here) and hold up every later reader, the fault
        // handler and the vCPUs' faults included (engine supervisor.rs).
        let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
        let placement = self.cpu_placement().cloned();
        let priority = req.priority;
        let preparation = match (&engine, prepare) {
            (Some(e), true) => Some((e.clone(), self.snapshot_regions(), handle.clone())),
            _ => None,
        };
        std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                if let Some(p) = placement {
                    p.pin_background_here("the snapshot thread");
                }
                // Preparing and persisting compete with the vCPUs as the
                // copiers do.
                if let Err(e) = snapshot::priority::apply_to_current_thread(priority) {
                    tracing::warn!(
                        "snapshot thread keeps normal priority: cannot set {}: {e}",
                        priority.name()
                    );
                }
                if let Some((engine, regions, h)) = preparation {
                    if !h.run_preparation(&engine, &regions) {
                        return;
                    }
                }
                // No job: the snapshot failed before the copy started.
                if let Ok(job) = job_rx.recv() {
                    job();
                }
            })
            .map_err(SnapshotError::Spawn)?;
        *lock(&handle.t.pending) = Some(Pending {
            guard,
            engine,
            req,
            prepare,
            job_tx,
            t_request,
        });
        if prepare {
            tracing::info!(
                "snapshot {}: preparing its memory before the fork",
                handle.dir().display()
            );
            return Ok(handle);
        }
        self.fork_prepared(&handle)?;
        Ok(handle)
    }

    /// Runs the sync phase of a snapshot begun by [`Vm::start_snapshot`]
    /// whose memory is prepared: pause, capture, `Engine::begin` (or fork),
    /// resume, then hands the copy and the persist to the snapshot thread.
    /// Returns once the guest runs again. A snapshot cancelled while it
    /// waited, or whose sync phase fails, ends as failed (the VM keeps
    /// running; nothing stays protected).
    pub fn fork_prepared(&self, h: &SnapshotHandle) -> Result<(), SnapshotError> {
        let Some(pending) = lock(&h.t.pending).take() else {
            return Err(SnapshotError::Invalid(format!(
                "snapshot {} is not waiting for its fork",
                h.dir().display()
            )));
        };
        if pending.prepare && !lock(&h.t.inner).prepared {
            *lock(&h.t.pending) = Some(pending);
            return Err(SnapshotError::Invalid(format!(
                "snapshot {} is still preparing its memory",
                h.dir().display()
            )));
        }
        if h.t.prepare.cancel.load(Ordering::SeqCst) {
            *lock(&h.t.pending) = Some(pending);
            let why = "snapshot cancelled before its fork".to_string();
            h.fail_before_fork(why.clone());
            return Err(SnapshotError::Failed(why));
        }
        let t_request = pending.t_request;
        match self.sync_phase(pending, h) {
            Ok(()) => Ok(()),
            Err(e) => {
                // The pending snapshot (slot, engine, thread) is gone.
                lock(&h.t.inner).metrics.total = t_request.elapsed();
                h.set_state(SnapshotState::Failed(e.to_string()));
                Err(e)
            }
        }
    }

    /// Guest RAM as the engine sees it.
    fn snapshot_regions(&self) -> Vec<Region> {
        self.memory()
            .regions()
            .iter()
            .map(|r| Region::new(r.guest_addr, r.host_addr as u64, r.len as u64))
            .collect()
    }

    /// The sync phase (see [`Vm::fork_prepared`]). On error `p` is dropped:
    /// the slot is free again and the snapshot thread exits.
    fn sync_phase(&self, p: Pending, h: &SnapshotHandle) -> Result<(), SnapshotError> {
        let Pending {
            guard,
            engine,
            req,
            prepare: _,
            job_tx,
            t_request,
        } = p;
        let regions = self.snapshot_regions();
        // The background thread keeps guest RAM mapped until the engine is
        // done with it, even if the VM goes away first.
        let ram = self.memory().clone();

        // Everything in the sync phase that grows with memory (register,
        // write-protect) happens here while the guest still runs; the pause
        // then re-protects only what was written in between. Failing to arm
        // only costs pause time: begin() takes the full path.
        let _disarm = engine.as_ref().map(|e| DisarmOnDrop(e.as_ref()));
        if let Some(engine) = &engine {
            // SAFETY: as for `begin` below (same regions, same mapping kept
            // alive by `ram`, which lives at least until this function
            // returns; a disarm on every early return releases it).
            if let Err(e) = unsafe { engine.arm(&regions) } {
                tracing::warn!("snapshot: write-protecting ahead of the pause failed ({e}); protecting in the pause instead");
            }
        }

        // --- Sync phase: the guest is stalled from here to resume().
        let mut sync = SyncPhase::default();
        let t0 = Instant::now();
        let was_paused = self.is_paused();
        if !was_paused {
            self.pause()?;
        }
        if let Err(e) = self.pause_devices() {
            self.resume_devices();
            if !was_paused {
                self.resume()?;
            }
            return Err(SnapshotError::Devices(e));
        }
        sync.pause = t0.elapsed();
        // With `--cpus`, the rest of the pause runs on the guest's CPUs,
        // idle now and where its vCPUs last ran: the state capture's vCPU
        // ioctls then do not pull the vCPUs' KVM context to another CPU
        // (and the vCPUs do not pull it back when they resume). A/B at 2
        // GiB: first-snapshot state capture 189 vs 493 µs median, stall
        // across the pause 0.86 vs 1.72 ms; at 8 GiB no difference beyond
        // noise (docs/BENCHMARKS.md). The thread's own affinity comes back
        // before the resume.
        let affinity_before = self.cpu_placement().and_then(|p| {
            let before = snapshot::CpuSet::allowed().ok()?;
            p.guest.pin_current_thread().ok()?;
            Some(before)
        });
        let resume = |sync: &mut SyncPhase| -> Result<(), PauseError> {
            let t = Instant::now();
            if let Some(before) = &affinity_before {
                let _ = before.pin_current_thread();
            }
            self.resume_devices();
            let r = if was_paused { Ok(()) } else { self.resume() };
            sync.resume = t.elapsed();
            sync.total = t0.elapsed();
            r
        };
        let t = Instant::now();
        let blob = match self.save_state().and_then(|s| {
            sync.guest_tsc = s.vcpus.first().and_then(VcpuState::tsc);
            s.encode()
        }) {
            Ok(b) => b,
            Err(e) => {
                resume(&mut sync)?;
                return Err(e.into());
            }
        };
        sync.state_capture = t.elapsed();
        let t = Instant::now();
        let checksums = req
            .capture_checksums
            .then(|| checksum_chunks(&regions))
            .flatten();
        sync.checksums = t.elapsed();
        let t = Instant::now();
        let work = match &engine {
            Some(engine) => {
                // SAFETY: the regions are this VM's anonymous private guest
                // RAM (GuestRam::new maps MAP_PRIVATE|MAP_ANONYMOUS), mapped
                // read-write; `ram` (a clone holding the mappings) moves into
                // the snapshot thread, which drops it only after
                // `engine.wait()` returned. Guest RAM is never discarded or
                // remapped while the VM lives.
                let begun = unsafe { engine.begin(&regions) };
                sync.begin = t.elapsed();
                match begun {
                    Ok(m) => {
                        sync.engine = m;
                        Work::Engine(engine.clone())
                    }
                    Err(e) => {
                        resume(&mut sync)?;
                        return Err(e.into());
                    }
                }
            }
            None => {
                let forked = fork::spawn(
                    &regions,
                    &blob,
                    &req.dir,
                    req.overwrite,
                    self.background_cpus(),
                );
                sync.begin = t.elapsed();
                match forked {
                    Ok(child) => Work::Fork(child),
                    Err(e) => {
                        resume(&mut sync)?;
                        return Err(SnapshotError::Failed(format!("fork: {e}")));
                    }
                }
            }
        };
        resume(&mut sync)?;
        // --- The guest runs again.
        if let Work::Engine(e) = &work {
            // Started only now, so that the threads it wakes on the
            // background CPUs cannot delay the resume. A failure rolls the
            // snapshot back; the snapshot thread's `wait` reports it.
            if let Err(err) = e.start_copy() {
                tracing::error!("snapshot {}: {err}", req.dir.display());
            }
        }

        tracing::info!(
            "snapshot {}: sync phase {:?} (pause {:?}, state {:?}, begin {:?} [write-protect {:?}], resume {:?})",
            req.dir.display(),
            sync.total,
            sync.pause,
            sync.state_capture,
            sync.begin,
            sync.engine.write_protect,
            sync.resume,
        );
        if let Some(c) = checksums {
            let _ = h.t.checksums.set(c);
        }
        *lock(&h.t.copier) = Some(match &work {
            Work::Engine(e) => Copier::Engine(e.clone()),
            Work::Fork(c) => Copier::Fork(c.pid),
        });
        lock(&h.t.inner).metrics.sync = sync;
        h.set_state(SnapshotState::Copying);
        let bg = h.clone();
        let overwrite = req.overwrite;
        let resumed = Instant::now();
        let job: Job = Box::new(move || {
            background(&bg, work, &blob, overwrite, resumed, t_request, guard);
            drop(ram);
        });
        match job_tx.send(job) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::SendError(job)) => {
                // The thread is gone (it cannot exit before its job unless
                // it panicked); drop the job (slot guard, RAM clone, work)
                // and roll back here.
                drop(job);
                let e = std::io::Error::other("the snapshot thread exited before its work");
                let _ = h.cancel();
                if let Some(engine) = &engine {
                    let _ = engine.wait();
                }
                Err(SnapshotError::Spawn(e))
            }
        }
    }

    /// Prepares, on a background thread, the destination memory of the
    /// next `keep_memory` snapshot with this mode and worker count, and
    /// keeps it: even the first snapshot then copies at memory speed
    /// instead of first-touching fresh memory (seconds per GiB on this
    /// host, docs/BENCHMARKS.md), which also keeps its write faults short.
    /// The price is one guest-sized buffer held from now on.
    ///
    /// A snapshot requested while this runs is refused as "snapshot in
    /// progress". If the memory cannot be had, the failure is logged and
    /// snapshots populate their destination as they copy, as without it.
    pub fn prepare_snapshot_memory(
        &self,
        mode: Strategy,
        workers: usize,
        priority: BackgroundPriority,
    ) -> Result<std::thread::JoinHandle<Result<(), snapshot::Error>>, SnapshotError> {
        if mode == Strategy::Fork {
            return Err(SnapshotError::Invalid(
                "the fork baseline copies in a child process: there is no snapshot memory to prepare"
                    .into(),
            ));
        }
        self.check_snapshottable(workers)?;
        let slot = self.snapshot_slot().clone();
        if !slot.try_claim() {
            return Err(SnapshotError::InProgress);
        }
        let guard = SlotGuard(slot.clone());
        let workers = copier_count(mode, workers);
        let engine = slot.engine(Config {
            workers,
            strategy: mode,
            keep_destination: true,
            background_cpus: self.background_cpus().cloned(),
            ..Config::default()
        })?;
        let bytes = self.memory().size();
        let placement = self.cpu_placement().cloned();
        std::thread::Builder::new()
            .name("snapshot-prepare".into())
            .spawn(move || {
                let _guard = guard;
                if let Some(p) = placement {
                    p.pin_background_here("snapshot memory preparation");
                }
                if let Err(e) = snapshot::priority::apply_to_current_thread(priority) {
                    tracing::warn!("snapshot memory preparation keeps normal priority: {e}");
                }
                let t = Instant::now();
                let r = engine.prepare_destination(bytes);
                match &r {
                    Ok(()) => tracing::info!(
                        "snapshot memory prepared: {} MiB in {:.1} s",
                        bytes >> 20,
                        t.elapsed().as_secs_f64()
                    ),
                    Err(e) => tracing::warn!(
                        "cannot prepare snapshot memory ({e}); snapshots will populate it as they copy"
                    ),
                }
                r
            })
            .map_err(SnapshotError::Spawn)
    }

    /// What every snapshot (and its memory preparation) needs of the VM.
    fn check_snapshottable(&self, workers: usize) -> Result<(), SnapshotError> {
        if !self.memory().is_anonymous() {
            return Err(SnapshotError::Invalid(
                "guest memory is mapped from a snapshot image (a restored VM); \
                 snapshots need snapvm's anonymous memory"
                    .into(),
            ));
        }
        if workers == 0 {
            return Err(SnapshotError::Invalid("workers must be at least 1".into()));
        }
        Ok(())
    }

    /// Bytes of snapshot destination memory held for the next snapshot
    /// ([`SnapshotRequest::keep_memory`]).
    pub fn snapshot_kept_bytes(&self) -> u64 {
        self.snapshot_slot().kept_bytes()
    }

    /// Whether a snapshot of this VM is in flight.
    pub fn snapshot_in_progress(&self) -> bool {
        self.snapshot_slot().in_progress()
    }
}

/// Copier threads a mode really uses: sync-wp copies with one (like QEMU),
/// fork with one child process; the others with what was asked.
fn copier_count(mode: Strategy, requested: usize) -> usize {
    if matches!(mode, Strategy::SyncWp | Strategy::Fork) {
        1
    } else {
        requested
    }
}

/// The snapshot thread: wait for the copy, persist, record the outcome.
fn background(
    h: &SnapshotHandle,
    work: Work,
    blob: &[u8],
    overwrite: bool,
    resumed: Instant,
    t_request: Instant,
    guard: SlotGuard,
) {
    let dir = h.t.dir.clone();
    let outcome = (|| -> Result<(), String> {
        let engine = match work {
            Work::Engine(e) => e,
            Work::Fork(child) => {
                lock(&h.t.inner).state = SnapshotState::Persisting;
                h.t.changed.notify_all();
                let r = child.wait().map_err(|e| format!("fork writer: {e}"))?;
                return finish(
                    h,
                    WriteSummary {
                        path: dir.clone(),
                        image_len: r.image_len,
                        data_bytes: r.data_bytes,
                        zero_chunks: r.zero_chunks,
                        state_bytes: r.state_bytes,
                        elapsed: resumed.elapsed(),
                    },
                    resumed,
                    t_request,
                );
            }
        };
        let snap = engine.wait().map_err(|e| {
            // The engine rolled back: protections lifted, writers woken.
            format!("copy failed: {e}")
        })?;
        {
            let mut inner = lock(&h.t.inner);
            inner.metrics.copy_wait = resumed.elapsed();
            inner.metrics.engine = Some(snap.metrics().clone());
            inner.state = SnapshotState::Persisting;
        }
        h.t.changed.notify_all();
        tracing::info!(
            "snapshot {}: memory copied in {:?}, persisting",
            dir.display(),
            snap.metrics().copy_total
        );
        let opts = WriteOptions {
            overwrite,
            ..WriteOptions::default()
        };
        let mut last_log = Instant::now();
        let summary = snapshot::write_snapshot(&snap, blob, &dir, &opts, &mut |p| {
            {
                let mut inner = lock(&h.t.inner);
                inner.bytes_written = p.bytes_done;
                inner.bytes_to_write = p.bytes_total;
            }
            if last_log.elapsed() >= Duration::from_secs(1) {
                last_log = Instant::now();
                tracing::debug!(
                    "snapshot {}: persisting {}/{} bytes",
                    dir.display(),
                    p.bytes_done,
                    p.bytes_total
                );
            }
        })
        .map_err(|e| format!("persist failed: {e}"))?;
        drop(snap);
        finish(h, summary, resumed, t_request)
    })();
    // The VM may take its next snapshot from here on (the engine is done
    // with guest RAM and the directory is written or removed).
    drop(guard);
    match outcome {
        Ok(()) => {
            let m = h.metrics();
            tracing::info!("snapshot {} done: {}", dir.display(), m.summary());
            h.set_state(SnapshotState::Done);
        }
        Err(why) => {
            lock(&h.t.inner).metrics.total = t_request.elapsed();
            tracing::error!(
                "snapshot {} failed: {why}; the VM keeps running",
                dir.display()
            );
            h.set_state(SnapshotState::Failed(why));
        }
    }
}

/// Records a persisted snapshot and writes its metrics.json.
fn finish(
    h: &SnapshotHandle,
    summary: WriteSummary,
    resumed: Instant,
    t_request: Instant,
) -> Result<(), String> {
    let mut inner = lock(&h.t.inner);
    if inner.metrics.engine.is_none() {
        // Fork: the child's whole run is the copy.
        inner.metrics.copy_wait = resumed.elapsed();
    }
    inner.metrics.persist = Some(summary);
    inner.metrics.total = t_request.elapsed();
    let json = inner.metrics.to_json();
    drop(inner);
    let dir = &h.t.dir;
    // 0600 like the snapshot's own files, and renamed into place so that
    // whoever waits for it (scripts poll for it) never reads it half written.
    let tmp = dir.join(format!(".{METRICS_FILE}.tmp"));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all((json + "\n").as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, dir.join(METRICS_FILE)));
    if let Err(e) = written {
        tracing::warn!(
            "snapshot {}: cannot write {METRICS_FILE}: {e}",
            dir.display()
        );
    }
    Ok(())
}
