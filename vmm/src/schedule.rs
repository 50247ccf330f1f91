//! Scheduled snapshots (`snapvm run --snapshot-dir DIR --snapshot-every
//! 30s --snapshot-keep 3`, or `PUT /snapshot/schedule`): a request source,
//! like the API and the trigger, that asks the VM's owner for a snapshot
//! every interval. The owner holds the [`Scheduler`] and reads its requests
//! from the scheduler's own channel, so a schedule started through the API
//! lives and stops with the owner, never with an API connection.
//!
//! Layout of DIR: `snap-000001`, `snap-000002`, ... (numbered on from what
//! is there), and `latest`, a symlink to the newest complete one — what
//! `snapvm run --restore DIR/latest` restarts from. Each snapshot is
//! incremental against the previous one (only the chunks the guest wrote
//! since), except every `--snapshot-full-every`-th, the first of a run,
//! and the one after a failure, which are full: a chain never grows longer
//! than that, and restoring reads at most that many layers.
//!
//! Invariants (what a SIGKILL at any moment leaves):
//! - a snapshot directory appears only complete and durable (the writer
//!   renames it into place, then fsyncs DIR);
//! - `latest` moves only after that, by renaming a new symlink over it, and
//!   DIR is fsync'd: it always names a complete snapshot;
//! - a directory is removed only once no kept snapshot's chain needs it
//!   (the newest `--snapshot-keep` complete snapshots are kept with every
//!   parent they have), after `latest` moved.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use snapvm_snapshot::persist::{SnapshotChain, TMP_INFIX};
use snapvm_snapshot::sync::lock;
use snapvm_snapshot::Strategy;
use tokio::sync::oneshot;

use crate::owner::{Envelope, OwnerError, Request, Response, SnapshotOrder};

/// Name of the symlink to the newest complete snapshot.
pub const LATEST: &str = "latest";
const PREFIX: &str = "snap-";
/// How often the schedule looks at its clock and stop flag (a SIGUSR1
/// wakes it at once).
const TICK: Duration = Duration::from_millis(20);

/// What `--snapshot-every` asked for.
#[derive(Debug, Clone)]
pub struct SchedulePlan {
    pub dir: PathBuf,
    pub every: Duration,
    /// Complete snapshots kept restorable (with their parents).
    pub keep: usize,
    /// Every n-th snapshot is full (1: all full).
    pub full_every: usize,
    pub workers: usize,
}

/// The schedule as `GET /snapshots` and `/metrics` show it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct ScheduleStatus {
    pub snapshot_dir: String,
    pub every_ms: u64,
    pub keep: u64,
    pub full_every: u64,
    pub done: u64,
    pub failed: u64,
    /// Layers behind `latest` (1: a full snapshot).
    pub chain_length: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<LastSnapshot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct LastSnapshot {
    pub snapshot_path: String,
    /// `Full` or `Diff`.
    pub snapshot_type: String,
    pub bytes_written: u64,
    /// When it was done, seconds since the Unix epoch.
    pub done_unix_s: u64,
}

/// A running schedule. Its thread asks for snapshots through
/// [`Scheduler::requests`], which the owner reads; stop it with
/// [`Scheduler::shutdown`] (dropping it only asks it to stop).
pub struct Scheduler {
    stop: Arc<AtomicBool>,
    /// A snapshot was asked for and is not answered yet.
    busy: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    requests: Receiver<Envelope>,
    status: Arc<Mutex<ScheduleStatus>>,
}

