//! `snapvm snapshot merge`: the full snapshot a chain of incremental
//! snapshots stands for, written as a new directory (the same atomic
//! writer as any snapshot: complete, durable and checked, or nothing).
//! Each chunk is read from the layer holding it and checked against its
//! checksum on the way.

use std::path::Path;

use super::chain::SnapshotChain;
use super::error::PersistError;
use super::format::ChunkEntry;
use super::writer::{SnapshotWriter, WriteOptions, WriteSummary};
use crate::lazy::{ChunkBuf, ChunkData, ImageSource};
use crate::region::{Region, CHUNK_SIZE};

/// Writes the memory and state `chain` stands for into `out` (which must
/// not exist unless `overwrite`).
pub fn merge(
    chain: &SnapshotChain,
    out: &Path,
    overwrite: bool,
) -> Result<WriteSummary, PersistError> {
    let top = chain.top();
    let regions: Vec<Region> = top
        .header()
        .regions
        .iter()
        .map(|r| Region::new(r.guest_addr, 0, r.len))
        .collect();
    let opts = WriteOptions {
        overwrite,
        ..WriteOptions::default()
    };
    let writer = SnapshotWriter::create(out, &regions, &opts)?;
    let source = ImageSource::new(chain).map_err(|e| PersistError::Malformed {
        path: top.path().into(),
        what: e.to_string(),
    })?;
    let mut buf = ChunkBuf::new(false).map_err(|e| PersistError::io(out, "map a buffer", e))?;
    let positions: Vec<_> = top.header().chunk_positions().collect();
    let mut entries = Vec::with_capacity(positions.len());
    for (i, pos) in positions.iter().enumerate() {
        match source.data(i) {
            ChunkData::Zero => entries.push(ChunkEntry::zero()),
            ChunkData::Data(_) => {
                // SAFETY: `buf` is ours alone.
                let crc = unsafe { source.read_chunk(i, buf.as_mut_ptr()) }.map_err(|e| {
                    PersistError::Malformed {
                        path: top.path().into(),
                        what: e.to_string(),
                    }
                })?;
                // SAFETY: `buf` holds the chunk and nobody writes it until
                // the write returned.
                unsafe {
                    writer.image().write_from(
                        buf.as_mut_ptr(),
                        CHUNK_SIZE as usize,
                        pos.file_offset,
                    )
                }?;
                entries.push(ChunkEntry::data(crc));
            }
        }
    }
    writer.commit_chunks(&entries, top.vm_state())
}
