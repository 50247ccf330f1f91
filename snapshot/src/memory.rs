//! Host memory helpers: an aligned anonymous mapping (the staging pool's
//! memory), the pagemap reader that tells populated pages from
//! never-touched ones, and the page-run copy the fault path stages with.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Phase};
use crate::region::{CHUNK_SIZE, PAGES_PER_CHUNK, PAGE_SIZE};

/// `MADV_POPULATE_WRITE` (Linux 5.14); not in every libc version we build with.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// An anonymous private mapping, 2 MiB aligned, THP-advised, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    base: *mut u8,
    len: usize,
    map_base: *mut libc::c_void,
    map_len: usize,
}

// SAFETY: the mapping is plain memory owned by this struct; concurrent access
// is coordinated by the chunk table (one writer per chunk, readers after the
// snapshot completes).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(crate) fn new(len: u64) -> Result<Mapping, Error> {
        let map_len = (len + CHUNK_SIZE) as usize;
        // SAFETY: anonymous private mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Memory {
                phase: Phase::Sync,
                op: "mmap staging memory",
                start: 0,
                len,
                source: io::Error::last_os_error(),
            });
        }
        // Over-map by one chunk and align up so THP can back every chunk.
        let base = ((p as usize + CHUNK_SIZE as usize - 1) & !(CHUNK_SIZE as usize - 1)) as *mut u8;
        // SAFETY: advising a range inside our own mapping. Failure (THP
        // disabled) only costs speed, so the result is ignored on purpose.
        unsafe { libc::madvise(base.cast(), len as usize, libc::MADV_HUGEPAGE) };
        Ok(Mapping {
            base,
            len: len as usize,
            map_base: p,
            map_len,
        })
    }

    /// Start of `[offset, ..)` inside the mapping.
    pub(crate) fn ptr(&self, offset: u64) -> *mut u8 {
        debug_assert!(offset <= self.len as u64);
        // SAFETY: offset is within the mapping (callers index by chunk).
        unsafe { self.base.add(offset as usize) }
    }

    pub(crate) fn populate(&self, offset: u64, len: u64, phase: Phase) -> Result<(), Error> {
        debug_assert!(offset + len <= self.len as u64);
        // SAFETY: range inside our mapping.
        let rc = unsafe {
            libc::madvise(
                self.base.add(offset as usize).cast(),
                len as usize,
                MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            return Err(Error::Memory {
                phase,
                op: "populate staging memory",
                start: offset,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; nothing else refers to
        // it (the owning pool or loan is going away).
        unsafe { libc::munmap(self.map_base, self.map_len) };
    }
}

/// Reads `/proc/self/pagemap` to learn which pages of a chunk have a page
/// table entry (present or swapped). Pages without one were never touched
/// (or discarded): they read as zero at the fork and, with MODE_MISSING
/// registered, nobody can populate them without going through our handler.
/// Cheap enough per chunk for the fault path (bench/examples/uffd_probe.rs
/// measures it).
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;

impl Pagemap {
    pub fn open() -> Result<Pagemap, Error> {
        File::open("/proc/self/pagemap")
            .map(|file| Pagemap { file })
            .map_err(|source| Error::Memory {
                phase: Phase::Sync,
                op: "open /proc/self/pagemap",
                start: 0,
                len: 0,
                source,
            })
    }

    /// Bitmap of populated pages of the `pages` (<= PAGES_PER_CHUNK) pages
    /// at host `addr`; entries past `pages` are false.
    pub fn populated(
        &self,
        addr: u64,
        pages: usize,
        phase: Phase,
    ) -> Result<[bool; PAGES_PER_CHUNK], Error> {
        let mut raw = [0u8; PAGES_PER_CHUNK * 8];
        let raw = &mut raw[..pages * 8];
        self.file
            .read_exact_at(raw, addr / PAGE_SIZE * 8)
            .map_err(|source| Error::Memory {
                phase,
                op: "read pagemap",
                start: addr,
                len: pages as u64 * PAGE_SIZE,
                source,
            })?;
        let mut out = [false; PAGES_PER_CHUNK];
        for (i, e) in raw.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(e);
            let v = u64::from_ne_bytes(b);
            out[i] = v & (PM_PRESENT | PM_SWAP) != 0;
        }
        Ok(out)
    }
}

/// Copies the runs of pages marked in `pop` (of `pages`) from `src` to
/// `dst`; with `zero_gaps` the unmarked pages of `dst` are zeroed (it may
/// hold older bytes), else left as they are (they read as zero already).
/// Returns the bytes copied.
///
/// Never-touched pages are *not read*: with MODE_MISSING registered,
/// reading one would trap into our own handler (and deadlock a copier that
/// is the handler).
///
/// # Safety
/// `src` and `dst` must each point to `pages * PAGE_SIZE` (<= CHUNK_SIZE)
/// bytes of mapped memory; no other thread writes either meanwhile (the
/// unit is claimed and write-protected, the slot taken).
pub(crate) unsafe fn copy_populated(
    pop: &[bool; PAGES_PER_CHUNK],
    src: u64,
    dst: *mut u8,
    pages: usize,
    zero_gaps: bool,
) -> u64 {
    let mut copied = 0u64;
    let mut i = 0;
    while i < pages {
        if !pop[i] {
            if zero_gaps {
                // SAFETY: in bounds of the claimed unit (see below).
                unsafe {
                    dst.add(i * PAGE_SIZE as usize)
                        .write_bytes(0, PAGE_SIZE as usize)
                };
            }
            i += 1;
            continue;
        }
        let start = i;
        while i < pages && pop[i] {
            i += 1;
        }
        let off = start * PAGE_SIZE as usize;
        let n = (i - start) * PAGE_SIZE as usize;
        // SAFETY: per the function contract both ranges are mapped, in bounds
        // (off + n <= pages * PAGE_SIZE) and not written concurrently.
        unsafe { copy_streaming((src as usize + off) as *const u8, dst.add(off), n) };
        copied += n as u64;
    }
    // Streaming stores are weakly ordered: fence them before the caller
    // hands `dst` to another thread (a writer reading the staging slot).
    store_fence();
    copied
}

/// Copies `n` bytes with non-temporal (streaming) stores where both ends
/// are 16-byte aligned and `n` is a multiple of 64, else with `memcpy`.
///
/// Why: every destination here (a staging slot, a bounce buffer) is read
/// next by the disk, not the CPU, and the guest (or the fault handler)
/// waits for the copy. Streaming stores skip the read-for-ownership of each
/// destination line: one 2 MiB chunk took 160 µs instead of `memcpy`'s
/// 220-290 µs on this host (docs/journal/2026-12-05-cold-staging-pool.md).
/// Callers must `store_fence()` before another thread reads `dst`.
///
/// # Safety
/// `src` must be readable and `dst` writable for `n` bytes, not
/// overlapping, and nobody writes either meanwhile.
unsafe fn copy_streaming(src: *const u8, dst: *mut u8, n: usize) {
    #[cfg(target_arch = "x86_64")]
    if (src as usize | dst as usize) % 16 == 0 && n % 64 == 0 {
        use std::arch::x86_64::{__m128i, _mm_load_si128, _mm_stream_si128};
        let mut off = 0;
        while off < n {
            // SAFETY: SSE2 is part of the x86_64 baseline; both pointers
            // are 16-byte aligned (checked above) and `off + 64 <= n`
            // (n is a multiple of 64), inside the ranges of the contract.
            unsafe {
                let s = src.add(off) as *const __m128i;
                let d = dst.add(off) as *mut __m128i;
                let (a, b, c, e) = (
                    _mm_load_si128(s),
                    _mm_load_si128(s.add(1)),
                    _mm_load_si128(s.add(2)),
                    _mm_load_si128(s.add(3)),
                );
                _mm_stream_si128(d, a);
                _mm_stream_si128(d.add(1), b);
                _mm_stream_si128(d.add(2), c);
                _mm_stream_si128(d.add(3), e);
            }
            off += 64;
        }
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, n) };
}

/// Orders earlier streaming stores before later stores (`sfence`).
fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `sfence` has no memory operands; SSE is x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn streaming_copy_is_exact_aligned_or_not() {
        let src = pattern(3 * PAGE_SIZE as usize + 64);
        for (s_off, d_off, n) in [
            (0, 0, 8192),
            (0, 0, 64),
            (1, 0, 4096),
            (0, 3, 640),
            (16, 32, 1000),
        ] {
            // Over-allocate u128s so offset 0 is 16-byte aligned.
            let mut dst = vec![0u128; src.len() / 16 + 4];
            let d = dst.as_mut_ptr() as *mut u8;
            let mut s = vec![0u128; src.len() / 16 + 4];
            let sp = s.as_mut_ptr() as *mut u8;
            // SAFETY: both buffers hold src.len() + 64 bytes; offsets and
            // lengths stay inside them.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), sp, src.len());
                copy_streaming(sp.add(s_off), d.add(d_off), n);
                store_fence();
                let got = std::slice::from_raw_parts(d.add(d_off), n);
                assert_eq!(
                    got,
                    &src[s_off..s_off + n],
                    "offsets {s_off}/{d_off}, {n} bytes"
                );
                assert!(std::slice::from_raw_parts(d, d_off).iter().all(|&b| b == 0));
                assert_eq!(*d.add(d_off + n), 0, "nothing past the end");
            }
        }
    }

    #[test]
    fn copy_populated_copies_runs_and_zeroes_gaps() {
        let pages = 8;
        let len = pages * PAGE_SIZE as usize;
        let src = pattern(len);
        let mut dst = vec![0xAAu8; len];
        let mut pop = [false; PAGES_PER_CHUNK];
        for p in [0, 1, 2, 5, 7] {
            pop[p] = true;
        }
        // SAFETY: both buffers are `pages` pages long; nothing else touches them.
        let copied =
            unsafe { copy_populated(&pop, src.as_ptr() as u64, dst.as_mut_ptr(), pages, true) };
        assert_eq!(copied, 5 * PAGE_SIZE);
        for (p, &copied) in pop.iter().enumerate().take(pages) {
            let r = p * PAGE_SIZE as usize..(p + 1) * PAGE_SIZE as usize;
            if copied {
                assert_eq!(dst[r.clone()], src[r], "page {p} copied");
            } else {
                assert!(dst[r].iter().all(|&b| b == 0), "page {p} zeroed");
            }
        }
    }
}