impl Scheduler {
    /// Starts the schedule (the first snapshot one interval from now;
    /// SIGUSR1 takes the next one at once).
    pub fn start(plan: SchedulePlan) -> std::io::Result<Scheduler> {
        std::fs::create_dir_all(&plan.dir)?;
        let signal = crate::signals::SnapshotSignal::claim()?;
        let status = Arc::new(Mutex::new(ScheduleStatus {
            snapshot_dir: plan.dir.display().to_string(),
            every_ms: plan.every.as_millis() as u64,
            keep: plan.keep as u64,
            full_every: plan.full_every as u64,
            ..ScheduleStatus::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicBool::new(false));
        let (to, requests) = mpsc::channel();
        let thread = {
            let (stop, busy, status) = (stop.clone(), busy.clone(), status.clone());
            std::thread::Builder::new()
                .name("snapshot-schedule".into())
                .spawn(move || {
                    let source = Source {
                        to: &to,
                        busy: &busy,
                    };
                    run(&plan, &source, &stop, &status, &signal)
                })?
        };
        Ok(Scheduler {
            stop,
            busy,
            thread: Some(thread),
            requests,
            status,
        })
    }

    /// The snapshot orders the schedule has sent and the owner has not
    /// read yet.
    pub fn requests(&self) -> mpsc::TryIter<'_, Envelope> {
        self.requests.try_iter()
    }

    /// The schedule and how it goes.
    pub fn status(&self) -> ScheduleStatus {
        lock(&self.status).clone()
    }

    /// Whether one of its snapshots is under way (asked for and not yet
    /// answered).
    fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// Stops the schedule and joins its thread, waiting at most `patience`
    /// (`None`: as long as it takes). Orders it sends meanwhile are dropped
    /// unanswered, which it takes as "stop". Gives the scheduler back if
    /// one of its snapshots is with the owner (only the owner's answer can
    /// end it) or `patience` ran out.
    pub fn shutdown(mut self, patience: Option<Duration>) -> Result<(), Scheduler> {
        self.stop.store(true, Ordering::Release);
        let start = Instant::now();
        loop {
            let pending = self.requests.try_iter().count();
            let finished = self.thread.as_ref().is_none_or(|t| t.is_finished());
            if finished {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
                return Ok(());
            }
            let out_of_time = patience.is_some_and(|p| start.elapsed() >= p);
            if (pending == 0 && self.busy()) || out_of_time {
                return Err(self);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // Never joins: its thread may be waiting for an answer from the
        // owner that drops it. It sees the flag (or a closed channel) and
        // ends by itself.
        self.stop.store(true, Ordering::Release);
    }
}

/// The schedule thread's end of the channel to the owner.
struct Source<'a> {
    to: &'a Sender<Envelope>,
    busy: &'a AtomicBool,
}

/// The numbered snapshot directories in `dir` that are complete, oldest
/// first.
pub fn complete_snapshots(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix(PREFIX)?.parse::<u64>().ok()?;
            let path = e.path();
            path.join(snapvm_snapshot::persist::STATE_FILE)
                .exists()
                .then_some((n, path))
        })
        .collect();
    out.sort();
    out
}

fn next_number(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix(PREFIX)?;
            rest.split(TMP_INFIX).next()?.parse::<u64>().ok()
        })
        .max()
        .map_or(1, |n| n + 1)
}

fn run(
    plan: &SchedulePlan,
    to: &Source<'_>,
    stop: &AtomicBool,
    status: &Mutex<ScheduleStatus>,
    signal: &crate::signals::SnapshotSignal,
) {
    let mut n = next_number(&plan.dir);
    // Layers since the last full snapshot of this run (0: next is full).
    let mut chain = 0usize;
    let mut next = Instant::now() + plan.every;
    while !stop.load(Ordering::Acquire) {
        let wait = next.saturating_duration_since(Instant::now()).min(TICK);
        let now_asked = signal.wait(wait);
        if !now_asked && Instant::now() < next {
            continue;
        }
        next = Instant::now() + plan.every;
        let target = plan.dir.join(format!("{PREFIX}{n:06}"));
        n += 1;
        let diff = chain > 0 && chain < plan.full_every.max(1);
        let mut outcome = take(plan, to, &target, diff);
        if diff && matches!(&outcome, Err(Failure::Refused(_))) {
            // No base any more (tracking stopped): a full one instead.
            outcome = take(plan, to, &target, false);
            chain = 0;
        }
        match outcome {
            Ok(bytes) => {
                chain = if diff && chain > 0 { chain + 1 } else { 1 };
                if let Err(e) = point_latest(&plan.dir, &target) {
                    tracing::warn!("snapshot schedule: cannot update {LATEST}: {e}");
                }
                let kept = rotate(&plan.dir, plan.keep);
                let mut st = lock(status);
                st.done += 1;
                st.chain_length = chain as u64;
                st.last_error = None;
                st.last_success = Some(LastSnapshot {
                    snapshot_path: target.display().to_string(),
                    snapshot_type: if chain > 1 { "Diff" } else { "Full" }.into(),
                    bytes_written: bytes,
                    done_unix_s: SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                });
                tracing::info!(
                    "snapshot schedule: {} done ({}, {} MiB written; {kept} kept)",
                    target.display(),
                    if chain > 1 { "diff" } else { "full" },
                    bytes >> 20
                );
            }
            Err(Failure::Gone) => return,
            Err(Failure::Refused(why) | Failure::Failed(why)) => {
                chain = 0;
                tracing::warn!("snapshot schedule: {} failed: {why}", target.display());
                let mut st = lock(status);
                st.failed += 1;
                st.last_error = Some(why);
            }
        }
    }
}

