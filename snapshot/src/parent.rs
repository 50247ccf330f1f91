//! A snapshot of a VM whose memory is still loading from an earlier
//! snapshot (its parent): the link to that load (`Config::lazy`), and the
//! save of a chunk that was not in guest RAM at the new snapshot's instant
//! — its bytes then are the parent's, so they are copied from the parent's
//! image (checked against its checksum), never read from guest RAM, where
//! the chunk may be missing or may have loaded and been written since.

use std::sync::{Arc, Mutex, OnceLock};

use crate::chunk_table::Record;
use crate::error::{Error, Phase};
use crate::lazy::{ChunkBuf, ChunkData, EventSink, Loader};
use crate::metrics::Counters;
use crate::persist::ImageFile;
use crate::region::CHUNK_SIZE;
use crate::sync::lock;

#[derive(Debug)]
pub(crate) struct ParentLink {
    pub loader: Arc<Loader>,
    /// Where the loader passes the faults that are the snapshot's.
    pub sink: Arc<EventSink>,
    /// Per chunk, set at the instant: not in guest RAM then.
    pub from_parent: OnceLock<Vec<bool>>,
    /// Read buffers, one per concurrent copier, reused.
    bufs: Mutex<Vec<ChunkBuf>>,
}

impl ParentLink {
    pub fn new(loader: Arc<Loader>, sink: Arc<EventSink>) -> ParentLink {
        ParentLink {
            loader,
            sink,
            from_parent: OnceLock::new(),
            bufs: Mutex::new(Vec::new()),
        }
    }

    /// Whether chunk `i` is saved from the parent's image.
    pub fn is_from_parent(&self, i: usize) -> bool {
        self.from_parent
            .get()
            .is_some_and(|v| v.get(i).copied().unwrap_or(false))
    }

    /// Saves chunk `i` from the parent's image into `image` at `offset`:
    /// returns its record and the bytes written.
    pub fn copy_chunk(
        &self,
        i: usize,
        image: &ImageFile,
        offset: u64,
        counters: &Counters,
        phase: Phase,
    ) -> Result<Record, Error> {
        let src = self.loader.source();
        if src.data(i) == ChunkData::Zero {
            return Ok(Record::Zero);
        }
        let mut buf = match lock(&self.bufs).pop() {
            Some(b) => b,
            None => ChunkBuf::new(false).map_err(|source| Error::Memory {
                phase,
                op: "map a parent-chunk buffer",
                start: 0,
                len: CHUNK_SIZE,
                source,
            })?,
        };
        let res = (|| {
            // SAFETY: `buf` is ours alone until given back below.
            let crc = unsafe { src.read_chunk(i, buf.as_mut_ptr()) }
                .map_err(|source| Error::Parent { phase, source })?;
            // SAFETY: as above; the write has read it when it returns.
            unsafe { image.write_from(buf.as_mut_ptr(), CHUNK_SIZE as usize, offset) }
                .map_err(|source| Error::Write { phase, source })?;
            Counters::add(&counters.bytes_written, CHUNK_SIZE);
            Counters::add(&counters.from_parent, 1);
            Ok(Record::Data(crc))
        })();
        lock(&self.bufs).push(buf);
        res
    }
}
