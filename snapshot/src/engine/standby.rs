//! The supervisor thread, created at `arm` (thread creation costs a
//! fraction of a millisecond, too much for the pause) and handed its plan
//! by `begin`; and what a begun snapshot is until `wait` collects it.

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::cpus::CpuSet;
use crate::error::Error;
use crate::finished::Snapshot;
use crate::shared::Shared;
use crate::supervisor::{self, Plan};
use std::sync::Arc;

pub(super) type SupervisorHandle = JoinHandle<Result<Snapshot, Error>>;

/// What a standby supervisor waits for.
pub(super) type Launch = Box<(Arc<Shared>, Plan)>;

/// A supervisor thread waiting for its plan. Dropped unlaunched (disarm,
/// a failed `begin`), it is told there is none and joined.
#[derive(Debug)]
pub(super) struct Standby {
    plan_tx: Option<mpsc::Sender<Launch>>,
    thread: Option<SupervisorHandle>,
}

impl Standby {
    /// `cpus`: where it and the workers it starts (which inherit its
    /// affinity) run.
    pub(super) fn spawn(cpus: Option<CpuSet>) -> std::io::Result<Standby> {
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
    pub(super) fn launch(mut self, launch: Launch) -> Result<SupervisorHandle, Launch> {
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
pub(super) enum Pending {
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
