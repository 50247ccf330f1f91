//! The VM owner's snapshotter: one snapshot in flight per VM, the VM's
//! staging pool, and the snapshot thread that finishes each snapshot.
//!
//! [`Snapshotter::take`] runs on the owner's thread: it creates the
//! snapshot directory (temp name), runs the sync phase (sync_phase.rs) and
//! returns as soon as the guest runs again — the snapshot is of that
//! instant. The snapshot thread, created before the pause, then waits for
//! the memory to be in the image (the engine's workers, or the fork
//! baseline's child), commits it (fsync, state file, rename, fsync of the
//! parent: durable) and writes `metrics.json` beside it.
//!
//! A failure at any point rolls back through the engine (which lifts every
//! protection), removes the half-written directory and leaves the VM
//! running; the handle records why.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use std::path::PathBuf;

use snapvm_snapshot::persist::chain::relative_to_child;
use snapvm_snapshot::persist::{ChunkEntry, ParentRef};
use snapvm_snapshot::tracking::TrackerSlot;
use snapvm_snapshot::{
    Config, Engine, SnapshotDir, SnapshotWriter, StagingPool, Strategy, WriteOptions, CHUNK_SIZE,
};

use super::handle::{lock, Copier, SnapshotHandle, SnapshotState};
use super::metrics::SnapshotMetrics;
use super::request::{SnapshotError, SnapshotRequest};
use super::sync_phase::{self, Begun, Work};
use crate::vm::Vm;

/// File with the metrics of a finished snapshot, inside its directory. Not
/// part of the checksummed format; the reader ignores it.
pub const METRICS_FILE: &str = "metrics.json";

/// One VM's snapshots (see the module docs).
#[derive(Debug)]
pub struct Snapshotter {
    busy: Arc<AtomicBool>,
    /// The staging pool, kept between snapshots (replaced when a request
    /// asks for another budget).
    pool: Mutex<Option<Arc<StagingPool>>>,
    /// Track writes between snapshots (`--snapshot-track-dirty`), so the
    /// next one may be incremental.
    track_dirty: bool,
    /// The writes since the last snapshot, while tracked.
    tracker: Arc<TrackerSlot>,
    /// The last snapshot, for an incremental one to build on: set once it
    /// is committed with tracking running since its instant, cleared
    /// whenever tracking stops.
    last: Arc<Mutex<Option<Base>>>,
}

impl Default for Snapshotter {
    fn default() -> Snapshotter {
        Snapshotter {
            busy: Arc::default(),
            pool: Mutex::default(),
            track_dirty: true,
            tracker: Arc::new(TrackerSlot::new()),
            last: Arc::default(),
        }
    }
}

/// A committed snapshot an incremental one can be taken against.
#[derive(Debug, Clone)]
pub(crate) struct Base {
    pub dir: PathBuf,
    pub entries: Arc<Vec<ChunkEntry>>,
    /// Its state file's crc32c and length.
    pub content: (u32, u64),
}

