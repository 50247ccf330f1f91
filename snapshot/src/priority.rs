//! CPU priority of a snapshot's background work that nothing waits on.
//!
//! On a host with few cores the persist writer (and the preparation of
//! snapshot memory) compete with the vCPUs: measured on the 2-core
//! development host, the guest's largest stalls during a snapshot came from
//! such threads and writeback taking the vCPU's core, not from the engine's
//! pause (docs/BENCHMARKS.md). `SCHED_IDLE` makes that work run only on CPU
//! time nobody else wants, and a waking vCPU preempts it at once.
//!
//! Not for the engine's copiers or its fault handler: a vCPU blocked on a
//! write fault waits for them (for a copier that holds the chunk), so an
//! idle copier starved by other load becomes the vCPU's stall — priority
//! inversion, measured at 0.3–1.4 s under load. The copiers instead run at
//! a high nice value and are lifted back while a vCPU waits on one
//! ([`CopierNice`]); the fault handler keeps the VMM's priority.
//!
//! Threads inherit their creator's policy.

use std::io;

/// How the persist (and memory preparation) threads are scheduled.
///
/// Normal by default: `SCHED_IDLE` gets almost nothing while every core is
/// busy, so a guest whose vCPUs saturate the host would leave its snapshot
/// unpersisted indefinitely (seen in CI: snapshots of guests spinning on
/// every core took minutes instead of seconds). Idle is for hosts with a
/// spare core, where it keeps the writer off the vCPUs' cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackgroundPriority {
    /// `SCHED_IDLE`: runs only on CPU time no normal thread wants.
    Idle,
    /// The creating thread's own policy (the default).
    #[default]
    Normal,
}

impl BackgroundPriority {
    pub fn name(self) -> &'static str {
        match self {
            BackgroundPriority::Idle => "idle",
            BackgroundPriority::Normal => "normal",
        }
    }
}

impl std::str::FromStr for BackgroundPriority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "idle" => Ok(BackgroundPriority::Idle),
            "normal" => Ok(BackgroundPriority::Normal),
            other => Err(format!(
                "unknown background priority '{other}' (expected idle or normal)"
            )),
        }
    }
}

