//! A snapshot's memory as the source of a lazy restore: chunk `i` read
//! with `O_DIRECT` (no page cache: the bytes go to their destination once)
//! from the layer of the snapshot's chain that holds it, and checked
//! against its checksum before anyone may see it.
//!
//! The files are the ones `SnapshotChain::open` validated, reopened
//! through `/proc/self/fd`, so renaming, replacing or deleting the
//! directories later changes nothing read here.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::persist::format::{self, ChunkPos};
use crate::persist::{SnapshotChain, SnapshotDir};

use super::LoadError;

/// What a chunk holds in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkData {
    /// A hole: zero bytes, nothing stored.
    Zero,
    /// Stored bytes with this checksum (verified when read).
    Data(u32),
}

#[derive(Debug)]
pub struct ImageSource {
    /// The top snapshot's directory (what was restored).
    dir: PathBuf,
    /// One per layer of the chain, top first.
    layers: Vec<Layer>,
    chunk_size: u64,
    /// Per chunk: (layer, crc32c) holding it, or None for a hole.
    holders: Vec<Option<(usize, u32)>>,
    positions: Vec<ChunkPos>,
}

#[derive(Debug)]
struct Layer {
    dir: PathBuf,
    file: File,
    direct: bool,
}

impl ImageSource {
    pub fn new(chain: &SnapshotChain) -> Result<ImageSource, LoadError> {
        let top = chain.top();
        let h = top.header();
        let layers = chain
            .layers()
            .iter()
            .map(Layer::open)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ImageSource {
            dir: top.path().to_path_buf(),
            layers,
            chunk_size: h.chunk_size,
            holders: (0..chain.chunk_count()).map(|i| chain.holder(i)).collect(),
            positions: h.chunk_positions().collect(),
        })
    }
}

impl Layer {
    fn open(snap: &SnapshotDir) -> Result<Layer, LoadError> {
        let fd_path = format!("/proc/self/fd/{}", snap.image_fd());
        let reopen = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&fd_path)
        };
        let (file, direct) = match reopen(true) {
            Ok(f) => (f, true),
            // tmpfs and friends refuse O_DIRECT: read through the cache.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => match reopen(false) {
                Ok(f) => (f, false),
                Err(e) => return Err(LoadError::open(snap.path(), e)),
            },
            Err(e) => return Err(LoadError::open(snap.path(), e)),
        };
        Ok(Layer {
            dir: snap.path().to_path_buf(),
            file,
            direct,
        })
    }
}

impl ImageSource {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn chunk_count(&self) -> usize {
        self.holders.len()
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Whether reads bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.layers.iter().all(|l| l.direct)
    }

    /// How many snapshots the memory comes from (1: a full snapshot).
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    pub fn data(&self, i: usize) -> ChunkData {
        match self.holders.get(i) {
            Some(Some((_, crc))) => ChunkData::Data(*crc),
            _ => ChunkData::Zero,
        }
    }

    /// Guest address of chunk `i`.
    pub fn guest_addr(&self, i: usize) -> u64 {
        self.positions.get(i).map_or(0, |p| p.guest_addr)
    }

    /// Data chunks (those a full load reads).
    pub fn data_chunks(&self) -> usize {
        self.holders.iter().filter(|h| h.is_some()).count()
    }

    /// Reads data chunk `i` into `buf` (chunk-sized, page aligned) and
    /// checks it. On a checksum mismatch nothing may use `buf`.
    ///
    /// # Safety
    /// `buf` must point to `chunk_size` writable bytes that nobody else
    /// reads or writes meanwhile.
    pub unsafe fn read_chunk(&self, i: usize, buf: *mut u8) -> Result<u32, LoadError> {
        let (Some(pos), Some(Some((k, crc)))) = (self.positions.get(i), self.holders.get(i)) else {
            return Err(LoadError::NoSuchChunk(i));
        };
        let (k, crc) = (*k, *crc);
        let layer = &self.layers[k];
        let len = self.chunk_size as usize;
        // SAFETY: the caller hands us `len` exclusive writable bytes.
        let b = unsafe { std::slice::from_raw_parts_mut(buf, len) };
        layer
            .file
            .read_exact_at(b, pos.file_offset)
            .map_err(|source| LoadError::Read {
                dir: layer.dir.clone(),
                index: i,
                source,
            })?;
        let computed = format::checksum(b);
        if computed != crc {
            return Err(LoadError::Corrupt {
                dir: layer.dir.clone(),
                index: i,
                guest_addr: pos.guest_addr,
                expected: crc,
                computed,
            });
        }
        Ok(crc)
    }
}
