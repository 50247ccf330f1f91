//! Errors of writing and reading a snapshot directory. Each names the file
//! and, for I/O, the operation.

use std::io;
use std::path::PathBuf;

use super::format::DecodeError;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{} already exists (pass overwrite to replace it)", .0.display())]
    TargetExists(PathBuf),
    #[error("{} exists and is not a directory; refusing to replace it", .0.display())]
    TargetNotDirectory(PathBuf),
    #[error("{}: not a usable snapshot path (needs a parent directory and a name)", .0.display())]
    InvalidTarget(PathBuf),
    /// The disk is full (ENOSPC); nothing was left behind.
    #[error("{op} {}: no space left on device", .path.display())]
    NoSpace { path: PathBuf, op: &'static str },
    /// Any other I/O failure (EIO, EACCES, ...).
    #[error("{op} {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("{}: not a snapvm snapshot state file (bad magic)", .0.display())]
    BadMagic(PathBuf),
    #[error("unsupported snapshot format version {found} (this snapvm reads 1 to {newest})")]
    UnsupportedVersion { found: u32, newest: u32 },
    #[error("{}: state file is truncated ({actual} bytes, expected {expected})", .path.display())]
    Truncated {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("{}: state file has trailing data ({actual} bytes, expected {expected})", .path.display())]
    TrailingData {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("{}: state file checksum mismatch (stored {stored:#010x}, computed {computed:#010x})", .path.display())]
    StateChecksum {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    #[error("{}: VM state checksum mismatch (stored {stored:#010x}, computed {computed:#010x})", .path.display())]
    BlobChecksum {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    #[error("{}: malformed state file: {what}", .path.display())]
    Malformed { path: PathBuf, what: String },
    #[error("memory image is {actual} bytes, the state file expects {expected}")]
    ImageSize { actual: u64, expected: u64 },
    #[error("memory image chunk {index} (guest {guest_addr:#x}) is corrupt: checksum {computed:#010x}, expected {expected:#010x}")]
    ChunkChecksum {
        index: usize,
        guest_addr: u64,
        expected: u32,
        computed: u32,
    },
    #[error(
        "memory image chunk {index} (guest {guest_addr:#x}) should be a zero hole but holds data"
    )]
    ChunkNotZero { index: usize, guest_addr: u64 },
    #[error(
        "mmap of region {region} (file offset {file_offset:#x}, len {len:#x}) failed: {source}"
    )]
    Map {
        region: usize,
        file_offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error("no region {0} in this snapshot")]
    NoSuchRegion(usize),
    #[error("snapshot to persist is invalid: {0}")]
    InvalidSnapshot(String),
    /// memory.img without state.bin: the write was interrupted (snapvm was
    /// killed) before the snapshot was complete.
    #[error(
        "{}: incomplete snapshot (memory.img without state.bin: its write was interrupted); it cannot be restored",
        .0.display()
    )]
    Incomplete(PathBuf),
    /// `SNAPVM_INJECT` could not be parsed (test hook).
    #[error("invalid fault injection: {0}")]
    Injection(String),
    /// An incremental snapshot whose parent cannot be opened (missing,
    /// damaged, incomplete).
    #[error("snapshot {}: its parent {} cannot be used: {source}", .child.display(), .parent.display())]
    Parent {
        child: PathBuf,
        parent: PathBuf,
        source: Box<PersistError>,
    },
    /// The parent directory holds another snapshot than the one the child
    /// was taken from.
    #[error(
        "snapshot {}: its parent {} is not the snapshot it was taken from (content id {found_crc:#010x}/{found_len} bytes, expected {expected_crc:#010x}/{expected_len} bytes)",
        .child.display(), .parent.display()
    )]
    ParentMismatch {
        child: PathBuf,
        parent: PathBuf,
        found_crc: u32,
        found_len: u64,
        expected_crc: u32,
        expected_len: u64,
    },
    #[error("snapshot {}: its parent {} disagrees with it: {what}", .child.display(), .parent.display())]
    ParentInconsistent {
        child: PathBuf,
        parent: PathBuf,
        what: String,
    },
    #[error("snapshot {}: its chain of parents is longer than {max} (or loops)", .dir.display())]
    ChainTooLong { dir: PathBuf, max: usize },
}

impl PersistError {
    /// Wraps an I/O error; ENOSPC becomes `NoSpace`.
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            PersistError::NoSpace { path, op }
        } else {
            PersistError::Io { path, op, source }
        }
    }

    pub(crate) fn decode(path: PathBuf, e: DecodeError) -> Self {
        match e {
            DecodeError::BadMagic => PersistError::BadMagic(path),
            DecodeError::UnsupportedVersion(found) => PersistError::UnsupportedVersion {
                found,
                newest: super::format::FORMAT_VERSION_DIFF,
            },
            DecodeError::Truncated { actual, expected } => PersistError::Truncated {
                path,
                actual,
                expected,
            },
            DecodeError::TrailingData { actual, expected } => PersistError::TrailingData {
                path,
                actual,
                expected,
            },
            DecodeError::Checksum { stored, computed } => PersistError::StateChecksum {
                path,
                stored,
                computed,
            },
            DecodeError::BlobChecksum { stored, computed } => PersistError::BlobChecksum {
                path,
                stored,
                computed,
            },
            DecodeError::Malformed(what) => PersistError::Malformed { path, what },
        }
    }
}
