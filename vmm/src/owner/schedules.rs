//! The owner's snapshot schedule (`--snapshot-every`, `PUT|GET|DELETE
//! /snapshot/schedule`): at most one runs; its snapshot orders are read
//! from its own channel in [`Owner::poll`] and handled like the API's.
//!
//! A schedule is replaced or stopped only between its snapshots: one of
//! its snapshots under way is answered first (the owner never waits for
//! a snapshot), so a replace then is refused with a 409 saying so, and a
//! stop lets it end and reaps it later. Two schedules never write into a
//! directory at once (rotation removes what it does not know).

use std::time::Duration;

use super::{Owner, OwnerError, Slot};
use crate::schedule::{SchedulePlan, ScheduleStatus, Scheduler};

/// How long a replace or stop waits for an idle schedule's thread to end
/// (it sleeps in 20 ms ticks).
const IDLE_STOP: Duration = Duration::from_millis(500);

/// A schedule to start, as the API or the command line gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleOrder {
    pub dir: std::path::PathBuf,
    pub every: Duration,
    pub keep: usize,
    pub full_every: usize,
}

impl Owner {
    /// Starts `order` (replacing the schedule running, if any, between its
    /// snapshots); returns its status.
    pub fn start_schedule(&mut self, order: ScheduleOrder) -> Result<ScheduleStatus, OwnerError> {
        if !matches!(self.slot, Slot::Vm { started: true, .. }) {
            return Err(OwnerError::Conflict(
                "no running VM to snapshot: load and resume one first".into(),
            ));
        }
        self.reap_schedules();
        if let Some(old) = self.stopping.first() {
            return Err(OwnerError::Conflict(format!(
                "the previous schedule (in {}) is still finishing a snapshot; try again once it is done",
                old.status().snapshot_dir
            )));
        }
        if let Some(current) = self.schedule.take() {
            // One of its snapshots is with us: it goes on as it was.
            if let Err(current) = current.shutdown(Some(IDLE_STOP)) {
                let dir = current.status().snapshot_dir;
                self.schedule = Some(current);
                return Err(OwnerError::Conflict(format!(
                    "the schedule is taking a snapshot in {dir}; try again once it is done"
                )));
            }
            tracing::info!("snapshot schedule replaced");
        }
        let dir = order.dir.clone();
        let plan = SchedulePlan {
            dir: order.dir,
            every: order.every,
            keep: order.keep,
            full_every: order.full_every,
            workers: self.defaults.workers,
        };
        let scheduler = Scheduler::start(plan).map_err(|e| {
            OwnerError::Failed(format!(
                "cannot start the snapshot schedule in {}: {e}",
                dir.display()
            ))
        })?;
        let status = scheduler.status();
        tracing::info!(
            "snapshot schedule: every {:?} into {} (keep {}, a full one every {})",
            order.every,
            dir.display(),
            order.keep,
            order.full_every
        );
        self.schedule = Some(scheduler);
        Ok(status)
    }

    /// Stops the schedule: no snapshot starts after this; one under way
    /// ends as it would have.
    pub fn stop_schedule(&mut self) -> Result<(), OwnerError> {
        let Some(current) = self.schedule.take() else {
            return Err(OwnerError::NotFound(
                "no snapshot schedule is running".into(),
            ));
        };
        if let Err(s) = current.shutdown(Some(IDLE_STOP)) {
            self.stopping.push(s);
        }
        tracing::info!("snapshot schedule stopped");
        Ok(())
    }

    pub fn schedule_status(&self) -> Option<ScheduleStatus> {
        self.schedule.as_ref().map(Scheduler::status)
    }

    /// Handles the orders the schedule sent; ends stopped schedules whose
    /// last snapshot was answered.
    pub(super) fn poll_schedule(&mut self) {
        let orders: Vec<_> = self
            .schedule
            .as_ref()
            .map(|s| s.requests().collect())
            .unwrap_or_default();
        // A stopping VM takes no more: an order dropped unanswered ends
        // the schedule's thread.
        let stopping = self.shutdown || self.exit_reason().is_some();
        for order in orders {
            if !stopping {
                self.handle(order);
            }
        }
        self.reap_schedules();
    }

    fn reap_schedules(&mut self) {
        let stopping = std::mem::take(&mut self.stopping);
        for s in stopping {
            if let Err(s) = s.shutdown(Some(Duration::ZERO)) {
                self.stopping.push(s);
            }
        }
    }

    /// At the end (every snapshot answered): stops every schedule, waiting
    /// for their threads.
    pub(super) fn end_schedules(&mut self) {
        let all = self
            .schedule
            .take()
            .into_iter()
            .chain(self.stopping.drain(..));
        for s in all.collect::<Vec<_>>() {
            if s.shutdown(None).is_err() {
                tracing::warn!("a snapshot schedule did not stop");
            }
        }
    }
}
