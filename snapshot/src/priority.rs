//! CPU priority of a snapshot's background work that nothing waits on.
//!
//! On a host with few cores background writers compete with the vCPUs:
//! the guest's largest stalls during a snapshot came from such threads and
//! writeback taking the vCPU's core, not from the engine's pause
//! (docs/journal/2026-12-01-copier-priority.md). `SCHED_IDLE` makes that work run only on CPU
//! time nobody else wants, and a waking vCPU preempts it at once.
//!
//! Not for the engine's copiers or its fault handler: a vCPU blocked on a
//! write fault waits for them (for a copier that holds the chunk), so an
//! idle copier starved by other load becomes the vCPU's stall — priority
//! inversion, measured at 0.3–1.4 s under load. The fault handler instead
//! runs *above* the VMM's other threads ([`FAULT_HANDLER_NICE_DELTA`]).
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

/// How far above the VMM's other threads the fault handler runs. Every
/// blocked writer waits on it, and at equal priority a woken handler
/// waited out a copier's or vCPU's time slice before it ran, which the
/// fault latency's tail showed (docs/journal/2026-12-01-copier-priority.md).
/// It only runs when a fault arrives, so it starves nobody.
pub const FAULT_HANDLER_NICE_DELTA: i32 = -10;

/// Moves the calling thread's nice value by `delta` (clamped to -20..=19)
/// and returns the new value. Lowering it (raising priority) needs
/// CAP_SYS_NICE or RLIMIT_NICE; Linux keeps nice per thread, so only the
/// caller (and threads it creates afterwards) change.
pub fn adjust_current_thread(delta: i32) -> io::Result<i32> {
    // SAFETY: clears this thread's errno before a call whose -1 return is
    // also a valid nice value.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: PRIO_PROCESS with who = 0 names the calling thread; no pointers.
    let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    // SAFETY: reads this thread's errno.
    if now == -1 && unsafe { *libc::__errno_location() } != 0 {
        return Err(io::Error::last_os_error());
    }
    let target = (now + delta).clamp(-20, 19);
    // SAFETY: as above.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, target) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(target)
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
    fn adjusting_nice_touches_only_the_calling_thread() {
        // SAFETY: no arguments.
        let root = unsafe { libc::geteuid() } == 0;
        let before = adjust_current_thread(0).expect("read nice");
        let got = std::thread::spawn(move || adjust_current_thread(FAULT_HANDLER_NICE_DELTA))
            .join()
            .expect("thread");
        if root {
            assert_eq!(
                got.expect("root may raise priority"),
                (before - 10).max(-20)
            );
        } else {
            assert!(got.is_err(), "raising priority needs CAP_SYS_NICE");
        }
        assert_eq!(adjust_current_thread(0).expect("read nice"), before);
    }
}
