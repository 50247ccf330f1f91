//! Pause/resume of the vCPU threads: the primitive snapshots are built on.
//!
//! Protocol (race-free, as in Firecracker):
//! * Each vCPU thread, before every KVM_RUN, first clears
//!   `kvm_run.immediate_exit`, then checks the pause flag.
//! * `pause()` sets the flag *first*, then sends [`kick_signal`] to every
//!   vCPU that may be inside KVM_RUN. The handler sets `immediate_exit = 1`
//!   through a thread-local pointer to that thread's `kvm_run`.
//! * If the signal lands before the vCPU's clear, the flag check after the
//!   clear sees the flag (it was set before the signal). If it lands after
//!   the check, `immediate_exit` makes KVM_RUN return at once (or the signal
//!   interrupts a running KVM_RUN). Either way the vCPU leaves KVM_RUN.
//! * A held vCPU is parked on a condvar outside KVM_RUN without its fd lock,
//!   so the owner can read its state. vCPUs in an idle wait (PORT_WAIT) or
//!   not started yet (APs before START_APS) do not run guest code and count
//!   as held without being woken.
//! * If a vCPU has exited, `pause()` fails instead of waiting for it.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;

/// How long `pause()` waits for the vCPUs before giving up: a vCPU stuck in
/// a device handler for longer is a bug worth reporting, not a hang.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a vCPU thread is doing, as far as pausing is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuStatus {
    /// AP waiting for `START_APS` (held).
    NotStarted,
    /// In or around KVM_RUN.
    Running,
    /// Parked because of a pause (held).
    Held,
    /// In an idle wait (held).
    Waiting,
    /// The thread has finished.
    Exited,
}

impl VcpuStatus {
    fn is_held(self) -> bool {
        matches!(self, Self::NotStarted | Self::Held | Self::Waiting)
    }
}

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off with this status.
    Poweroff(u8),
    /// The guest asked for a reboot (i8042 reset, reboot=k): status 0.
    Reboot,
    /// The guest took an unhandled exception or triple-faulted.
    GuestCrash(String),
    /// The VMM could not run the guest (KVM error, internal error).
    Error(String),
    /// The owner shut the VM down.
    Shutdown,
}