/// Releases the slot when dropped (even if the snapshot thread panics).
struct SlotGuard(Arc<AtomicBool>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What the snapshot thread does once the sync phase is over.
type Job = Box<dyn FnOnce() + Send>;

/// Copier threads a mode really uses: sync-wp copies with one (like QEMU),
/// fork with one child process; the others with what was asked.
pub fn copier_count(mode: Strategy, requested: usize) -> usize {
    if matches!(mode, Strategy::SyncWp | Strategy::Fork) {
        1
    } else {
        requested
    }
}

impl Snapshotter {
    pub fn new() -> Snapshotter {
        Snapshotter::default()
    }

    /// Tracking writes between snapshots on or off (on by default).
    pub fn set_track_dirty(&mut self, on: bool) {
        self.track_dirty = on;
    }

    /// Chunks written since the last snapshot, while writes are tracked.
    pub fn dirty_chunks(&self) -> Option<usize> {
        self.tracker.dirty_chunks()
    }

    /// The snapshot an incremental one would build on now.
    pub fn incremental_parent(&self) -> Option<PathBuf> {
        if !self.tracker.is_tracking() {
            return None;
        }
        lock(&self.last).as_ref().map(|b| b.dir.clone())
    }

    /// Stops tracking (guest RAM unregistered) and forgets the last
    /// snapshot: the next incremental one is refused until a full one.
    pub fn stop_tracking(&self) {
        self.tracker.clear();
        *lock(&self.last) = None;
    }

    /// Whether a snapshot is in flight.
    pub fn in_progress(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// Bytes of staging memory held now (`--snapshot-pool`: from the start,
    /// or from the first snapshot).
    pub fn staging_bytes(&self) -> u64 {
        lock(&self.pool).as_ref().map_or(0, |p| p.resident_bytes())
    }

    /// Allocates the VM's staging pool of `budget` bytes (at most
    /// `guest_bytes`) now and populates it in the background, so that the
    /// first snapshot finds it warm. (A budget under one chunk maps
    /// nothing: `StagingPool::prepare`.)
    pub fn prepare_pool(&self, budget: u64, guest_bytes: u64) {
        if let Err(e) = self.pool(budget).prepare(guest_bytes) {
            tracing::warn!(
                "snapshot staging pool not prepared ({e}); the first snapshot will allocate it"
            );
        }
    }

    fn pool(&self, budget: u64) -> Arc<StagingPool> {
        let mut pool = lock(&self.pool);
        match pool.as_ref() {
            Some(p) if p.budget() == budget / CHUNK_SIZE * CHUNK_SIZE => p.clone(),
            _ => {
                let p = Arc::new(StagingPool::new(budget));
                *pool = Some(p.clone());
                p
            }
        }
    }

    /// Takes a snapshot of `vm` into `req.dir` (see the module docs).
    /// Returns once the guest runs again: the snapshot holds every write
    /// the guest made before this call and none it makes after it returns.
    /// The memory is written and committed in the background; follow it
    /// with the handle. A second request while one is in flight gets
    /// [`SnapshotError::InProgress`].
    pub fn take(&self, vm: &Vm, req: SnapshotRequest) -> Result<SnapshotHandle, SnapshotError> {
        let t_request = Instant::now();
        if !vm.memory().is_anonymous() {
            return Err(SnapshotError::Invalid(
                "guest memory is mapped from a file; snapshots need snapvm's anonymous memory"
                    .into(),
            ));
        }
        // A restored VM whose memory still loads: async-fork shares the
        // load (chunks not loaded yet come from the parent's image); the
        // baselines would read memory that is not there yet.
        let loading = vm.memory().loader().filter(|l| !l.is_released()).cloned();
        if let Some(l) = &loading {
            if req.mode != Strategy::AsyncFork {
                let p = l.progress();
                return Err(SnapshotError::Conflict(format!(
                    "the VM's memory is still loading from {} ({} of {} chunks): until it is in, only async-fork snapshots it",
                    l.dir().display(),
                    p.chunks_loaded,
                    p.chunks_total
                )));
            }
        }
        if req.workers == 0 {
            return Err(SnapshotError::Invalid("workers must be at least 1".into()));
        }
        if self
            .busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(SnapshotError::InProgress);
        }
        let guard = SlotGuard(self.busy.clone());
        let regions = vm.snapshot_regions();
        // Writes stay tracked after an async-fork snapshot of ordinary
        // guest RAM; anything else needs guest RAM unregistered first.
        let track = self.track_dirty && req.mode == Strategy::AsyncFork && loading.is_none();
        if !track {
            self.stop_tracking();
        }
        let base = if req.incremental {
            Some(self.diff_base(&req)?)
        } else {
            None
        };
        let opts = WriteOptions {
            overwrite: req.overwrite,
            parent: base.as_ref().map(|b| ParentRef {
                path: relative_to_child(&req.dir, &b.dir),
                state_crc: b.content.0,
                state_len: b.content.1,
            }),
            ..WriteOptions::default()
        };
        let writer =
            SnapshotWriter::create(&req.dir, &regions, &opts).map_err(SnapshotError::Target)?;
        let workers = copier_count(req.mode, req.workers);
        // The modes that do not stage leave the VM's pool as it is.
        let staging = if req.mode.stages() {
            self.pool(req.memory_budget)
        } else {
            Arc::new(StagingPool::new(0))
        };
        let engine = match req.mode {
            Strategy::Fork => None,
            mode => Some(Arc::new(Engine::new(Config {
                workers,
                strategy: mode,
                injection: req.injection.clone(),
                staging,
                background_cpus: vm.background_cpus().cloned(),
                lazy: loading,
                track: track.then(|| self.tracker.clone()),
                diff_base: base.as_ref().map(|b| b.entries.clone()),
                hugetlb: vm.memory().backing() == crate::memory::PageBacking::HugeTlb,
                thp: vm.memory().backing() == crate::memory::PageBacking::Huge,
                ..Config::default()
            })?)),
        };
        let mut metrics = SnapshotMetrics::new(
            req.mode,
            workers,
            req.priority,
            req.memory_budget,
            vm.memory().backing().label(),
        );
        metrics.parent = base.as_ref().map(|b| b.dir.display().to_string());
        let handle =
            SnapshotHandle::new(req.dir.clone(), writer.image().clone(), metrics, t_request);

        // The thread that finishes the snapshot exists before the writers
        // start: creating a thread maps its stack (mmap_lock taken for
        // writing), which after the pause would queue behind writers
        // pinning guest pages and hold up the vCPUs' own faults.
        let job_tx = spawn_snapshot_thread(vm, &req)?;
        // Guest RAM stays mapped until the memory is written, even if the
        // VM goes away first.
        let ram = vm.memory().clone();
        let begun = sync_phase::run(
            vm,
            &regions,
            engine.as_ref(),
            writer.image(),
            req.capture_checksums,
        )?;
        let mut sync = begun.sync.clone();
        sync.request_to_resume = t_request.elapsed();
        tracing::info!(
            "snapshot {}: paused {:?} (pause {:?}, state {:?}, begin {:?} [write-protect {:?}], resume {:?}); {:?} after the request",
            req.dir.display(),
            sync.total,
            sync.pause,
            sync.state_capture,
            sync.begin,
            sync.engine.write_protect,
            sync.resume,
            sync.request_to_resume,
        );
        if let Some(c) = &begun.checksums {
            let _ = handle.t.checksums.set(c.clone());
        }
        *lock(&handle.t.copier) = Some(match &begun.work {
            Work::Engine(e) => Copier::Engine(e.clone()),
            Work::Fork(c) => Copier::Fork(c.pid),
        });
        lock(&handle.t.inner).metrics.sync = sync;
        let bg = handle.clone();
        let resumed = Instant::now();
        let follow = Follow {
            track,
            tracker: self.tracker.clone(),
            last: self.last.clone(),
        };
        let job: Job = Box::new(move || {
            finish(&bg, begun, writer, resumed, guard, follow);
            drop(ram);
        });
        match job_tx.send(job) {
            Ok(()) => Ok(handle),
            Err(mpsc::SendError(job)) => {
                // The thread is gone (it cannot exit before its job unless
                // it panicked): roll back here. Dropping the job drops the
                // writer (its directory goes) and the slot guard; the
                // engine's wait collects its threads.
                let _ = handle.cancel();
                if let Some(e) = &engine {
                    let _ = e.wait();
                }
                drop(job);
                Err(SnapshotError::Spawn(std::io::Error::other(
                    "the snapshot thread exited before its work",
                )))
            }
        }
    }
}

impl Snapshotter {
    /// The parent of an incremental snapshot: this VM's last snapshot,
    /// with writes tracked since, still in place and unchanged.
    fn diff_base(&self, req: &SnapshotRequest) -> Result<Base, SnapshotError> {
        let refuse = |why: String| {
            SnapshotError::Conflict(format!(
                "cannot take an incremental snapshot: {why}; take a full one first"
            ))
        };
        if req.mode != Strategy::AsyncFork {
            return Err(SnapshotError::Invalid(format!(
                "incremental snapshots are taken with async-fork, not {}",
                req.mode
            )));
        }
        if !self.track_dirty {
            return Err(refuse(
                "writes are not tracked (--snapshot-track-dirty off)".into(),
            ));
        }
        let base = lock(&self.last).clone();
        let (Some(base), true) = (base, self.tracker.is_tracking()) else {
            return Err(refuse(
                "this VM has no snapshot with its writes tracked since".into(),
            ));
        };
        match SnapshotDir::open(&base.dir) {
            Ok(d) if d.content_id() == base.content => Ok(base),
            Ok(_) => Err(refuse(format!(
                "its parent {} was replaced by another snapshot",
                base.dir.display()
            ))),
            Err(e) => Err(refuse(format!(
                "its parent {} cannot be used ({e})",
                base.dir.display()
            ))),
        }
    }
}

/// What a snapshot's end means for the next one.
struct Follow {
    /// Writes are tracked from this snapshot's instant on.
    track: bool,
    tracker: Arc<TrackerSlot>,
    last: Arc<Mutex<Option<Base>>>,
}

/// The snapshot thread, placed and prioritised as `req` says; it runs the
/// job it is sent, or exits if none comes (a failed sync phase).
fn spawn_snapshot_thread(vm: &Vm, req: &SnapshotRequest) -> Result<Sender<Job>, SnapshotError> {
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let placement = vm.cpu_placement().cloned();
    let priority = req.priority;
    std::thread::Builder::new()
        .name("snapshot".into())
        .spawn(move || {
            if let Some(p) = placement {
                p.pin_background_here("the snapshot thread");
            }
            if let Err(e) = snapvm_snapshot::priority::apply_to_current_thread(priority) {
                tracing::warn!(
                    "snapshot thread keeps normal priority: cannot set {}: {e}",
                    priority.name()
                );
            }
            if let Ok(job) = job_rx.recv() {
                job();
            }
        })
        .map_err(SnapshotError::Spawn)?;
    Ok(job_tx)
}

/// The snapshot thread's work: wait for the memory, commit, record.
fn finish(
    h: &SnapshotHandle,
    begun: Begun,
    writer: SnapshotWriter,
    resumed: Instant,
    guard: SlotGuard,
    follow: Follow,
) {
    let dir = h.t.dir.clone();
    let Begun { work, blob, .. } = begun;
    let mut entries_out: Option<Vec<ChunkEntry>> = None;
    let outcome = (|| -> Result<(), String> {
        let chunks = writer.image().len() / CHUNK_SIZE;
        let summary = match work {
            Work::Fork(child) => {
                let entries = child
                    .wait(chunks as usize)
                    .map_err(|e| format!("copy failed: fork writer: {e}"))?;
                lock(&h.t.inner).metrics.copy_wait = resumed.elapsed();
                h.set_state(SnapshotState::Persisting);
                writer.commit_chunks(&entries, &blob)
            }
            Work::Engine(engine) => {
                // On failure the engine has rolled back: protections
                // lifted, writers woken.
                let snap = engine.wait().map_err(|e| format!("copy failed: {e}"))?;
                {
                    let mut inner = lock(&h.t.inner);
                    inner.metrics.copy_wait = resumed.elapsed();
                    inner.metrics.engine = Some(snap.metrics().clone());
                }
                h.set_state(SnapshotState::Persisting);
                tracing::info!(
                    "snapshot {}: memory written in {:?}, committing",
                    dir.display(),
                    snap.metrics().copy_total
                );
                entries_out = Some(snap.chunks().to_vec());
                writer.commit(&snap, &blob)
            }
        }
        .map_err(|e| format!("persist failed: {e}"))?;
        // The base of the next incremental snapshot: this one, whose
        // instant the tracker's dirty set starts from.
        if let (true, Some(entries)) = (follow.track, entries_out.take()) {
            *lock(&follow.last) = Some(Base {
                dir: dir.clone(),
                entries: Arc::new(entries),
                content: (summary.state_crc, summary.state_bytes),
            });
        }
        {
            let mut inner = lock(&h.t.inner);
            inner.metrics.persist = Some(summary);
            inner.metrics.total = h.t.t_request.elapsed();
        }
        write_metrics_file(h);
        Ok(())
    })();
    // The VM may take its next snapshot from here on (the engine is done
    // with guest RAM; the directory is committed or removed).
    drop(guard);
    match outcome {
        Ok(()) => {
            tracing::info!("snapshot {} done: {}", dir.display(), h.metrics().summary());
            h.set_state(SnapshotState::Done);
        }
        Err(why) => {
            // The tracker (if the engine left one) counts from an instant
            // no snapshot has: a diff against the older one would miss
            // writes. Tracking restarts with the next snapshot.
            follow.tracker.clear();
            *lock(&follow.last) = None;
            lock(&h.t.inner).metrics.total = h.t.t_request.elapsed();
            tracing::error!(
                "snapshot {} failed: {why}; the VM keeps running",
                dir.display()
            );
            h.set_state(SnapshotState::Failed(why));
        }
    }
}

/// `metrics.json` beside the committed snapshot: 0600 like its files, and
/// renamed into place so whoever waits for it never reads it half written.
/// A failure is only logged (the snapshot is complete without it).
fn write_metrics_file(h: &SnapshotHandle) {
    let dir = &h.t.dir;
    let json = h.metrics().to_json();
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
}
