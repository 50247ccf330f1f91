//! Fault injection for the three rollback cases (DESIGN.md §2). Compiled in
//! always (so the VMM's end-to-end tests can use it too), inert by default.

/// Where to make a snapshot fail on purpose.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultInjection {
    /// Fail `begin()` after the regions were registered and write-protected,
    /// to exercise the sync-phase undo.
    pub fail_sync: bool,
    /// Fail the workers' n-th (0-based, across workers) chunk copy, as if
    /// the destination could not be allocated. Counted per copy rather than
    /// per chunk index so the test is deterministic even when the fault path
    /// copies some chunk first.
    pub fail_worker_copy_at: Option<usize>,
    /// Fail the fault path on its n-th (0-based) chunk copy, as if the copy
    /// could not be done.
    pub fail_fault_path_at: Option<usize>,
    /// Hold the workers back until the fault path (handler or hooks) has
    /// copied this many chunks, or the snapshot aborts. Makes tests of the
    /// fault path deterministic (no race with a fast worker).
    pub hold_workers_until_fault_copies: Option<u64>,
    /// Fail `Engine::prepare_destination` at this chunk (0-based), as if
    /// the memory could not be allocated (ENOMEM).
    pub fail_prepare_at: Option<u64>,
}
