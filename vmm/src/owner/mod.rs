//! The VM's owner: the one thread that touches the VM (DESIGN.md §4, as
//! Firecracker's `rpc_interface`). It holds the VM (or waits for one to be
//! loaded), its [`Snapshotter`] and the registry of snapshots, and acts on
//! [`Request`]s that arrive over one channel — from the HTTP API thread,
//! and from the `--snapshot-at` / SIGUSR1 trigger — and from the snapshot
//! schedule it holds (`owner/schedules.rs`), answering each with a
//! domain [`Response`] or [`OwnerError`]. How those become HTTP statuses
//! and bodies is the API's business (`api::rpc`).
//!
//! Answers that must wait for a snapshot to end (`wait`, cancel) are parked
//! and sent from [`Owner::poll`], so the owner never blocks on a snapshot.

mod schedules;
mod snapshots;
mod vm_ops;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use snapvm_snapshot::{BackgroundPriority, Strategy};
use tokio::sync::oneshot;

use crate::devices::virtio::vsock::{HostListener, ListenAddr};
use crate::snapshotting::{SnapshotHandle, SnapshotState, Snapshotter};
use crate::vcpu_control::VmExit;
use crate::vm::Vm;

pub use schedules::ScheduleOrder;
pub use snapshots::Counters;

/// How often the owner loop looks at the VM and the snapshots when no
/// request arrives.
const TICK: Duration = Duration::from_millis(10);

/// What the VM was made from, for `GET /vm/config`.
#[derive(Debug, Clone)]
pub enum VmSource {
    Boot {
        /// `bundled` or the kernel path.
        kernel: String,
        cmdline: Option<String>,
    },
    Snapshot {
        path: PathBuf,
    },
}

/// How a snapvm started with `--no-boot` builds the VM that a load
/// restores.
pub struct LoadSettings {
    /// `--serial`: `stdout` or a file path.
    pub serial: String,
    pub serial_in: bool,
    /// `--kv-listen`, bound up front so a busy address fails the start.
    pub kv_addr: Option<ListenAddr>,
    pub kv_listener: Option<HostListener>,
    /// `--cpus`, applied to every loaded VM.
    pub cpus: Option<crate::placement::CpuPlacement>,
    /// `--hugepages`: the loaded VM's guest RAM backing.
    pub backing: crate::memory::PageBacking,
}

/// A snapshot to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOrder {
    /// Absolute path of the snapshot directory.
    pub dir: PathBuf,
    pub mode: Strategy,
    /// None: the owner's default (`--snapshot-workers`).
    pub workers: Option<usize>,
    pub overwrite: bool,
    /// None: the owner's default (`--snapshot-memory-budget`).
    pub memory_budget: Option<u64>,
    /// Only what changed since the VM's last snapshot (`Diff`).
    pub incremental: bool,
    /// Answer once the snapshot ended instead of once it began.
    pub wait: bool,
}

/// A snapshot directory to load into a waiting snapvm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOrder {
    pub dir: PathBuf,
    pub resume: bool,
    pub verify: bool,
}

/// `PATCH /vm`'s target.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub enum VmTargetState {
    Paused,
    Resumed,
}

/// What the owner is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Info,
    VmConfig,
    SetVmState(VmTargetState),
    CreateSnapshot(SnapshotOrder),
    GetSnapshot(String),
    ListSnapshots,
    CancelSnapshot(String),
    LoadSnapshot(LoadOrder),
    StartSchedule(ScheduleOrder),
    GetSchedule,
    StopSchedule,
    Shutdown,
    Metrics,
}

/// What the owner answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// Done, nothing to say.
    Empty,
    Info(InstanceInfo),
    VmConfig(serde_json::Value),
    Snapshot(SnapshotStatus),
    Snapshots(SnapshotList),
    Schedule(crate::schedule::ScheduleStatus),
    // Boxed: the report is several times the size of the other answers.
    Metrics(Box<MetricsReport>),
}

