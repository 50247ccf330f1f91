//! The VM's owner side of the API: it holds the VM (or waits for one to be
//! loaded), answers each [`ApiCall`] the API thread forwards, keeps the
//! registry of snapshots by id and the counters `GET /metrics` reports.
//! Replies that must wait for a snapshot to end (`?wait=true`, `DELETE`)
//! are parked and answered from [`Owner::poll`], so the owner never blocks
//! on a snapshot.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use snapshot::{BackgroundPriority, Strategy};
use tokio::sync::oneshot;

use super::metrics::{self, Counters};
use super::model::{
    Action, InstanceInfo, Progress, SnapshotCreate, SnapshotList, SnapshotLoad, SnapshotStatus,
    VmPatch, VmTargetState,
};
use super::server::{ApiCall, ApiRequest, Reply};
use crate::devices::virtio::vsock::{HostListener, ListenAddr};
use crate::snapshotting::restore_cli::restore_from_dir;
use crate::snapshotting::{
    copier_count, SnapshotError, SnapshotHandle, SnapshotRequest, SnapshotState, Snapshotter,
};
use crate::vcpu_control::VmExit;
use crate::vm::Vm;

/// File name of the memory image inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.img";

/// What the VM was made from, for `GET /vm/config`.
#[derive(Debug, Clone)]
pub enum VmSource {
    Boot {
        /// `bundled` or the kernel path.
        kernel: String,
        cmdline: Option<String>,
        hugepages: bool,
    },
    Snapshot {
        path: PathBuf,
    },
}

/// How a snapvm started with only `--api-sock` builds the VM that
/// `PUT /snapshot/load` restores.
pub struct Loader {
    /// `--serial`: `stdout` or a file path.
    pub serial: String,
    pub serial_in: bool,
    /// `--kv-listen`, bound up front so a busy address fails the start.
    pub kv_addr: Option<ListenAddr>,
    pub kv_listener: Option<HostListener>,
    /// `--cpus`, applied to every loaded VM.
    pub cpus: Option<crate::placement::CpuPlacement>,
}

/// Where the VM is.
enum Slot {
    /// `--api-sock` only: nothing runs until `PUT /snapshot/load`.
    Waiting(Loader),
    Vm {
        vm: Box<Vm>,
        source: VmSource,
        /// False for a loaded VM not resumed yet.
        started: bool,
    },
}

struct Entry {
    handle: SnapshotHandle,
    mode: Strategy,
    workers: usize,
    cancelled: bool,
    counted: bool,
}

enum Parked {
    /// `PUT /snapshot/create?wait=true`.
    Create,
    /// `DELETE /snapshot/{id}`.
    Cancel,
}

struct Waiter {
    id: u64,
    kind: Parked,
    reply: oneshot::Sender<Reply>,
}

/// The VM's owner (see the module docs).
pub struct Owner {
    slot: Slot,
    instance_id: String,
    default_workers: usize,
    /// `--snapshot-priority` for API snapshots.
    priority: BackgroundPriority,
    /// `--snapshot-memory-budget`: the default of `"memory_budget"`.
    memory_budget: u64,
    /// The VM's snapshots: one in flight, the staging pool.
    snapshotter: Snapshotter,
    snapshots: BTreeMap<u64, Entry>,
    next_id: u64,
    waiters: Vec<Waiter>,
    counters: Counters,
    shutdown: bool,
}

impl Owner {
    /// An owner of a VM already built (and started: `snapvm run`).
    pub fn with_vm(vm: Vm, source: VmSource, instance_id: String, workers: usize) -> Owner {
        Owner::new(
            Slot::Vm {
                vm: Box::new(vm),
                source,
                started: true,
            },
            instance_id,
            workers,
        )
    }

    /// Applies `--snapshot-priority` and `--snapshot-memory-budget` to the
    /// snapshots this owner takes.
    pub fn set_snapshot_options(&mut self, priority: BackgroundPriority, memory_budget: u64) {
        self.priority = priority;
        self.memory_budget = memory_budget;
    }

    /// The VM's snapshotter (the trigger takes its snapshots through it).
    pub fn snapshotter(&self) -> &Snapshotter {
        &self.snapshotter
    }

    /// An owner waiting for `PUT /snapshot/load`.
    pub fn waiting(loader: Loader, instance_id: String, workers: usize) -> Owner {
        Owner::new(Slot::Waiting(loader), instance_id, workers)
    }

