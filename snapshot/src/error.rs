//! Error types. Each carries the operation and the range it was about, so a
//! failed snapshot says what failed where.

use std::io;

/// Failures of a userfaultfd operation.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error(
        "cannot create a userfaultfd (syscall: {syscall}; /dev/userfaultfd: {dev}); \
         snapvm needs root or vm.unprivileged_userfaultfd=1"
    )]
    Create { syscall: io::Error, dev: io::Error },
    #[error("UFFDIO_API handshake with features {features:#x} failed: {source}")]
    Api { features: u64, source: io::Error },
    #[error("userfaultfd {op} of [{start:#x}, +{len:#x}) failed: {source}")]
    Range {
        op: &'static str,
        start: u64,
        len: u64,
        source: io::Error,
    },
    #[error("reading userfaultfd events failed: {0}")]
    Read(io::Error),
}

impl UffdError {
    /// The errno of the failed call, if there was one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            UffdError::Create { syscall, .. } => syscall.raw_os_error(),
            UffdError::Api { source, .. } | UffdError::Range { source, .. } => {
                source.raw_os_error()
            }
            UffdError::Read(e) => e.raw_os_error(),
        }
    }

    /// EBUSY or EAGAIN: the kernel declined this time (a page it would
    /// not move now), not a wrong request.
    pub fn is_transient(&self) -> bool {
        matches!(self.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN))
    }
}

/// Which phase of the snapshot failed (DESIGN.md §2's three rollback cases).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Sync,
    Worker,
    FaultPath,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Sync => "sync phase",
            Phase::Worker => "worker",
            Phase::FaultPath => "fault path",
        })
    }
}

/// Engine errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot in progress")]
    SnapshotInProgress,
    #[error("no snapshot in progress")]
    NoSnapshot,
    #[error("invalid region {index} (guest {guest_addr:#x}, len {len:#x}): {reason}")]
    InvalidRegion {
        index: usize,
        guest_addr: u64,
        len: u64,
        reason: &'static str,
    },
    #[error("guest range [{guest_addr:#x}, +{len:#x}) is not in any snapshotted region")]
    OutOfRange { guest_addr: u64, len: u64 },
    #[error("{phase}: {source}")]
    Uffd { phase: Phase, source: UffdError },
    #[error("{phase}: {op} of [{start:#x}, +{len:#x}) failed: {source}")]
    Memory {
        phase: Phase,
        op: &'static str,
        start: u64,
        len: u64,
        source: io::Error,
    },
    /// Writing the memory image failed (a full disk, EIO, ...).
    #[error("{phase}: {source}")]
    Write {
        phase: Phase,
        source: crate::persist::PersistError,
    },
    #[error("{phase}: cannot spawn thread {name}: {source}")]
    Spawn {
        phase: Phase,
        name: String,
        source: io::Error,
    },
    #[error("{phase}: injected failure ({what})")]
    Injected { phase: Phase, what: String },
    #[error("invalid configuration: {0}")]
    InvalidConfig(&'static str),
    #[error("snapshot cancelled")]
    Cancelled,
    #[error("a snapshot thread panicked: {0}")]
    ThreadPanicked(String),
    /// A copier panicked (a bug); caught, and the snapshot rolled back.
    #[error("{phase}: panicked ({what}); snapshot rolled back")]
    Panicked { phase: Phase, what: String },
    /// A chunk of the snapshot a VM is still loading from could not be
    /// read for the new snapshot.
    #[error("{phase}: {source}")]
    Parent {
        phase: Phase,
        source: crate::lazy::LoadError,
    },
    /// `SNAPVM_INJECT` could not be parsed (test hook).
    #[error("invalid fault injection: {0}")]
    InvalidInjection(String),
}

/// The message of a caught panic payload.
pub(crate) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Error {
    pub(crate) fn uffd(phase: Phase, source: UffdError) -> Error {
        Error::Uffd { phase, source }
    }
}
