//! Snapshot triggers for `snapvm run --snapshot-dir DIR`, beside the HTTP
//! API: `--snapshot-at SECONDS` asks for one snapshot into `DIR` itself;
//! every SIGUSR1 asks for one into `DIR-1`, `DIR-2`, ... (numbered in
//! arrival order, never overwriting: an existing target fails that
//! snapshot, the VM keeps running). The trigger only sends the VM's owner
//! requests (`crate::owner`), which takes, logs and reports the snapshots;
//! a signal that arrives while one is in flight is refused ("snapshot in
//! progress") and not queued.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snapvm_snapshot::Strategy;

use crate::owner::{notify, Envelope, Request, SnapshotOrder};

/// How often the trigger looks at the clock and its stop flag (a SIGUSR1
/// wakes it at once).
const TICK: Duration = Duration::from_millis(10);

/// What `snapvm run` was asked to snapshot.
#[derive(Debug, Clone)]
pub struct TriggerPlan {
    pub dir: PathBuf,
    /// Seconds after start for the `--snapshot-at` snapshot.
    pub at: Option<Duration>,
    pub mode: Strategy,
    pub workers: usize,
}

/// The running trigger; stopped (and joined) when dropped.
pub struct Trigger {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Trigger {
    /// Installs the SIGUSR1 handler and starts the trigger thread; the
    /// `--snapshot-at` clock starts now.
    pub fn start(plan: TriggerPlan, to: Sender<Envelope>) -> std::io::Result<Trigger> {
        let signal = crate::signals::SnapshotSignal::claim()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("snapshot-trigger".into())
            .spawn(move || run(&plan, &to, &s, &signal))?;
        Ok(Trigger {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn order(plan: &TriggerPlan, dir: PathBuf, why: &str) -> Request {
    tracing::info!(
        "snapshot {} ({why}): {} with {} workers",
        dir.display(),
        plan.mode,
        plan.workers
    );
    Request::CreateSnapshot(SnapshotOrder {
        dir,
        mode: plan.mode,
        workers: Some(plan.workers),
        overwrite: false,
        memory_budget: None,
        incremental: false,
        wait: false,
    })
}

fn run(
    plan: &TriggerPlan,
    to: &Sender<Envelope>,
    stop: &AtomicBool,
    signal: &crate::signals::SnapshotSignal,
) {
    let start = Instant::now();
    let mut at = plan.at;
    let mut signals = 0u32;
    while !stop.load(Ordering::Acquire) {
        if at.is_some_and(|d| start.elapsed() >= d) {
            at = None;
            if !notify(to, order(plan, plan.dir.clone(), "--snapshot-at")) {
                return;
            }
        }
        let wait = at.map_or(TICK, |d| d.saturating_sub(start.elapsed()).min(TICK));
        if signal.wait(wait) {
            signals += 1;
            let mut name = plan.dir.clone().into_os_string();
            name.push(format!("-{signals}"));
            if !notify(to, order(plan, PathBuf::from(name), "SIGUSR1")) {
                return;
            }
        }
    }
}
