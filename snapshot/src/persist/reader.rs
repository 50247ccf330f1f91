//! Opening a snapshot directory for restore.
//!
//! `SnapshotDir::open` reads and checks only state.bin (magic, version,
//! length, checksum, every field) and the size of memory.img: O(header), no
//! memory is read. Restore then maps each region with `map_region`
//! (`mmap(MAP_PRIVATE)` of memory.img): the kernel pages it in on first
//! access, holes read as zero, and the restored VM's writes stay private
//! (copy-on-write), so the snapshot can be restored again.
//! `verify_chunks` checks every chunk's checksum; it reads the whole image,
//! so it is for `--verify` and tests, not the fast path.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::PersistError;
use super::format::{self, Header, MEMORY_FILE, STATE_FILE};

/// An opened, header-validated snapshot directory.
#[derive(Debug)]
pub struct SnapshotDir {
    path: PathBuf,
    header: Header,
    vm_state: Vec<u8>,
    image: File,
    /// state.bin's trailer crc32c and length: the content id an
    /// incremental child records for its parent.
    state_crc: u32,
    state_len: u64,
}

impl SnapshotDir {
    pub fn open(dir: &Path) -> Result<SnapshotDir, PersistError> {
        let state_path = dir.join(STATE_FILE);
        let mut buf = Vec::new();
        if let Err(e) = File::open(&state_path).and_then(|mut f| f.read_to_end(&mut buf)) {
            // state.bin is written last: an image without it is a write
            // that never finished, not a damaged snapshot.
            if e.kind() == std::io::ErrorKind::NotFound && dir.join(MEMORY_FILE).exists() {
                return Err(PersistError::Incomplete(dir.into()));
            }
            return Err(PersistError::io(&state_path, "read", e));
        }
        let (header, vm_state) =
            format::decode(&buf).map_err(|e| PersistError::decode(state_path.clone(), e))?;
        let mem_path = dir.join(MEMORY_FILE);
        let image = File::open(&mem_path).map_err(|e| PersistError::io(&mem_path, "open", e))?;
        let actual = image
            .metadata()
            .map_err(|e| PersistError::io(&mem_path, "stat", e))?
            .len();
        if actual != header.image_len {
            return Err(PersistError::ImageSize {
                actual,
                expected: header.image_len,
            });
        }
        let state_len = buf.len() as u64;
        let state_crc = buf
            .get(buf.len().saturating_sub(4)..)
            .map_or(0, |t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]));
        Ok(SnapshotDir {
            path: dir.into(),
            header,
            vm_state,
            image,
            state_crc,
            state_len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The content id a child records for this snapshot as its parent.
    pub fn content_id(&self) -> (u32, u64) {
        (self.state_crc, self.state_len)
    }

    /// The open memory.img (for a reader that reopens it, e.g. with
    /// `O_DIRECT`, through `/proc/self/fd`: the same file even if the
    /// directory is renamed or replaced meanwhile).
    pub fn image_fd(&self) -> i32 {
        self.image.as_raw_fd()
    }

    /// The VMM's opaque vCPU and device state, checksum-verified.
    pub fn vm_state(&self) -> &[u8] {
        &self.vm_state
    }

    /// Maps region `i` lazily (MAP_PRIVATE, read-write, copy-on-write).
    /// Nothing is read until pages are touched.
    pub fn map_region(&self, i: usize) -> Result<MappedRegion, PersistError> {
        let r = *self
            .header
            .regions
            .get(i)
            .ok_or(PersistError::NoSuchRegion(i))?;
        let map_err = |source| PersistError::Map {
            region: i,
            file_offset: r.file_offset,
            len: r.len,
            source,
        };
        let len =
            usize::try_from(r.len).map_err(|_| map_err(std::io::ErrorKind::InvalidInput.into()))?;
        let off = libc::off_t::try_from(r.file_offset)
            .map_err(|_| map_err(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: a fresh private mapping of our open file at a
        // kernel-chosen address; offset is chunk (so page) aligned and the
        // range lies within the file (validated in open()).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                self.image.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error()));
        }
        Ok(MappedRegion {
            guest_addr: r.guest_addr,
            ptr: p.cast(),
            len,
        })
    }

    /// Maps every region (see `map_region`).
    pub fn map_all(&self) -> Result<Vec<MappedRegion>, PersistError> {
        (0..self.header.regions.len())
            .map(|i| self.map_region(i))
            .collect()
    }

    /// Reads every chunk with pread (not through a mapping, so it populates
    /// nothing) and checks its crc32c; holes must read as zero. Returns the
    /// first bad chunk by index and guest address.
    pub fn verify_chunks(&self) -> Result<(), PersistError> {
        let mem_path = self.path.join(MEMORY_FILE);
        let mut buf = vec![0u8; self.header.chunk_size as usize];
        for (index, (pos, c)) in self
            .header
            .chunk_positions()
            .zip(&self.header.chunks)
            .enumerate()
        {
            self.image
                .read_exact_at(&mut buf, pos.file_offset)
                .map_err(|e| PersistError::io(&mem_path, "read", e))?;
            if c.inherited {
                // Held by the parent chain: checked in that layer.
                continue;
            }
            if c.zero {
                if buf.iter().any(|&b| b != 0) {
                    return Err(PersistError::ChunkNotZero {
                        index,
                        guest_addr: pos.guest_addr,
                    });
                }
                continue;
            }
            let computed = format::checksum(&buf);
            if computed != c.crc {
                return Err(PersistError::ChunkChecksum {
                    index,
                    guest_addr: pos.guest_addr,
                    expected: c.crc,
                    computed,
                });
            }
        }
        Ok(())
    }
}

/// One region of memory.img mapped MAP_PRIVATE; unmapped on drop. The VMM
/// can hand `as_ptr()` to KVM as the memslot's userspace address.
///
/// The file must not be truncated or rewritten while mapped (pages not yet
/// touched would then read the new contents, or SIGBUS past the end);
/// snapshot directories are written once and never modified in place.
#[derive(Debug)]
pub struct MappedRegion {
    pub guest_addr: u64,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this struct.
unsafe impl Send for MappedRegion {}
// SAFETY: shared access is read-only through `as_slice`; writes go through
// the raw pointer under the caller's own synchronisation.
unsafe impl Sync for MappedRegion {}

impl MappedRegion {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: mapped readable for `len` bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in map_region.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
