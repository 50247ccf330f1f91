//! Panics in the engine are bugs, but they must not take the running VM
//! down or leave it write-protected: every engine thread and every copy is
//! guarded, and a panic becomes `Error::Panicked` plus the usual rollback.
//!
//! That needs the host build to unwind (the workspace profiles do; only the
//! guest kernel aborts). A process that wants panics elsewhere to abort
//! (a VMM: a panicked vCPU thread leaves the VM in an unknown state) can
//! install a panic hook that aborts unless [`recovers_panics_here`] says
//! the engine will catch this one.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;

use crate::error::{panic_message, Error, Phase};

thread_local! {
    /// How many `catching` calls are active on this thread.
    static CATCHING: Cell<u32> = const { Cell::new(0) };
}

/// Name prefix of every thread the engine spawns; a panic anywhere on one
/// of them is caught (at the copy, the handler's event loop, or the join).
pub const THREAD_PREFIX: &str = "snap-";

/// Whether a panic raised now, on this thread, will be caught by the
/// engine and turned into a failed snapshot (for a panic hook that aborts
/// on every other panic).
pub fn recovers_panics_here() -> bool {
    CATCHING.with(|c| c.get() > 0)
        || std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with(THREAD_PREFIX))
}

/// Runs `f`; a panic inside becomes `Error::Panicked` in `phase`.
pub(crate) fn catching<T>(phase: Phase, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    CATCHING.with(|c| c.set(c.get() + 1));
    let r = std::panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    r.unwrap_or_else(|p| {
        Err(Error::Panicked {
            phase,
            what: panic_message(p),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catching_turns_a_panic_into_an_error_and_tracks_depth() {
        assert!(!recovers_panics_here());
        let r: Result<(), Error> = catching(Phase::Worker, || {
            assert!(recovers_panics_here());
            std::panic::panic_any("boom".to_string())
        });
        match r {
            Err(Error::Panicked { phase, what }) => {
                assert_eq!(phase, Phase::Worker);
                assert_eq!(what, "boom");
            }
            other => panic!("{other:?}"),
        }
        assert!(!recovers_panics_here());
        let named = std::thread::Builder::new()
            .name("snap-worker-9".into())
            .spawn(recovers_panics_here)
            .unwrap();
        assert!(named.join().unwrap());
    }
}
