//! `memory.img` while it is being written: positional writes from any
//! thread, straight from guest RAM or a staging slot.
//!
//! The file is opened `O_DIRECT` where the file system allows it, so a
//! snapshot's bytes go from guest RAM to the disk without a page-cache copy:
//! no memory proportional to the guest is used, and no dirty page cache
//! piles up for the kernel's flusher threads to write back in bursts on the
//! vCPUs' cores. Where `O_DIRECT` is refused (EINVAL at open) the file is
//! written through the page cache instead, and the write-behind window
//! (`write_behind.rs`) keeps its dirty pages bounded.
//!
//! Invariants:
//! - every source is page aligned and a whole number of pages (guest RAM
//!   and staging slots are), as `O_DIRECT` needs;
//! - nothing here takes a lock on the `O_DIRECT` path, so the fork
//!   baseline's child (one thread, forked while others ran) can use it;
//! - a write returns only once the kernel has read the source: the caller
//!   may lift the chunk's write protection right after.
//!
//! The failure hooks (`fail_after_bytes`, `chunk_delay_ms`) stand in for a
//! full or failing disk and a slow one in tests.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::error::PersistError;
use super::write_behind::{self, WriteBehind};

/// A memory image being written.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    path: PathBuf,
    len: u64,
    direct: bool,
    /// Buffered fallback only: bounds the dirty page cache.
    behind: Option<Mutex<WriteBehind>>,
    written: AtomicU64,
    fail_after: Option<(u64, i32)>,
    delay: Duration,
}

/// Test hooks of an image write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageFaults {
    /// After this many bytes, fail every write with this errno.
    pub fail_after_bytes: Option<(u64, i32)>,
    /// Sleep this long after each write (a slow disk).
    pub write_delay_ms: u64,
}