/// Applies `priority` to the calling thread (and so to the threads it
/// creates from now on).
pub fn apply_to_current_thread(priority: BackgroundPriority) -> io::Result<()> {
    if priority == BackgroundPriority::Normal {
        return Ok(());
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread; `param` is a valid
    // sched_param that outlives the call (SCHED_IDLE requires priority 0).
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How far below the VMM's own threads the engine's copiers run.
///
/// A copier and a vCPU sharing a core at equal priority split it: measured
/// at 8 GiB on 2 cores, the guest then waited out copiers' time slices
/// (runnable but not running for 2–7 ms) and the fault handler's wake-ups
/// (fault p99 3.0–3.5 ms). At nice +19 the vCPUs and the fault handler win
/// every contended core (fault p99 0.5–1.6 ms) and the copy still ran at
/// 8.5–10.5 GiB/s, because a copier gets any core the guest leaves idle.
pub const COPIER_NICE_DELTA: i32 = 19;

fn thread_nice(tid: libc::pid_t) -> io::Result<i32> {
    // SAFETY: clears this thread's errno before a call whose -1 return is
    // also a valid nice value.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: PRIO_PROCESS with a thread id (0 = the caller); no pointers.
    let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    // SAFETY: reads this thread's errno.
    if now == -1 && unsafe { *libc::__errno_location() } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(now)
}

fn set_thread_nice(tid: libc::pid_t, nice: i32) -> io::Result<()> {
    // SAFETY: PRIO_PROCESS with a thread id (0 = the caller); no pointers.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The copiers' priority: lowered while they copy in the background, lifted
/// back to the VMM's own while a vCPU waits on a chunk one of them holds —
/// priority inheritance by hand, so a low-priority copier never becomes the
/// vCPU's stall (idle copiers did: 0.3–1.4 s fault waits under load).
/// Lifting needs CAP_SYS_NICE (or RLIMIT_NICE); without it the copier
/// still runs whenever the waiting vCPU's core is otherwise idle.
#[derive(Debug)]
pub(crate) struct CopierNice {
    base: i32,
    tids: std::sync::Mutex<Vec<libc::pid_t>>,
    boosts: std::sync::atomic::AtomicU64,
}

impl CopierNice {
    /// Takes the calling thread's nice value as the level to lift back to.
    pub(crate) fn new() -> CopierNice {
        CopierNice {
            base: thread_nice(0).unwrap_or(0),
            tids: std::sync::Mutex::new(Vec::new()),
            boosts: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn tids(&self) -> std::sync::MutexGuard<'_, Vec<libc::pid_t>> {
        match self.tids.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Called by a copier thread before it copies: registers it and lowers
    /// it. Returns the boost generation it has seen.
    pub(crate) fn enter(&self) -> u64 {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        self.tids().push(tid);
        let seen = self.boosts.load(std::sync::atomic::Ordering::Acquire);
        let _ = set_thread_nice(0, (self.base + COPIER_NICE_DELTA).min(19));
        seen
    }

    /// Called by a copier between chunks: lowers it again after a boost.
    pub(crate) fn settle(&self, seen: &mut u64) {
        let now = self.boosts.load(std::sync::atomic::Ordering::Acquire);
        if now != *seen {
            *seen = now;
            let _ = set_thread_nice(0, (self.base + COPIER_NICE_DELTA).min(19));
        }
    }

    /// A vCPU waits on a copier: lift every copier to the base level until
    /// it finishes its chunk.
    pub(crate) fn boost(&self) {
        self.boosts
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        for &tid in self.tids().iter() {
            if let Err(e) = set_thread_nice(tid, self.base) {
                tracing::debug!("cannot lift copier {tid} to nice {}: {e}", self.base);
            }
        }
    }
}

/// The calling thread's scheduling policy (for tests).
pub fn current_policy() -> io::Result<i32> {
    // SAFETY: pid 0 names the calling thread; no pointers are passed.
    let rc = unsafe { libc::sched_getscheduler(0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_lowers_only_the_calling_thread_and_its_children() {
        let (mine, child) = std::thread::spawn(|| {
            apply_to_current_thread(BackgroundPriority::Idle).expect("SCHED_IDLE");
            let child = std::thread::spawn(|| current_policy().expect("policy"))
                .join()
                .expect("child");
            (current_policy().expect("policy"), child)
        })
        .join()
        .expect("thread");
        assert_eq!(mine, libc::SCHED_IDLE);
        assert_eq!(child, libc::SCHED_IDLE, "inherited by threads it creates");
        assert_eq!(current_policy().expect("policy"), libc::SCHED_OTHER);
    }

    #[test]
    fn normal_changes_nothing_and_names_parse() {
        std::thread::spawn(|| {
            apply_to_current_thread(BackgroundPriority::Normal).expect("normal");
            assert_eq!(current_policy().expect("policy"), libc::SCHED_OTHER);
        })
        .join()
        .expect("thread");
        assert_eq!("idle".parse(), Ok(BackgroundPriority::Idle));
        assert_eq!("normal".parse(), Ok(BackgroundPriority::Normal));
        assert_eq!(
            "fast".parse::<BackgroundPriority>(),
            Err("unknown background priority 'fast' (expected idle or normal)".to_string())
        );
    }

    #[test]
    fn copiers_run_lowered_and_are_lifted_back_while_waited_on() {
        let nice = CopierNice::new();
        let base = thread_nice(0).expect("nice");
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|s| {
            let nice = &nice;
            let copier = s.spawn(move || {
                let mut seen = nice.enter();
                let lowered = thread_nice(0).expect("nice");
                // SAFETY: no arguments.
                tid_tx.send(unsafe { libc::gettid() }).expect("send");
                go_rx.recv().expect("boosted");
                let boosted = thread_nice(0).expect("nice");
                nice.settle(&mut seen);
                (lowered, boosted, thread_nice(0).expect("nice"))
            });
            let _tid = tid_rx.recv().expect("tid");
            nice.boost();
            go_tx.send(()).expect("go");
            let (lowered, boosted, again) = copier.join().expect("copier");
            let low = (base + COPIER_NICE_DELTA).min(19);
            assert_eq!(lowered, low);
            // Lifting back needs CAP_SYS_NICE; CI runs as root.
            if nix_is_root() {
                assert_eq!(boosted, base, "lifted while waited on");
            }
            assert_eq!(again, low, "lowered again after the chunk");
        });
        assert_eq!(thread_nice(0).expect("nice"), base, "caller untouched");
    }

    fn nix_is_root() -> bool {
        // SAFETY: no arguments.
        unsafe { libc::geteuid() == 0 }
    }
}