/// Why a request was not carried out; the VM is as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnerError {
    /// The request itself is wrong (a bad path, an existing target).
    #[error("{0}")]
    Invalid(String),
    /// It names something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Not now: the VM or the snapshot is in the wrong state for it.
    #[error("{0}")]
    Conflict(String),
    /// It was tried and failed.
    #[error("{0}")]
    Failed(String),
}

/// A request and where its answer goes (none for the trigger's).
pub struct Envelope {
    pub request: Request,
    pub reply: Option<oneshot::Sender<Result<Response, OwnerError>>>,
}

/// `GET /`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    /// `Not started` (waiting for a load), `Running`, `Paused` or `Stopped`.
    pub state: String,
    pub vmm_version: String,
    pub app_name: String,
    /// A restored VM: its memory loading from the snapshot (absent for a
    /// booted VM).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub memory_load: Option<MemoryLoad>,
}

/// How far a restored VM's memory has loaded from its snapshot.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct MemoryLoad {
    pub snapshot_path: PathBuf,
    /// `loading`, `done` (the VM no longer needs the snapshot directory) or
    /// `failed` (the VM was stopped; see `error`).
    pub state: String,
    /// Data chunks (2 MiB) loaded, of the total (holes are not loaded).
    pub chunks_loaded: u64,
    pub chunks_total: u64,
    /// Of those, loaded because the guest (or a device) touched them first.
    pub chunks_on_demand: u64,
    /// Chunks copied in 4 KiB pages because the kernel would not move
    /// their huge page (same data, no huge page for that chunk).
    #[serde(default)]
    pub chunks_copied_in: u64,
    /// Huge-page moves the kernel refused for a moment and the loader
    /// tried again (the chunk keeps its huge page).
    #[serde(default)]
    pub moves_retried: u64,
    pub bytes_read: u64,
    /// Since the restore (until done).
    pub elapsed_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

impl MemoryLoad {
    pub fn of(l: &snapvm_snapshot::lazy::Loader) -> MemoryLoad {
        let p = l.progress();
        MemoryLoad {
            snapshot_path: l.dir().to_path_buf(),
            state: p.state.name().to_string(),
            chunks_loaded: p.chunks_loaded,
            chunks_total: p.chunks_total,
            chunks_on_demand: p.chunks_on_demand,
            chunks_copied_in: p.chunks_copied_in,
            moves_retried: p.moves_retried,
            bytes_read: p.bytes_read,
            elapsed_ms: p.elapsed.as_millis() as u64,
            error: p.error,
        }
    }
}

/// Live progress of a snapshot.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Progress {
    /// Copy units saved (2 MiB chunks; 4 KiB pages for sync-wp), of the
    /// total (0 for the fork baseline).
    pub chunks_done: u64,
    pub chunks_total: u64,
    /// Bytes of guest memory in the image so far.
    pub bytes_written: u64,
    /// The image's length (guest RAM).
    pub image_len: u64,
}

/// One snapshot's state.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct SnapshotStatus {
    pub id: String,
    pub snapshot_path: String,
    pub mode: String,
    pub workers: u64,
    /// `copying` (memory streaming into the image; the snapshot's instant
    /// has passed), `persisting` (fsync, state file, rename), `done`
    /// (durable) or `failed`.
    pub state: String,
    /// Why it failed (`failed` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub progress: Progress,
    /// The snapshot's metrics so far (complete once done): the same object
    /// as its `metrics.json`.
    pub metrics: serde_json::Value,
}

/// Every snapshot of this snapvm.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotStatus>,
    /// `--snapshot-every`: the schedule and how it goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<crate::schedule::ScheduleStatus>,
    /// Writes tracked since the last snapshot: the chunks an incremental
    /// snapshot would write now, and its parent (absent when writes are
    /// not tracked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<Tracking>,
}

/// What an incremental snapshot would build on now.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Tracking {
    pub dirty_chunks: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// What `GET /metrics` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsReport {
    pub vm_state: &'static str,
    pub in_flight: usize,
    pub counters: Counters,
    pub memory_load: Option<MemoryLoad>,
    pub schedule: Option<crate::schedule::ScheduleStatus>,
    pub tracking: Option<Tracking>,
}

