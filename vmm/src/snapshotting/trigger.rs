//! Snapshot triggers for `snapvm run` (beside the HTTP API, `crate::api`):
//! `--snapshot-at SECONDS` takes one snapshot into `--snapshot-dir DIR`
//! itself; every SIGUSR1 takes one into `DIR-1`, `DIR-2`, ... (numbered in
//! arrival order, never overwriting: an existing target fails that
//! snapshot, the VM keeps running). A signal that arrives while a snapshot
//! is in flight is refused ("snapshot in progress") and not queued.
//!
//! Progress is logged every second (tracing info), the final metrics when
//! a snapshot is done, and a failure with its reason.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use snapshot::Strategy;

use super::{SnapshotHandle, SnapshotRequest, SnapshotState, Snapshotter};
use crate::vcpu_control::VmExit;
use crate::vm::Vm;

/// What `snapvm run` was asked to snapshot.
#[derive(Debug, Clone)]
pub struct TriggerPlan {
    pub dir: PathBuf,
    /// Seconds after start for the `--snapshot-at` snapshot.
    pub at: Option<Duration>,
    pub mode: Strategy,
    pub workers: usize,
    /// [`SnapshotRequest::priority`].
    pub priority: snapshot::BackgroundPriority,
    /// [`SnapshotRequest::memory_budget`].
    pub memory_budget: u64,
}

static SIGUSR1_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    SIGUSR1_SEEN.store(true, Ordering::SeqCst);
}

/// Installs the SIGUSR1 handler (a flag the run loop polls).
pub fn install_sigusr1() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler only
    // stores to an atomic (async-signal-safe); SA_RESTART keeps other
    // threads' syscalls from failing with EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigusr1 as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn take(
    vm: &Vm,
    snapshotter: &Snapshotter,
    plan: &TriggerPlan,
    dir: PathBuf,
    why: &str,
) -> Option<SnapshotHandle> {
    let req = SnapshotRequest {
        mode: plan.mode,
        workers: plan.workers,
        priority: plan.priority,
        memory_budget: plan.memory_budget,
        ..SnapshotRequest::new(dir.clone())
    };
    tracing::info!(
        "snapshot {} ({why}): {} with {} workers",
        dir.display(),
        plan.mode,
        plan.workers
    );
    match snapshotter.take(vm, req) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::error!(
                "snapshot {} failed: {e}; the VM keeps running",
                dir.display()
            );
            None
        }
    }
}

/// The `--snapshot-at` / SIGUSR1 trigger, polled by the loop that owns the
/// VM (this module's [`run_until_exit`], or the API's owner loop).
pub struct Trigger {
    plan: TriggerPlan,
    start: Instant,
    at: Option<Duration>,
    signals: u32,
    inflight: Option<SnapshotHandle>,
    last_log: Instant,
}

impl Trigger {
    /// Starts the `--snapshot-at` clock now.
    pub fn new(plan: TriggerPlan) -> Trigger {
        Trigger {
            at: plan.at,
            plan,
            start: Instant::now(),
            signals: 0,
            inflight: None,
            last_log: Instant::now(),
        }
    }

    pub fn plan(&self) -> &TriggerPlan {
        &self.plan
    }

    /// Takes the snapshot that is due, if any (returning its handle), and
    /// logs the progress of the one in flight once a second.
    pub fn poll(&mut self, vm: &Vm, snapshotter: &Snapshotter) -> Option<SnapshotHandle> {
        let mut started = None;
        if let Some(d) = self.at {
            if self.start.elapsed() >= d {
                self.at = None;
                started = take(
                    vm,
                    snapshotter,
                    &self.plan,
                    self.plan.dir.clone(),
                    "--snapshot-at",
                );
            }
        }
        if SIGUSR1_SEEN.swap(false, Ordering::SeqCst) {
            self.signals += 1;
            let mut name = self.plan.dir.clone().into_os_string();
            name.push(format!("-{}", self.signals));
            if let Some(h) = take(vm, snapshotter, &self.plan, PathBuf::from(name), "SIGUSR1") {
                started = Some(h);
            }
        }
        if let Some(h) = &started {
            self.inflight = Some(h.clone());
        }
        if let Some(h) = &self.inflight {
            if h.state().is_finished() {
                self.inflight = None;
            } else if self.last_log.elapsed() >= Duration::from_secs(1) {
                self.last_log = Instant::now();
                log_progress(h);
            }
        }
        started
    }

    /// Waits for the snapshot still in flight (the VM has stopped).
    pub fn finish(&mut self) {
        if let Some(h) = self.inflight.take() {
            tracing::info!(
                "VM stopped; waiting for snapshot {} to finish",
                h.dir().display()
            );
            let _ = h.wait();
        }
    }
}

/// Runs the VM until it stops, taking the planned snapshots; waits for a
/// snapshot still in flight before returning.
pub fn run_until_exit(vm: &mut Vm, plan: &TriggerPlan) -> VmExit {
    let mut trigger = Trigger::new(plan.clone());
    let snapshotter = Snapshotter::new();
    while vm.exit_reason().is_none() {
        trigger.poll(vm, &snapshotter);
        std::thread::sleep(Duration::from_millis(10));
    }
    trigger.finish();
    vm.wait()
}

fn log_progress(h: &SnapshotHandle) {
    let p = h.progress();
    match p.state {
        SnapshotState::Copying => tracing::info!(
            "snapshot {}: copying {}/{} units, {} MiB written",
            h.dir().display(),
            p.chunks_done,
            p.chunks_total,
            p.bytes_written >> 20
        ),
        SnapshotState::Persisting => tracing::info!(
            "snapshot {}: persisting {} MiB",
            h.dir().display(),
            p.bytes_written >> 20
        ),
        _ => {}
    }
}
