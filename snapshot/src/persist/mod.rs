//! The persisted snapshot: a directory with `state.bin` (header, chunk
//! checksums, the VMM's VM state blob) and a sparse `memory.img`. See
//! `format` for the layout, `writer` for atomicity, `reader` for lazy
//! restore.

pub mod error;
pub mod format;
pub mod reader;
mod write_behind;
pub mod writer;

pub use error::PersistError;
pub use format::{ChunkEntry, Header, RegionEntry, FORMAT_VERSION, MEMORY_FILE, STATE_FILE};
pub use reader::{MappedRegion, SnapshotDir};
pub use writer::{write_snapshot, WriteOptions, WriteProgress, WriteSummary, TMP_INFIX};