/// Where the VM is.
enum Slot {
    /// Nothing runs until a load.
    Waiting(LoadSettings),
    Vm {
        vm: Box<Vm>,
        source: VmSource,
        /// False for a loaded VM not resumed yet.
        started: bool,
    },
}

/// The owner's settings for the snapshots it takes.
#[derive(Debug, Clone)]
pub struct SnapshotDefaults {
    /// `--snapshot-workers`.
    pub workers: usize,
    /// `--snapshot-priority`.
    pub priority: BackgroundPriority,
    /// `--snapshot-memory-budget`.
    pub memory_budget: u64,
    /// `--snapshot-track-dirty`: track writes between snapshots, so the
    /// next may be incremental.
    pub track_dirty: bool,
    /// `--snapshot-pool at-start` (with a mode that stages): allocate the
    /// staging pool once the VM runs, not at its first snapshot.
    pub pool_at_start: bool,
}

impl Default for SnapshotDefaults {
    fn default() -> SnapshotDefaults {
        SnapshotDefaults {
            workers: 2,
            priority: BackgroundPriority::default(),
            memory_budget: snapvm_snapshot::DEFAULT_BUDGET,
            track_dirty: true,
            pool_at_start: false,
        }
    }
}

struct Entry {
    handle: SnapshotHandle,
    mode: Strategy,
    workers: usize,
    cancelled: bool,
    counted: bool,
}

enum Parked {
    /// A snapshot order with `wait`.
    Create,
    /// A cancel, answered once the rollback is done.
    Cancel,
}

struct Waiter {
    id: u64,
    kind: Parked,
    reply: oneshot::Sender<Result<Response, OwnerError>>,
}

/// The VM's owner (see the module docs).
pub struct Owner {
    slot: Slot,
    instance_id: String,
    defaults: SnapshotDefaults,
    snapshotter: Snapshotter,
    snapshots: BTreeMap<u64, Entry>,
    next_id: u64,
    waiters: Vec<Waiter>,
    counters: Counters,
    shutdown: bool,
    last_progress_log: Instant,
    /// The snapshot schedule (`--snapshot-every`, `PUT /snapshot/schedule`).
    schedule: Option<crate::schedule::Scheduler>,
    /// Stopped schedules whose last snapshot is still under way.
    stopping: Vec<crate::schedule::Scheduler>,
    /// The staging pool is to be allocated at start and has not been yet.
    pool_pending: bool,
}

impl Owner {
    /// An owner of a VM already built and started.
    pub fn with_vm(vm: Vm, source: VmSource, instance_id: String) -> Owner {
        Owner::new(
            Slot::Vm {
                vm: Box::new(vm),
                source,
                started: true,
            },
            instance_id,
        )
    }

    /// An owner waiting for a load.
    pub fn waiting(loader: LoadSettings, instance_id: String) -> Owner {
        Owner::new(Slot::Waiting(loader), instance_id)
    }

    fn new(slot: Slot, instance_id: String) -> Owner {
        Owner {
            slot,
            instance_id,
            defaults: SnapshotDefaults::default(),
            snapshotter: Snapshotter::new(),
            snapshots: BTreeMap::new(),
            next_id: 1,
            waiters: Vec::new(),
            counters: Counters::default(),
            shutdown: false,
            last_progress_log: Instant::now(),
            schedule: None,
            stopping: Vec::new(),
            pool_pending: false,
        }
    }

    /// The settings of the snapshots this owner takes.
    pub fn set_snapshot_defaults(&mut self, defaults: SnapshotDefaults) {
        self.snapshotter.set_track_dirty(defaults.track_dirty);
        self.pool_pending = defaults.pool_at_start && defaults.memory_budget > 0;
        self.defaults = defaults;
    }

    pub fn vm(&self) -> Option<&Vm> {
        match &self.slot {
            Slot::Vm { vm, .. } => Some(vm),
            Slot::Waiting(_) => None,
        }
    }

