//! The persisted snapshot: a directory with `state.bin` (header, chunk
//! checksums, the VMM's VM state blob) and a sparse `memory.img`. See
//! `format` for the layout, `image` for how memory.img is written (from
//! guest RAM, while the snapshot runs), `writer` for the directory's
//! atomic life cycle, `reader` for lazy restore.

pub mod chain;
pub mod error;
pub mod format;
pub mod image;
pub mod merge;
pub mod reader;
mod write_behind;
pub mod writer;

pub use chain::SnapshotChain;
pub use error::PersistError;
pub use format::{
    ChunkEntry, Header, ParentRef, RegionEntry, FORMAT_VERSION, MEMORY_FILE, STATE_FILE,
};
pub use image::{ImageFaults, ImageFile};
pub use reader::{MappedRegion, SnapshotDir};
pub use writer::{SnapshotWriter, WriteOptions, WriteSummary, TMP_INFIX};
