//! Snapshot triggers for `snapvm run` (until the HTTP API lands):
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
        ..SnapshotRequest::new(dir.clone())
    };
    tracing::info!(
        "snapshot {} ({why}): {} with {} workers",
        dir.display(),
        plan.mode,
        plan.workers
    );
    match vm.snapshot(req) {
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

/// Runs the VM until it stops, taking the planned snapshots; waits for a
/// snapshot still in flight before returning.
pub fn run_until_exit(vm: &mut Vm, plan: &TriggerPlan) -> VmExit {
    let start = Instant::now();
    let mut at = plan.at;
    let mut signals = 0u32;
    let mut inflight: Option<SnapshotHandle> = None;
    let mut last_log = Instant::now();
    while vm.exit_reason().is_none() {
        if let Some(d) = at {
            if start.elapsed() >= d {
                at = None;
                if let Some(h) = take(vm, plan, plan.dir.clone(), "--snapshot-at") {
                    inflight = Some(h);
                }
            }
        }
        if SIGUSR1_SEEN.swap(false, Ordering::SeqCst) {
            signals += 1;
            let mut name = plan.dir.clone().into_os_string();
            name.push(format!("-{signals}"));
            if let Some(h) = take(vm, plan, PathBuf::from(name), "SIGUSR1") {
                inflight = Some(h);
            }
        }
        if let Some(h) = &inflight {
            if h.state().is_finished() {
                inflight = None;
            } else if last_log.elapsed() >= Duration::from_secs(1) {
                last_log = Instant::now();
                log_progress(h);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(h) = inflight {
        tracing::info!(
            "VM stopped; waiting for snapshot {} to finish",
            h.dir().display()
        );
        let _ = h.wait();
    }
    vm.wait()
}

fn log_progress(h: &SnapshotHandle) {
    let p = h.progress();
    match p.state {
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
