//! Resolving a first touch of never-populated guest RAM while a
//! userfaultfd owns it (a snapshot's fault handler, the dirty tracker).
//!
//! The kernel itself would give a THP-advised range a whole zeroed huge
//! page on its first touch; a 4 KiB UFFDIO_ZEROPAGE/COPY instead leaves the
//! chunk on 4 KiB pages for good and costs one round trip through this
//! thread per page — under dirty tracking, which keeps guest RAM registered
//! between snapshots, that made every first touch of new guest memory pay
//! it (a KV guest growing its heap lost a fifth of its SET throughput). So
//! for THP guest RAM a first touch of an empty chunk moves in a zeroed huge
//! page (UFFDIO_MOVE), exactly what the kernel would have done; a chunk
//! already partly populated gets the 4 KiB page, as the kernel would too.
//! hugetlbfs takes only whole huge pages (UFFDIO_COPY of zeros).

use crate::lazy::ChunkBuf;
use crate::region::{CHUNK_SIZE, PAGE_SIZE, ZERO_CHUNK, ZERO_PAGE};
use crate::uffd::{feature, Uffd};

/// One resolving thread's state.
#[derive(Debug)]
pub(crate) struct ZeroFill {
    hugetlb: bool,
    /// THP guest RAM and a uffd that takes UFFDIO_MOVE: fill whole chunks.
    thp: bool,
    buf: Option<ChunkBuf>,
}

impl ZeroFill {
    pub fn new(uffd: &Uffd, thp: bool, hugetlb: bool) -> ZeroFill {
        ZeroFill {
            hugetlb,
            thp: thp && !hugetlb && uffd.features() & feature::MOVE != 0,
            buf: None,
        }
    }

    /// Resolves a missing fault at `address` (in the chunk at `chunk`) and
    /// wakes the thread; false if it could not (the caller wakes it: after
    /// unregister these fail and the kernel has woken it already).
    pub fn resolve(&mut self, uffd: &Uffd, address: u64, chunk: u64, write: bool) -> bool {
        if self.thp && self.fill_chunk(uffd, chunk) {
            return true;
        }
        fill_page(uffd, address, chunk, write, self.hugetlb)
    }

    /// Moves a zeroed huge page into the empty chunk at `chunk`.
    fn fill_chunk(&mut self, uffd: &Uffd, chunk: u64) -> bool {
        if self.buf.is_none() {
            match ChunkBuf::new(true) {
                Ok(b) => self.buf = Some(b),
                Err(_) => {
                    self.thp = false;
                    return false;
                }
            }
        }
        let Some(buf) = self.buf.as_mut() else {
            return false;
        };
        buf.fill_zero();
        match uffd.move_pages(chunk, buf.addr(), CHUNK_SIZE, false) {
            Ok(true) => true,
            // Part of the chunk is populated: a page at a time then.
            Ok(false) => false,
            Err(e) => {
                tracing::debug!("zero huge pages not moved in ({e}); 4 KiB pages from now on");
                self.thp = false;
                false
            }
        }
    }
}

/// Resolves a missing fault at `address` (in the chunk at `chunk`) with
/// zeros the way a partly populated chunk takes them: the whole huge page
/// on hugetlbfs, else the one page (the zero page for a read; a zeroed
/// page for a write, which saves the copy-on-write fault it would take
/// next). Wakes the thread; false if it could not.
pub(crate) fn fill_page(uffd: &Uffd, address: u64, chunk: u64, write: bool, hugetlb: bool) -> bool {
    let page = address & !(PAGE_SIZE - 1);
    let filled = if hugetlb {
        uffd.copy(chunk, ZERO_CHUNK.as_ptr(), CHUNK_SIZE, false)
    } else if write {
        uffd.copy(page, ZERO_PAGE.as_ptr(), PAGE_SIZE, false)
    } else {
        uffd.zeropage(page, PAGE_SIZE, false)
    };
    matches!(filled, Ok(true))
}

/// The features a snapshot's userfaultfd asks for: write-protect faults,
/// and UFFDIO_MOVE where the kernel has it (for `ZeroFill`).
pub(crate) fn uffd_features() -> u64 {
    feature::PAGEFAULT_FLAG_WP | (Uffd::available_features().unwrap_or(0) & feature::MOVE)
}
