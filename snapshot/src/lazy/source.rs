//! A snapshot's memory image as the source of a lazy restore: chunk `i`
//! read with `O_DIRECT` (no page cache: the bytes go to their destination
//! once) and checked against its checksum before anyone may see it.
//!
//! The file is the one `SnapshotDir::open` validated, reopened through
//! `/proc/self/fd`, so renaming, replacing or deleting the directory later
//! changes nothing read here.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::persist::format::{self, ChunkPos};
use crate::persist::{ChunkEntry, SnapshotDir};

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
    dir: PathBuf,
    file: File,
    direct: bool,
    chunk_size: u64,
    chunks: Vec<ChunkEntry>,
    positions: Vec<ChunkPos>,
}

impl ImageSource {
    pub fn new(snap: &SnapshotDir) -> Result<ImageSource, LoadError> {
        let h = snap.header();
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
        Ok(ImageSource {
            dir: snap.path().to_path_buf(),
            file,
            direct,
            chunk_size: h.chunk_size,
            chunks: h.chunks.clone(),
            positions: h.chunk_positions().collect(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Whether reads bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn data(&self, i: usize) -> ChunkData {
        match self.chunks.get(i) {
            Some(c) if !c.zero => ChunkData::Data(c.crc),
            _ => ChunkData::Zero,
        }
    }

    /// Guest address of chunk `i`.
    pub fn guest_addr(&self, i: usize) -> u64 {
        self.positions.get(i).map_or(0, |p| p.guest_addr)
    }

    /// Data chunks (those a full load reads).
    pub fn data_chunks(&self) -> usize {
        self.chunks.iter().filter(|c| !c.zero).count()
    }

    /// Reads data chunk `i` into `buf` (chunk-sized, page aligned) and
    /// checks it. On a checksum mismatch nothing may use `buf`.
    ///
    /// # Safety
    /// `buf` must point to `chunk_size` writable bytes that nobody else
    /// reads or writes meanwhile.
    pub unsafe fn read_chunk(&self, i: usize, buf: *mut u8) -> Result<u32, LoadError> {
        let (Some(pos), ChunkData::Data(crc)) = (self.positions.get(i), self.data(i)) else {
            return Err(LoadError::NoSuchChunk(i));
        };
        let len = self.chunk_size as usize;
        // SAFETY: the caller hands us `len` exclusive writable bytes.
        let b = unsafe { std::slice::from_raw_parts_mut(buf, len) };
        self.file
            .read_exact_at(b, pos.file_offset)
            .map_err(|source| LoadError::Read {
                dir: self.dir.clone(),
                index: i,
                source,
            })?;
        let computed = format::checksum(b);
        if computed != crc {
            return Err(LoadError::Corrupt {
                dir: self.dir.clone(),
                index: i,
                guest_addr: pos.guest_addr,
                expected: crc,
                computed,
            });
        }
        Ok(crc)
    }

    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}