    /// Why the VM stopped, if it has.
    pub fn exit_reason(&self) -> Option<VmExit> {
        self.vm().and_then(|vm| vm.exit_reason())
    }

    /// Whether a shutdown was asked.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown
    }

    pub fn request_shutdown(&mut self) {
        self.shutdown = true;
    }

    /// Acts on one request and answers it (or parks the answer).
    pub fn handle(&mut self, envelope: Envelope) {
        let Envelope { request, reply } = envelope;
        tracing::debug!("request: {request:?}");
        let from_trigger = reply.is_none();
        let answer = match request {
            Request::Info => Ok(Response::Info(self.info())),
            Request::VmConfig => self.vm_config().map(Response::VmConfig),
            Request::SetVmState(s) => self.set_vm_state(s).map(|()| Response::Empty),
            Request::CreateSnapshot(order) => {
                let wait = order.wait;
                match self.create(&order) {
                    Ok(id) if wait => {
                        if let Some(reply) = reply {
                            self.waiters.push(Waiter {
                                id,
                                kind: Parked::Create,
                                reply,
                            });
                        }
                        return;
                    }
                    Ok(id) => Ok(Response::Snapshot(self.status(id))),
                    Err(e) => {
                        if from_trigger {
                            tracing::error!(
                                "snapshot {} failed: {e}; the VM keeps running",
                                order.dir.display()
                            );
                        }
                        Err(e)
                    }
                }
            }
            Request::GetSnapshot(id) => {
                self.find(&id).map(|id| Response::Snapshot(self.status(id)))
            }
            Request::ListSnapshots => Ok(Response::Snapshots(SnapshotList {
                snapshots: self.snapshots.keys().map(|&id| self.status(id)).collect(),
                schedule: self.schedule_status(),
                tracking: self.tracking(),
            })),
            Request::CancelSnapshot(id) => match self.cancel(&id) {
                Ok(id) => {
                    if let Some(reply) = reply {
                        self.waiters.push(Waiter {
                            id,
                            kind: Parked::Cancel,
                            reply,
                        });
                    }
                    return;
                }
                Err(e) => Err(e),
            },
            Request::LoadSnapshot(order) => self.load(&order).map(|()| Response::Empty),
            Request::StartSchedule(order) => self.start_schedule(order).map(Response::Schedule),
            Request::GetSchedule => self
                .schedule_status()
                .map(Response::Schedule)
                .ok_or_else(|| OwnerError::NotFound("no snapshot schedule is running".into())),
            Request::StopSchedule => self.stop_schedule().map(|()| Response::Empty),
            Request::Shutdown => {
                tracing::info!("shutdown requested");
                self.shutdown = true;
                Ok(Response::Empty)
            }
            Request::Metrics => Ok(Response::Metrics(Box::new(self.metrics()))),
        };
        if let Some(reply) = reply {
            // The client may have gone away; nothing to do then.
            let _ = reply.send(answer);
        }
    }

    /// `--snapshot-pool at-start`: allocates the staging pool once there is
    /// a VM whose memory is all in. Populating fresh memory competes with
    /// a restore's loader for the same slow resource (docs/journal/
    /// 2026-12-05-cold-staging-pool.md), so a restored VM gets its pool
    /// after the load. The population runs on the pool's own thread.
    fn poll_pool(&mut self) {
        if !self.pool_pending {
            return;
        }
        let Some(vm) = self.vm() else {
            return;
        };
        if vm.memory().loader().is_some_and(|l| !l.is_released()) {
            return;
        }
        let guest_bytes = vm.memory().size();
        self.pool_pending = false;
        self.snapshotter
            .prepare_pool(self.defaults.memory_budget, guest_bytes);
    }

    /// Counts finished snapshots, answers the replies parked on them, and
    /// logs the progress of those in flight once a second.
    pub fn poll(&mut self) {
        self.poll_schedule();
        self.poll_pool();
        for entry in self.snapshots.values_mut() {
            if entry.counted {
                continue;
            }
            let state = entry.handle.state();
            if !state.is_finished() {
                continue;
            }
            entry.counted = true;
            self.counters.record(&state, entry.cancelled, &entry.handle);
        }
        let waiters = std::mem::take(&mut self.waiters);
        for w in waiters {
            let state = match self.snapshots.get(&w.id) {
                Some(e) => e.handle.state(),
                None => SnapshotState::Failed("snapshot vanished".into()),
            };
            if !state.is_finished() {
                self.waiters.push(w);
                continue;
            }
            let answer = match (w.kind, &state) {
                (Parked::Create, SnapshotState::Failed(why)) => Err(OwnerError::Failed(format!(
                    "snapshot {} failed: {why}",
                    w.id
                ))),
                (Parked::Cancel, SnapshotState::Done) => Err(OwnerError::Conflict(format!(
                    "snapshot {} finished before the cancel took effect",
                    w.id
                ))),
                _ => Ok(Response::Snapshot(self.status(w.id))),
            };
            let _ = w.reply.send(answer);
        }
        if self.last_progress_log.elapsed() >= Duration::from_secs(1) {
            self.last_progress_log = Instant::now();
            for e in self.snapshots.values().filter(|e| !e.counted) {
                snapshots::log_progress(&e.handle);
            }
        }
    }

    /// Ends the owner: stops the VM if a shutdown was asked, cancels
    /// snapshots still copying on a shutdown (a stopped guest would never
    /// finish a held copy), waits for the others, answers parked replies,
    /// and returns why the VM stopped.
    pub fn finish(mut self) -> VmExit {
        if self.shutdown {
            for e in self.snapshots.values_mut() {
                if e.handle.state() == SnapshotState::Copying && e.handle.cancel().is_ok() {
                    e.cancelled = true;
                }
            }
        }
        let exit = match &mut self.slot {
            Slot::Vm { vm, started, .. } => {
                if self.shutdown || !*started {
                    vm.shutdown()
                } else {
                    vm.wait()
                }
            }
            Slot::Waiting(_) => VmExit::Shutdown,
        };
        for e in self.snapshots.values() {
            if !e.handle.state().is_finished() {
                tracing::info!(
                    "VM stopped; waiting for snapshot {} to finish",
                    e.handle.dir().display()
                );
                let _ = e.handle.wait();
            }
        }
        self.poll();
        self.end_schedules();
        exit
    }
}

