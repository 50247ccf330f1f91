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

use super::{SnapshotHandle, SnapshotRequest, SnapshotState};
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
    /// [`SnapshotRequest::keep_memory`].
    pub keep_memory: bool,
    /// [`SnapshotRequest::priority`].
    pub priority: snapshot::BackgroundPriority,
    /// [`SnapshotRequest::prepare`].
    pub prepare: bool,
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

fn take(vm: &Vm, plan: &TriggerPlan, dir: PathBuf, why: &str) -> Option<SnapshotHandle> {
    let req = SnapshotRequest {
        mode: plan.mode,
        workers: plan.workers,
        keep_memory: plan.keep_memory,
        priority: plan.priority,
        prepare: plan.prepare,
        ..SnapshotRequest::new(dir.clone())
    };
    tracing::info!(
        "snapshot {} ({why}): {} with {} workers",
        dir.display(),
        plan.mode,
        plan.workers
    );
    match vm.start_snapshot(req) {
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
    pub fn poll(&mut self, vm: &Vm) -> Option<SnapshotHandle> {
        let mut started = None;
        if let Some(d) = self.at {
            if self.start.elapsed() >= d {
                self.at = None;
                started = take(vm, &self.plan, self.plan.dir.clone(), "--snapshot-at");
            }
        }
        if SIGUSR1_SEEN.swap(false, Ordering::SeqCst) {
            self.signals += 1;
            let mut name = self.plan.dir.clone().into_os_string();
            name.push(format!("-{}", self.signals));
            if let Some(h) = take(vm, &self.plan, PathBuf::from(name), "SIGUSR1") {
                started = Some(h);
            }
        }
        if let Some(h) = &started {
            self.inflight = Some(h.clone());
        }
        if let Some(h) = &self.inflight {
            if h.ready_to_fork() {
                if let Err(e) = vm.fork_prepared(h) {
                    tracing::error!(
                        "snapshot {} failed: {e}; the VM keeps running",
                        h.dir().display()
                    );
                }
            }
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
            h.abandon("the VM stopped before the snapshot's fork");
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
    while vm.exit_reason().is_none() {
        trigger.poll(vm);
        std::thread::sleep(Duration::from_millis(10));
    }
    trigger.finish();
    vm.wait()
}

fn log_progress(h: &SnapshotHandle) {
    let p = h.progress();
    match p.state {
        SnapshotState::Preparing => tracing::info!(
            "snapshot {}: preparing its memory, {}/{} MiB",
            h.dir().display(),
            p.bytes_prepared >> 20,
            p.bytes_to_prepare >> 20
        ),
        SnapshotState::Copying => tracing::info!(
            "snapshot {}: copying {}/{} units, {} bytes",
            h.dir().display(),
            p.chunks_done,
            p.chunks_total,
            p.bytes_copied
        ),
        SnapshotState::Persisting => tracing::info!(
            "snapshot {}: persisting {}/{} bytes",
            h.dir().display(),
            p.bytes_written,
            p.bytes_to_write
        ),
        _ => {}
    }
}
