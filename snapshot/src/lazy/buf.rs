//! One chunk of staging memory: an anonymous, chunk-aligned mapping whose
//! pages a load fills (by reading the image into it) and then moves into
//! guest RAM with UFFDIO_MOVE, which leaves it unmapped for the next
//! chunk. Advised for huge pages when guest RAM is, so the read allocates
//! one huge page and the move hands it over whole.

use crate::region::{CHUNK_SIZE, PAGE_SIZE};

#[derive(Debug)]
pub struct ChunkBuf {
    raw: *mut libc::c_void,
    raw_len: usize,
    addr: *mut u8,
}

// SAFETY: plain anonymous memory owned by this struct; whoever holds the
// `&mut` uses it.
unsafe impl Send for ChunkBuf {}

impl ChunkBuf {
    pub fn new(huge: bool) -> std::io::Result<ChunkBuf> {
        let raw_len = 2 * CHUNK_SIZE as usize;
        // SAFETY: a fresh anonymous private mapping; checked below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                raw_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let addr = (raw as usize).div_ceil(CHUNK_SIZE as usize) * CHUNK_SIZE as usize;
        let advice = if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: advice on our own mapping; failure only costs huge pages.
        unsafe { libc::madvise(addr as *mut _, CHUNK_SIZE as usize, advice) };
        Ok(ChunkBuf {
            raw,
            raw_len,
            addr: addr as *mut u8,
        })
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.addr
    }

    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Makes the kernel allocate the buffer's memory now (one huge page
    /// when advised so), so the next read into it does not: done right
    /// after a move, off the path of the next fault.
    pub fn prefault(&mut self) {
        let mut at = 0;
        while at < CHUNK_SIZE as usize {
            // SAFETY: inside the mapping. Reading first keeps any data (a
            // buffer whose move failed still holds its chunk).
            unsafe {
                let p = self.addr.add(at);
                std::ptr::write_volatile(p, std::ptr::read_volatile(p));
            }
            at += PAGE_SIZE as usize;
        }
    }

    /// Populates every page with zeros (fresh anonymous pages are zero; a
    /// write per page makes the kernel allocate them), for a chunk the
    /// image holds no data for.
    pub fn fill_zero(&mut self) {
        // Earlier contents (a chunk that could not be moved) must go.
        // SAFETY: our own mapping, CHUNK_SIZE bytes from `addr`.
        unsafe {
            libc::madvise(self.addr.cast(), CHUNK_SIZE as usize, libc::MADV_DONTNEED);
        }
        let mut at = 0;
        while at < CHUNK_SIZE as usize {
            // SAFETY: inside the mapping; volatile so the store happens.
            unsafe { std::ptr::write_volatile(self.addr.add(at), 0u8) };
            at += PAGE_SIZE as usize;
        }
    }
}

impl Drop for ChunkBuf {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.raw, self.raw_len) };
    }
}