/// The owner loop: acts on every request that arrives, polls the
/// snapshots, and returns when the VM stopped or a shutdown was asked
/// (a request, or SIGINT/SIGTERM when `stop_on_signal`). A closed channel
/// (every sender gone) ends it too when `stop_when_alone`, as when the API
/// thread died. Ends with [`Owner::finish`].
pub fn run(
    mut owner: Owner,
    requests: &Receiver<Envelope>,
    stop_on_signal: bool,
    stop_when_alone: bool,
) -> VmExit {
    loop {
        if owner.exit_reason().is_some() || owner.shutdown_requested() {
            break;
        }
        if stop_on_signal && crate::signals::take_stop() {
            tracing::info!("stop signal: shutting down");
            owner.request_shutdown();
            break;
        }
        if crate::signals::take_ignored_snapshot() {
            tracing::warn!(
                "SIGUSR1 ignored: nothing takes snapshots on it (start snapvm with --snapshot-dir DIR for that; with --api-sock, PUT /snapshot/create takes one)"
            );
        }
        match requests.recv_timeout(TICK) {
            Ok(envelope) => owner.handle(envelope),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) if stop_when_alone => {
                tracing::error!("the API thread has stopped; shutting down");
                owner.request_shutdown();
                break;
            }
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(TICK),
        }
        owner.poll();
    }
    owner.finish()
}

/// Sends a request that expects no answer (the trigger's).
pub fn notify(to: &Sender<Envelope>, request: Request) -> bool {
    to.send(Envelope {
        request,
        reply: None,
    })
    .is_ok()
}