    fn new(slot: Slot, instance_id: String, default_workers: usize) -> Owner {
        Owner {
            slot,
            instance_id,
            default_workers,
            priority: BackgroundPriority::default(),
            memory_budget: snapshot::DEFAULT_BUDGET,
            snapshotter: Snapshotter::new(),
            snapshots: BTreeMap::new(),
            next_id: 1,
            waiters: Vec::new(),
            counters: Counters::default(),
            shutdown: false,
        }
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

    /// Whether `PUT /actions {"action_type": "Shutdown"}` was asked.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown
    }

    pub fn request_shutdown(&mut self) {
        self.shutdown = true;
    }

    /// Adds a snapshot (taken by the API or by the SIGUSR1 /
    /// --snapshot-at trigger) to the registry, so the API reports it.
    pub fn register(&mut self, handle: SnapshotHandle, mode: Strategy, workers: usize) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let pause = handle.metrics().sync.total;
        if !pause.is_zero() {
            self.counters.last_pause = Some(pause);
        }
        self.snapshots.insert(
            id,
            Entry {
                handle,
                mode,
                workers: copier_count(mode, workers),
                cancelled: false,
                counted: false,
            },
        );
        id
    }

    /// Answers one request.
    pub fn handle(&mut self, call: ApiCall) {
        let ApiCall { request, reply } = call;
        tracing::debug!("API request: {request:?}");
        let answer = match request {
            ApiRequest::Info => Reply::json(200, &self.info()),
            ApiRequest::VmConfig => self.vm_config(),
            ApiRequest::PatchVm(p) => self.patch_vm(&p),
            ApiRequest::CreateSnapshot { body, wait } => match self.create(&body) {
                Ok(id) if wait => {
                    self.waiters.push(Waiter {
                        id,
                        kind: Parked::Create,
                        reply,
                    });
                    return;
                }
                Ok(id) => Reply::json(201, &self.status(id)),
                Err(fault) => fault,
            },
            ApiRequest::GetSnapshot(id) => match self.find(&id) {
                Ok(id) => Reply::json(200, &self.status(id)),
                Err(fault) => fault,
            },
            ApiRequest::ListSnapshots => {
                let list = SnapshotList {
                    snapshots: self.snapshots.keys().map(|&id| self.status(id)).collect(),
                };
                Reply::json(200, &list)
            }
            ApiRequest::CancelSnapshot(id) => match self.cancel(&id) {
                Ok(id) => {
                    self.waiters.push(Waiter {
                        id,
                        kind: Parked::Cancel,
                        reply,
                    });
                    return;
                }
                Err(fault) => fault,
            },
            ApiRequest::LoadSnapshot(body) => self.load(&body),
            ApiRequest::Action(a) => self.action(&a),
            ApiRequest::Metrics => self.metrics(),
        };
        // The client may have gone away; nothing to do then.
        let _ = reply.send(answer);
    }

    /// Counts finished snapshots and answers the replies parked on them.
    pub fn poll(&mut self) {
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
                (Parked::Create, SnapshotState::Failed(why)) => {
                    Reply::fault(500, format!("snapshot {} failed: {why}", w.id))
                }
                (Parked::Create, _) => Reply::json(200, &self.status(w.id)),
                (Parked::Cancel, SnapshotState::Done) => Reply::fault(
                    409,
                    format!("snapshot {} finished before the cancel took effect", w.id),
                ),
                (Parked::Cancel, _) => Reply::json(200, &self.status(w.id)),
            };
            let _ = w.reply.send(answer);
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
        exit
    }

    fn vm_state_name(&self) -> &'static str {
        match &self.slot {
            Slot::Waiting(_) => "Not started",
            Slot::Vm { vm, started, .. } => {
                if vm.exit_reason().is_some() {
                    "Stopped"
                } else if !*started || vm.is_paused() {
                    "Paused"
                } else {
                    "Running"
                }
            }
        }
    }

    fn info(&self) -> InstanceInfo {
        InstanceInfo {
            id: self.instance_id.clone(),
            state: self.vm_state_name().to_string(),
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            app_name: "snapvm".to_string(),
        }
    }

    /// The VM, or the 409 that says why there is none to act on.
    fn live_vm(&self) -> Result<(&Vm, bool), Reply> {
        match &self.slot {
            Slot::Waiting(_) => Err(Reply::fault(
                409,
                "no VM yet: load one with PUT /snapshot/load",
            )),
            Slot::Vm { vm, started, .. } => {
                if vm.exit_reason().is_some() {
                    Err(Reply::fault(409, "the VM has stopped"))
                } else {
                    Ok((vm, *started))
                }
            }
        }
    }

    fn vm_config(&self) -> Reply {
        let Slot::Vm { vm, source, .. } = &self.slot else {
            return Reply::fault(409, "no VM yet: load one with PUT /snapshot/load");
        };
        let mut config = serde_json::json!({
            "machine_config": {
                "vcpu_count": vm.vcpu_count(),
                "mem_size_mib": vm.memory().size() >> 20,
            },
        });
        if let Some(p) = vm.cpu_placement() {
            config["machine_config"]["cpus"] = serde_json::json!({
                "guest": p.guest.to_string(),
                "background": p.background.as_ref().map(ToString::to_string),
            });
        }
        match source {
            VmSource::Boot {
                kernel,
                cmdline,
                hugepages,
            } => {
                config["machine_config"]["huge_pages"] = (*hugepages).into();
                config["boot_source"] = serde_json::json!({
                    "kernel_image_path": kernel,
                    "boot_args": cmdline,
                });
            }
            VmSource::Snapshot { path } => {
                config["snapshot"] = serde_json::json!({
                    "snapshot_path": path.display().to_string(),
                });
            }
        }
        Reply::json(200, &config)
    }

    fn patch_vm(&mut self, patch: &VmPatch) -> Reply {
        if let Err(fault) = self.live_vm() {
            return fault;
        }
        let Slot::Vm { vm, started, .. } = &mut self.slot else {
            return Reply::fault(500, "no VM");
        };
        match patch.state {
            VmTargetState::Paused => {
                if !*started || vm.is_paused() {
                    return Reply::no_content();
                }
                match vm.pause() {
                    Ok(()) => {
                        tracing::info!("VM paused (API)");
                        Reply::no_content()
                    }
                    Err(e) => Reply::fault(409, format!("cannot pause the VM: {e}")),
                }
            }
            VmTargetState::Resumed => {
                if !*started {
                    return match vm.start() {
                        Ok(()) => {
                            *started = true;
                            tracing::info!("loaded VM started (API)");
                            Reply::no_content()
                        }
                        Err(e) => Reply::fault(500, format!("cannot start the VM: {e}")),
                    };
                }
                if !vm.is_paused() {
                    return Reply::no_content();
                }
                match vm.resume() {
                    Ok(()) => {
                        tracing::info!("VM resumed (API)");
                        Reply::no_content()
                    }
                    Err(e) => Reply::fault(409, format!("cannot resume the VM: {e}")),
                }
            }
        }
    }

    fn create(&mut self, body: &SnapshotCreate) -> Result<u64, Reply> {
        let bad = |msg: String| Err(Reply::fault(400, msg));
        match body.snapshot_type.as_deref() {
            None | Some("Full") => {}
            Some(t) => return bad(format!("unsupported snapshot_type '{t}': only Full")),
        }
        let mode = match body.mode.as_deref() {
            None => Strategy::AsyncFork,
            Some(m) => match Strategy::from_name(m) {
                Some(s) => s,
                None => {
                    return bad(format!(
                        "unknown mode '{m}': expected async-fork, stop-the-world, fork or sync-wp"
                    ))
                }
            },
        };
        let workers = match body.workers {
            None => self.default_workers,
            Some(n) if (1..=64).contains(&n) => n as usize,
            Some(n) => return bad(format!("workers {n}: expected 1..=64")),
        };
        let dir = snapshot_dir(&body.snapshot_path, body.mem_file_path.as_deref())?;
        if !body.overwrite && std::fs::symlink_metadata(&dir).is_ok() {
            return bad(format!(
                "snapshot_path {} exists: pass \"overwrite\": true to replace it",
                dir.display()
            ));
        }
        match dir.parent() {
            Some(p) if p.is_dir() => {}
            _ => {
                return bad(format!(
                    "snapshot_path {}: the parent directory does not exist",
                    dir.display()
                ))
            }
        }
        let memory_budget = body.memory_budget.unwrap_or(self.memory_budget);
        let (vm, _) = self.live_vm()?;
        if matches!(
            &self.slot,
            Slot::Vm {
                source: VmSource::Snapshot { .. },
                ..
            }
        ) {
            return Err(Reply::fault(
                409,
                "a restored VM cannot be snapshotted yet (its memory is the mapped snapshot image)",
            ));
        }
        let req = SnapshotRequest {
            mode,
            workers,
            overwrite: body.overwrite,
            priority: self.priority,
            memory_budget,
            ..SnapshotRequest::new(dir.clone())
        };
        let req = super::test_hooks::apply(req);
        tracing::info!(
            "snapshot {} (API): {mode} with {workers} workers",
            dir.display()
        );
        match self.snapshotter.take(vm, req) {
            Ok(handle) => Ok(self.register(handle, mode, workers)),
            Err(e) => {
                let status = match &e {
                    SnapshotError::InProgress | SnapshotError::Pause(_) => 409,
                    SnapshotError::Invalid(_) => 400,
                    SnapshotError::Target(
                        snapshot::PersistError::TargetExists(_)
                        | snapshot::PersistError::TargetNotDirectory(_)
                        | snapshot::PersistError::InvalidTarget(_),
                    ) => 400,
                    _ => 500,
                };
                tracing::error!(
                    "snapshot {} failed: {e}; the VM keeps running",
                    dir.display()
                );
                Err(Reply::fault(status, e.to_string()))
            }
        }
    }

    fn find(&self, id: &str) -> Result<u64, Reply> {
        id.parse::<u64>()
            .ok()
            .filter(|n| self.snapshots.contains_key(n))
            .ok_or_else(|| Reply::fault(404, format!("unknown snapshot id '{id}'")))
    }

    fn status(&self, id: u64) -> SnapshotStatus {
        let Some(e) = self.snapshots.get(&id) else {
            // Only called with registered ids.
            return SnapshotStatus {
                id: id.to_string(),
                snapshot_path: String::new(),
                mode: String::new(),
                workers: 0,
                state: "failed".into(),
                reason: Some("unknown snapshot".into()),
                progress: Progress {
                    chunks_done: 0,
                    chunks_total: 0,
                    bytes_written: 0,
                    image_len: 0,
                },
                metrics: serde_json::Value::Null,
            };
        };
        let p = e.handle.progress();
        let reason = match &p.state {
            SnapshotState::Failed(why) => Some(why.clone()),
            _ => None,
        };
        SnapshotStatus {
            id: id.to_string(),
            snapshot_path: e.handle.dir().display().to_string(),
            mode: e.mode.to_string(),
            workers: e.workers as u64,
            state: p.state.name().to_string(),
            reason,
            progress: Progress {
                chunks_done: p.chunks_done as u64,
                chunks_total: p.chunks_total as u64,
                bytes_written: p.bytes_written,
                image_len: p.image_len,
            },
            metrics: e.handle.metrics().to_value(),
        }
    }

    fn cancel(&mut self, id: &str) -> Result<u64, Reply> {
        let id = self.find(id)?;
        let Some(e) = self.snapshots.get_mut(&id) else {
            return Err(Reply::fault(404, format!("unknown snapshot id '{id}'")));
        };
        match e.handle.state() {
            SnapshotState::Copying => {}
            SnapshotState::Persisting => {
                return Err(Reply::fault(
                    409,
                    format!("snapshot {id} is persisting: too late to cancel"),
                ))
            }
            SnapshotState::Done => {
                return Err(Reply::fault(
                    409,
                    format!("snapshot {id} is done: nothing to cancel"),
                ))
            }
            SnapshotState::Failed(_) => {
                return Err(Reply::fault(
                    409,
                    format!("snapshot {id} has failed: nothing to cancel"),
                ))
            }
        }
        match e.handle.cancel() {
            Ok(()) => {
                e.cancelled = true;
                tracing::info!("snapshot {} cancelled (API)", e.handle.dir().display());
                Ok(id)
            }
            Err(err) => Err(Reply::fault(
                409,
                format!("snapshot {id} cannot be cancelled now: {err}"),
            )),
        }
    }

    fn load(&mut self, body: &SnapshotLoad) -> Reply {
        let loader = match &mut self.slot {
            Slot::Waiting(l) => l,
            Slot::Vm { .. } => {
                return Reply::fault(
                    409,
                    "a VM is already running: PUT /snapshot/load needs a snapvm started with only --api-sock",
                )
            }
        };
        let dir = match snapshot_dir(&body.snapshot_path, body.mem_file_path.as_deref()) {
            Ok(d) => d,
            Err(fault) => return fault,
        };
        let serial_out: Box<dyn Write + Send> =
            match crate::vm::VmConfig::serial_sink(&loader.serial) {
                Ok(s) => s,
                Err(e) => return Reply::fault(500, e.to_string()),
            };
        // A failed load consumed the listener: bind the address again.
        let listener = match (loader.kv_listener.take(), &loader.kv_addr) {
            (Some(l), _) => Some(l),
            (None, Some(addr)) => match HostListener::bind(addr) {
                Ok(l) => Some(l),
                Err(e) => return Reply::fault(500, format!("cannot listen on {addr}: {e}")),
            },
            (None, None) => None,
        };
        let t = std::time::Instant::now();
        let mut vm =
            match restore_from_dir(&dir, body.verify, serial_out, loader.serial_in, listener) {
                Ok(vm) => vm,
                Err(e) => return Reply::fault(400, e.to_string()),
            };
        if let Some(p) = &loader.cpus {
            vm.set_cpu_placement(p.clone());
        }
        let mut started = false;
        if body.resume_vm {
            if let Err(e) = vm.start() {
                return Reply::fault(500, format!("cannot start the loaded VM: {e}"));
            }
            started = true;
        }
        tracing::info!(
            "loaded {} in {:.1} ms ({})",
            dir.display(),
            t.elapsed().as_secs_f64() * 1e3,
            if started { "running" } else { "paused" }
        );
        self.slot = Slot::Vm {
            vm: Box::new(vm),
            source: VmSource::Snapshot { path: dir },
            started,
        };
        Reply::no_content()
    }

    fn action(&mut self, action: &Action) -> Reply {
        match action.action_type.as_str() {
            "Shutdown" => {
                tracing::info!("shutdown requested (API)");
                self.shutdown = true;
                Reply::no_content()
            }
            other => Reply::fault(
                400,
                format!("unsupported action_type '{other}': expected Shutdown"),
            ),
        }
    }

    fn metrics(&self) -> Reply {
        let in_flight = self
            .snapshots
            .values()
            .filter(|e| !e.handle.state().is_finished())
            .count();
        let mut counters = self.counters.clone();
        counters.staging_bytes = self.snapshotter.staging_bytes();
        match metrics::render(self.vm_state_name(), in_flight, &counters) {
            Ok(text) => Reply {
                status: 200,
                body: super::server::ReplyBody::Metrics(text),
            },
            Err(e) => Reply::fault(500, format!("cannot render metrics: {e}")),
        }
    }
}