impl ImageFile {
    /// Creates `path` (which must not exist), `len` bytes long and sparse:
    /// what is never written reads as zero.
    pub fn create(path: &Path, len: u64, faults: ImageFaults) -> Result<ImageFile, PersistError> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.write(true).create_new(true).mode(0o600);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    "{}: the file system refuses O_DIRECT; writing the snapshot through the page cache",
                    path.display()
                );
                let _ = std::fs::remove_file(path);
                (
                    open(false).map_err(|e| PersistError::io(path, "create", e))?,
                    false,
                )
            }
            Err(e) => return Err(PersistError::io(path, "create", e)),
        };
        file.set_len(len)
            .map_err(|e| PersistError::io(path, "set length of", e))?;
        let behind =
            (!direct).then(|| Mutex::new(WriteBehind::new(&file, write_behind::DEFAULT_WINDOW)));
        Ok(ImageFile {
            file,
            path: path.into(),
            len,
            direct,
            behind,
            written: AtomicU64::new(0),
            fail_after: faults.fail_after_bytes,
            delay: Duration::from_millis(faults.write_delay_ms),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's length (the guest RAM it holds).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Writes `len` bytes from `src` at `offset` of the image; returns once
    /// the kernel is done reading `src`.
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes and not written by anyone
    /// until this returns (the chunk is write-protected, or the slot is the
    /// caller's); `src`, `len` and `offset` page aligned.
    pub unsafe fn write_from(
        &self,
        src: *const u8,
        len: usize,
        offset: u64,
    ) -> Result<(), PersistError> {
        debug_assert!(src as usize % 4096 == 0 && len % 4096 == 0 && offset % 4096 == 0);
        let err = |e| PersistError::io(&self.path, "write", e);
        let mut done = 0usize;
        while done < len {
            let mut n = len - done;
            if let Some((after, errno)) = self.fail_after {
                // Whole pages only: O_DIRECT refuses anything else.
                let so_far = self.written.load(Ordering::Relaxed);
                let allowed = after.saturating_sub(so_far) / 4096 * 4096;
                if allowed == 0 {
                    return Err(err(io::Error::from_raw_os_error(errno)));
                }
                n = n.min(allowed as usize);
            }
            // SAFETY: per this function's contract `src + done` is readable
            // for `n <= len - done` bytes; plain syscall on our own fd.
            let rc = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    src.add(done).cast(),
                    n,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err(e));
            }
            if rc == 0 {
                return Err(err(io::Error::from(io::ErrorKind::WriteZero)));
            }
            done += rc as usize;
            self.written.fetch_add(rc as u64, Ordering::Relaxed);
        }
        if let Some(b) = &self.behind {
            let mut b = b.lock().unwrap_or_else(|p| p.into_inner());
            b.written(offset, len as u64)
                .map_err(|e| PersistError::io(&self.path, "write back", e))?;
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        Ok(())
    }

    /// Bytes the file occupies on disk now (its allocated blocks): the
    /// progress of a writer whose counters this process cannot see (the
    /// fork baseline's child).
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map_or(0, |m| m.blocks() * 512)
    }

    /// Makes everything written so far durable (data and the file's
    /// extents).
    pub fn sync(&self) -> Result<(), PersistError> {
        self.file
            .sync_all()
            .map_err(|e| PersistError::io(&self.path, "fsync", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page-aligned buffer of `pages` pages filled with `byte`.
    struct Aligned {
        ptr: *mut u8,
        len: usize,
    }

    impl Aligned {
        fn new(pages: usize, byte: u8) -> Aligned {
            let len = pages * 4096;
            let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
            // SAFETY: non-zero size, valid layout.
            let ptr = unsafe { std::alloc::alloc(layout) };
            assert!(!ptr.is_null());
            // SAFETY: freshly allocated, `len` bytes.
            unsafe { ptr.write_bytes(byte, len) };
            Aligned { ptr, len }
        }
    }

    impl Drop for Aligned {
        fn drop(&mut self) {
            let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
            // SAFETY: allocated with this layout in `new`.
            unsafe { std::alloc::dealloc(self.ptr, layout) };
        }
    }

    fn write_and_read_back(dir: &Path) {
        let path = dir.join("memory.img");
        let img = ImageFile::create(&path, 16 * 4096, ImageFaults::default()).unwrap();
        let a = Aligned::new(2, 0xab);
        // SAFETY: `a` is 2 aligned pages, alive and unwritten meanwhile.
        unsafe { img.write_from(a.ptr, a.len, 4 * 4096) }.unwrap();
        img.sync().unwrap();
        assert_eq!(img.bytes_written(), 2 * 4096);
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 16 * 4096);
        assert!(
            back[..4 * 4096].iter().all(|&b| b == 0),
            "a hole reads zero"
        );
        assert!(back[4 * 4096..6 * 4096].iter().all(|&b| b == 0xab));
        assert!(back[6 * 4096..].iter().all(|&b| b == 0));
        assert!(
            matches!(
                ImageFile::create(&path, 4096, ImageFaults::default()),
                Err(PersistError::Io { .. })
            ),
            "an existing image is never reopened"
        );
    }

    #[test]
    fn writes_land_at_their_offset_on_a_disk_fs() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        write_and_read_back(dir.path());
        let img = ImageFile::create(&dir.path().join("x"), 4096, ImageFaults::default()).unwrap();
        assert!(img.is_direct(), "ext4 takes O_DIRECT");
    }

    #[test]
    fn writes_land_at_their_offset_on_tmpfs() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        write_and_read_back(dir.path());
    }

    #[test]
    fn injected_failure_stops_at_the_byte_and_names_the_file() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("memory.img");
        let faults = ImageFaults {
            fail_after_bytes: Some((4096, libc::ENOSPC)),
            write_delay_ms: 0,
        };
        let img = ImageFile::create(&path, 4 * 4096, faults).unwrap();
        let a = Aligned::new(2, 1);
        // SAFETY: as above.
        let e = unsafe { img.write_from(a.ptr, a.len, 0) }.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("write {}: no space left on device", path.display())
        );
        assert_eq!(img.bytes_written(), 4096);
    }
}