enum Failure {
    /// The owner is gone (snapvm is stopping).
    Gone,
    /// Not taken (e.g. no base for a diff).
    Refused(String),
    Failed(String),
}

/// One snapshot, waited for; returns the bytes it wrote.
fn take(plan: &SchedulePlan, to: &Source<'_>, target: &Path, diff: bool) -> Result<u64, Failure> {
    to.busy.store(true, Ordering::Release);
    let outcome = ask(plan, to.to, target, diff);
    to.busy.store(false, Ordering::Release);
    outcome
}

fn ask(
    plan: &SchedulePlan,
    to: &Sender<Envelope>,
    target: &Path,
    diff: bool,
) -> Result<u64, Failure> {
    let (tx, rx) = oneshot::channel();
    let request = Request::CreateSnapshot(SnapshotOrder {
        dir: target.to_path_buf(),
        mode: Strategy::AsyncFork,
        workers: Some(plan.workers),
        overwrite: false,
        memory_budget: None,
        incremental: diff,
        wait: true,
    });
    if to
        .send(Envelope {
            request,
            reply: Some(tx),
        })
        .is_err()
    {
        return Err(Failure::Gone);
    }
    match rx.blocking_recv() {
        Err(_) => Err(Failure::Gone),
        Ok(Err(OwnerError::Conflict(why))) => Err(Failure::Refused(why)),
        Ok(Err(e)) => Err(Failure::Failed(e.to_string())),
        Ok(Ok(Response::Snapshot(s))) if s.state == "done" => Ok(s.progress.bytes_written),
        Ok(Ok(Response::Snapshot(s))) => Err(Failure::Failed(
            s.reason.unwrap_or_else(|| format!("ended {}", s.state)),
        )),
        Ok(Ok(other)) => Err(Failure::Failed(format!("unexpected answer {other:?}"))),
    }
}

/// Points `dir/latest` at `target` atomically (a new symlink renamed over
/// the old one), then makes it durable.
fn point_latest(dir: &Path, target: &Path) -> std::io::Result<()> {
    let name = target
        .file_name()
        .ok_or_else(|| std::io::Error::other("snapshot path without a name"))?;
    let tmp = dir.join(format!(".{LATEST}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(name, &tmp)?;
    std::fs::rename(&tmp, dir.join(LATEST))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Removes what no kept snapshot needs; returns how many are kept.
fn rotate(dir: &Path, keep: usize) -> usize {
    let complete = complete_snapshots(dir);
    let kept: Vec<&PathBuf> = complete
        .iter()
        .rev()
        .take(keep.max(1))
        .map(|(_, p)| p)
        .collect();
    let mut needed: Vec<PathBuf> = Vec::new();
    for k in &kept {
        match SnapshotChain::open(k) {
            Ok(chain) => needed.extend(chain.layers().iter().map(|l| l.path().to_path_buf())),
            // Keep it as it is; whatever it needs stays too (nothing older
            // than it goes this round).
            Err(e) => {
                tracing::warn!("snapshot schedule: {}: {e}", k.display());
                return kept.len();
            }
        }
    }
    let needed: Vec<PathBuf> = needed
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    for (_, p) in &complete {
        let c = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        if !needed.contains(&c) {
            if let Err(e) = std::fs::remove_dir_all(p) {
                tracing::warn!("snapshot schedule: cannot remove {}: {e}", p.display());
            }
        }
    }
    // Leftovers of snapshots interrupted by a crash.
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(PREFIX) && name.contains(TMP_INFIX) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    kept.len()
}