/// The snapshot directory named by a request: absolute, and a
/// `mem_file_path`, if given, must be the image inside it (snapvm keeps
/// the memory image in the directory).
fn snapshot_dir(snapshot_path: &str, mem_file_path: Option<&str>) -> Result<PathBuf, Reply> {
    let dir = Path::new(snapshot_path);
    if snapshot_path.is_empty() || !dir.is_absolute() {
        return Err(Reply::fault(
            400,
            format!("snapshot_path '{snapshot_path}' must be an absolute path"),
        ));
    }
    if let Some(mem) = mem_file_path {
        if Path::new(mem) != dir.join(MEMORY_FILE) {
            return Err(Reply::fault(
                400,
                format!(
                    "mem_file_path '{mem}' must be absent or {}: snapvm keeps the memory image inside the snapshot directory",
                    dir.join(MEMORY_FILE).display()
                ),
            ));
        }
    }
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_dirs() {
        assert_eq!(snapshot_dir("/a/b", None).unwrap(), PathBuf::from("/a/b"));
        assert!(snapshot_dir("/a/b", Some("/a/b/memory.img")).is_ok());
        assert!(snapshot_dir("/a/b/", Some("/a/b/memory.img")).is_ok());
        assert_eq!(
            snapshot_dir("/a/b", Some("/a/mem")).unwrap_err().status,
            400
        );
        assert_eq!(snapshot_dir("rel", None).unwrap_err().status, 400);
        assert_eq!(snapshot_dir("", None).unwrap_err().status, 400);
    }
}