impl VmExit {
    /// snapvm's process exit status for this exit.
    pub fn exit_status(&self) -> i32 {
        match self {
            VmExit::Poweroff(s) => i32::from(*s),
            VmExit::Reboot | VmExit::Shutdown => 0,
            VmExit::GuestCrash(_) => i32::from(snapvm_guest::abi::EXIT_STATUS_EXCEPTION),
            VmExit::Error(_) => 1,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseError {
    #[error("vCPU {0} has exited; the VM is stopping")]
    VcpuExited(usize),
    #[error("the VM is stopping")]
    Stopping,
    #[error("vCPU {0} did not stop within {1:?}")]
    Timeout(usize, Duration),
    #[error("the VM has not been started")]
    NotStarted,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM is already paused")]
    AlreadyPaused,
}

#[derive(Debug)]
struct State {
    paused: bool,
    stop: bool,
    exit: Option<VmExit>,
    statuses: Vec<VcpuStatus>,
    threads: Vec<Option<libc::pthread_t>>,
    /// Bumped by [`VcpuControl::wake_waiters`]; idle waits end when it moves.
    wake_generation: u64,
    /// A wake not yet consumed by an idle wait (see `idle_wait`).
    wake_pending: bool,
    /// Entry address for APs once the guest wrote START_APS.
    ap_entry: Option<u64>,
    /// When the last `resume()` was called.
    resumed_at: Option<Instant>,
    /// vCPUs held at the last `resume()` that have not left the hold yet.
    rerun_pending: Vec<bool>,
    /// When the last of them left the hold.
    last_rerun: Option<Instant>,
}

/// Shared between the VM owner and every vCPU thread.
#[derive(Debug)]
pub struct VcpuControl {
    /// Fast-path mirror of `paused || stop`, read before every KVM_RUN.
    attention: AtomicBool,
    state: Mutex<State>,
    /// Pause, resume, stop, exit and START_APS: what `pause()`, held vCPUs,
    /// APs and `wait_exited` wait for.
    changed: Condvar,
    /// Ends idle waits (device work for the guest, or stop). Apart from
    /// `changed` because it fires on every request the guest sleeps
    /// through: on one condvar each wake also woke the thread waiting in
    /// `wait_exited`, thousands of needless context switches a second
    /// under load (docs/journal/2026-12-02-kv-idle-condvar.md).
    idle: Condvar,
}

/// What a vCPU thread should do after [`VcpuControl::hold`] and friends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Run,
    Stop,
}

impl VcpuControl {
    /// `count` vCPUs; vCPU 0 starts Running, `aps_wait` makes the others
    /// NotStarted (paravirtual AP start-up) instead of Running.
    pub fn new(count: usize, aps_wait: bool) -> Self {
        let statuses = (0..count)
            .map(|i| {
                if i > 0 && aps_wait {
                    VcpuStatus::NotStarted
                } else {
                    VcpuStatus::Running
                }
            })
            .collect();
        VcpuControl {
            attention: AtomicBool::new(false),
            state: Mutex::new(State {
                paused: false,
                stop: false,
                exit: None,
                statuses,
                threads: vec![None; count],
                wake_generation: 0,
                wake_pending: false,
                ap_entry: None,
                resumed_at: None,
                rerun_pending: vec![false; count],
                last_rerun: None,
            }),
            changed: Condvar::new(),
            idle: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a vCPU thread panicked while holding it; the
        // state is plain data and still consistent enough to stop the VM.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(g).unwrap_or_else(|e| e.into_inner())
    }

    fn set_attention(&self, s: &State) {
        self.attention.store(s.paused || s.stop, Ordering::SeqCst);
    }

    /// Called by each vCPU thread first: records its pthread for kicks.
    pub fn register_thread(&self, index: usize) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().threads[index] = Some(me);
    }

    /// Fast check before KVM_RUN (after clearing immediate_exit).
    #[inline]
    pub fn needs_attention(&self) -> bool {
        self.attention.load(Ordering::SeqCst)
    }

    /// Slow path: parks the vCPU while paused. Returns Stop if the VM stops.
    pub fn hold(&self, index: usize) -> Gate {
        let g = self.lock();
        let (_g, gate) = self.hold_locked(g, index);
        gate
    }

    fn hold_locked<'a>(
        &self,
        mut g: MutexGuard<'a, State>,
        index: usize,
    ) -> (MutexGuard<'a, State>, Gate) {
        if g.paused && !g.stop {
            g.statuses[index] = VcpuStatus::Held;
            self.changed.notify_all();
            while g.paused && !g.stop {
                g = self.wait(g);
            }
        }
        if g.stop {
            return (g, Gate::Stop);
        }
        if g.rerun_pending[index] {
            g.rerun_pending[index] = false;
            g.last_rerun = Some(Instant::now());
        }
        g.statuses[index] = VcpuStatus::Running;
        (g, Gate::Run)
    }

    /// Idle wait for up to `timeout`, or until a device wakes the guest, or
    /// the VM stops. Counts as held while waiting; if a pause is in effect
    /// when the wait ends, parks until resumed.
    pub fn idle_wait(&self, index: usize, timeout: Duration) -> Gate {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        let generation = g.wake_generation;
        g.statuses[index] = VcpuStatus::Waiting;
        // Waiting counts as held: only a pause in progress waits for it.
        if g.paused {
            self.changed.notify_all();
        }
        // A wake that came while the guest was still deciding to wait (it
        // had polled its queues just before the device added work) is kept
        // in `wake_pending`, so this wait ends at once instead of sleeping
        // through the timeout with work queued.
        while !g.stop && !g.wake_pending && g.wake_generation == generation {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self
                .idle
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        g.wake_pending = false;
        self.hold_locked(g, index).1
    }

    /// Ends every idle wait now (a device has something for the guest).
    pub fn wake_waiters(&self) {
        let mut g = self.lock();
        g.wake_generation = g.wake_generation.wrapping_add(1);
        g.wake_pending = true;
        self.idle.notify_all();
    }

    /// AP thread: waits for START_APS. Returns the entry address, or None if
    /// the VM stops first.
    pub fn wait_for_start(&self, index: usize) -> Option<u64> {
        let mut g = self.lock();
        loop {
            if g.stop {
                return None;
            }
            if let (Some(entry), false) = (g.ap_entry, g.paused) {
                g.statuses[index] = VcpuStatus::Running;
                return Some(entry);
            }
            g = self.wait(g);
        }
    }

    /// The guest wrote START_APS. Only the first write counts.
    pub fn start_aps(&self, entry: u64) -> bool {
        let mut g = self.lock();
        if g.ap_entry.is_some() {
            return false;
        }
        g.ap_entry = Some(entry);
        self.changed.notify_all();
        true
    }

    /// Stops the VM: records `exit` (the first one wins) and kicks every vCPU.
    pub fn request_stop(&self, exit: VmExit) {
        let mut g = self.lock();
        if g.exit.is_none() {
            g.exit = Some(exit);
        }
        g.stop = true;
        self.set_attention(&g);
        self.kick_running(&g);
        self.changed.notify_all();
        self.idle.notify_all();
    }

    /// The vCPU thread is done.
    pub fn mark_exited(&self, index: usize) {
        let mut g = self.lock();
        g.statuses[index] = VcpuStatus::Exited;
        g.threads[index] = None;
        self.changed.notify_all();
    }

    /// Blocks until every vCPU thread has exited; returns why the VM stopped.
    pub fn wait_exited(&self) -> VmExit {
        let mut g = self.lock();
        while !g.statuses.iter().all(|s| *s == VcpuStatus::Exited) {
            g = self.wait(g);
        }
        g.exit.clone().unwrap_or(VmExit::Shutdown)
    }

    /// Why the VM stopped, if it did.
    pub fn exit(&self) -> Option<VmExit> {
        self.lock().exit.clone()
    }

    pub fn is_stopping(&self) -> bool {
        self.lock().stop
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Snapshot of every vCPU's status.
    pub fn statuses(&self) -> Vec<VcpuStatus> {
        self.lock().statuses.clone()
    }

    /// Kicks every vCPU out of KVM_RUN and returns once all are held.
    pub fn pause(&self) -> Result<(), PauseError> {
        let mut g = self.lock();
        if g.stop {
            return Err(PauseError::Stopping);
        }
        if g.paused {
            return Err(PauseError::AlreadyPaused);
        }
        if let Some(i) = g.statuses.iter().position(|s| *s == VcpuStatus::Exited) {
            return Err(PauseError::VcpuExited(i));
        }
        g.paused = true;
        // Flag before signal: see the module comment.
        self.set_attention(&g);
        self.kick_running(&g);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            if g.stop {
                g.paused = false;
                self.set_attention(&g);
                self.changed.notify_all();
                return Err(
                    match g.statuses.iter().position(|s| *s == VcpuStatus::Exited) {
                        Some(i) => PauseError::VcpuExited(i),
                        None => PauseError::Stopping,
                    },
                );
            }
            match g.statuses.iter().position(|s| !s.is_held()) {
                None => return Ok(()),
                Some(i) => {
                    let now = Instant::now();
                    if now >= deadline {
                        g.paused = false;
                        self.set_attention(&g);
                        self.changed.notify_all();
                        return Err(PauseError::Timeout(i, PAUSE_TIMEOUT));
                    }
                    g = self
                        .changed
                        .wait_timeout(g, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Releases the vCPUs held by `pause()`.
    pub fn resume(&self) -> Result<(), PauseError> {
        let mut g = self.lock();
        if !g.paused {
            return Err(PauseError::NotPaused);
        }
        g.paused = false;
        let now = Instant::now();
        g.resumed_at = Some(now);
        g.last_rerun = Some(now);
        let held: Vec<bool> = g.statuses.iter().map(|s| *s == VcpuStatus::Held).collect();
        g.rerun_pending = held;
        self.set_attention(&g);
        self.changed.notify_all();
        Ok(())
    }

    /// Time from the last `resume()` until every vCPU it released was back
    /// on its way into KVM_RUN; None while some are still waking up.
    pub fn last_resume_latency(&self) -> Option<Duration> {
        let g = self.lock();
        if g.rerun_pending.iter().any(|p| *p) {
            return None;
        }
        Some(g.last_rerun?.saturating_duration_since(g.resumed_at?))
    }

    /// Entry address from START_APS, once the guest wrote it.
    pub fn ap_entry(&self) -> Option<u64> {
        self.lock().ap_entry
    }

    /// True while vCPU `index` waits for START_APS (it has run no guest
    /// code yet).
    pub fn is_not_started(&self, index: usize) -> bool {
        self.lock().statuses.get(index) == Some(&VcpuStatus::NotStarted)
    }

    /// For a restored VM, before its threads start: vCPUs that had started
    /// run on from their restored state, the others wait for START_APS as
    /// usual; `ap_entry` is the START_APS the guest had already written.
    pub fn set_restored(&self, started: &[bool], ap_entry: Option<u64>) {
        let mut g = self.lock();
        for (status, &s) in g.statuses.iter_mut().zip(started) {
            *status = if s {
                VcpuStatus::Running
            } else {
                VcpuStatus::NotStarted
            };
        }
        g.ap_entry = ap_entry;
        self.changed.notify_all();
    }

    /// Signals every vCPU that may be inside KVM_RUN. Called with the state
    /// lock held, so no listed thread can exit (and have its pthread_t
    /// reused) meanwhile: threads deregister under the same lock.
    fn kick_running(&self, g: &State) {
        for (status, thread) in g.statuses.iter().zip(g.threads.iter()) {
            if let (VcpuStatus::Running, Some(t)) = (status, thread) {
                // SAFETY: `t` is a live thread (it deregisters under the lock
                // we hold before it exits) and the signal has a handler
                // installed by `install_kick_handler`.
                let rc = unsafe { libc::pthread_kill(*t, kick_signal()) };
                if rc != 0 {
                    tracing::warn!("cannot kick a vCPU thread: errno {rc}");
                }
            }
        }
    }
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler. Const-initialised
    /// so touching it in a signal handler never allocates.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPUs out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = KVM_RUN_PTR.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's mapped kvm_run, set by
            // `set_thread_kvm_run` and cleared before the mapping can go.
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
        }
    });
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick);
    });
    result
}

/// Publishes this thread's `kvm_run` to the kick handler (null to clear).
pub fn set_thread_kvm_run(run: *mut kvm_run) {
    KVM_RUN_PTR.with(|p| p.set(run));
}

/// Clears `immediate_exit` on this thread's `kvm_run`. Must run before the
/// pause-flag check that precedes KVM_RUN.
pub fn clear_immediate_exit() {
    KVM_RUN_PTR.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: as in `handle_kick`.
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 0) };
        }
    });
}

#[cfg(test)]
mod tests;
