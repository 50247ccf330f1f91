//! The finished snapshot: what the image holds, chunk by chunk, and what
//! it cost. The bytes themselves are in the image file the engine wrote
//! (`persist::SnapshotWriter` makes it a snapshot directory).

use crate::metrics::Metrics;
use crate::persist::ChunkEntry;
use crate::region::{Layout, Region};

/// Guest memory as it was when `begin()` ran, bit for bit, written to the
/// image: one entry per 2 MiB chunk, regions in `begin()` order.
#[derive(Debug)]
pub struct Snapshot {
    pub(crate) layout: Layout,
    pub(crate) chunks: Vec<ChunkEntry>,
    pub(crate) metrics: Metrics,
}

impl Snapshot {
    /// The regions, as passed to `begin()` (host addresses are the running
    /// VM's, kept for reference only).
    pub fn regions(&self) -> &[Region] {
        self.layout.regions()
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Chunk `i` (global numbering, image order) read as zero at the fork:
    /// a hole in the image.
    pub fn chunk_is_zero(&self, i: usize) -> bool {
        self.chunks[i].zero
    }

    /// Every chunk's entry: a hole, or data with its crc32c.
    pub fn chunks(&self) -> &[ChunkEntry] {
        &self.chunks
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
