//! Guest memory regions and the chunk layout over them.
//!
//! A chunk is 2 MiB: one host PMD entry when the memory is THP-backed, so one
//! write-protect bit in the page table and one KVM stage-2 huge mapping.

use crate::error::Error;

/// Size of a chunk, the unit of copying and of protection.
pub const CHUNK_SIZE: u64 = 2 << 20;
/// Host base page size.
pub const PAGE_SIZE: u64 = 4096;
/// Pages per chunk.
pub const PAGES_PER_CHUNK: usize = (CHUNK_SIZE / PAGE_SIZE) as usize;

/// A whole chunk of zeros: what a first touch of a hugetlbfs chunk is
/// resolved with (hugetlbfs takes UFFDIO_COPY only of whole huge pages,
/// and no UFFDIO_ZEROPAGE).
pub static ZERO_CHUNK: [u8; CHUNK_SIZE as usize] = [0; CHUNK_SIZE as usize];
/// A page of zeros.
pub static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// One region of guest RAM: `len` bytes at guest-physical `guest_addr`, backed
/// by host memory at `host_addr`. All three 2 MiB aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub guest_addr: u64,
    pub host_addr: u64,
    pub len: u64,
}

impl Region {
    pub fn new(guest_addr: u64, host_addr: u64, len: u64) -> Region {
        Region {
            guest_addr,
            host_addr,
            len,
        }
    }
}

/// Regions plus the global chunk numbering: region `i` owns chunks
/// `first_chunk[i] .. first_chunk[i] + len / CHUNK_SIZE`, and its bytes sit at
/// `first_chunk[i] * CHUNK_SIZE` in the memory image.
#[derive(Debug, Clone)]
pub struct Layout {
    regions: Vec<Region>,
    first_chunk: Vec<usize>,
    /// Region indices sorted by host address, for fault lookups.
    by_host: Vec<usize>,
    total_chunks: usize,
}

/// Where a chunk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLoc {
    pub region: usize,
    pub host_addr: u64,
    pub guest_addr: u64,
    /// Offset in the memory image (memory.img).
    pub image_offset: u64,
}

impl Layout {
    /// Validates alignment and overlap (guest and host); O(regions log regions).
    pub fn new(regions: &[Region]) -> Result<Layout, Error> {
        let bad = |index: usize, r: &Region, reason| Error::InvalidRegion {
            index,
            guest_addr: r.guest_addr,
            len: r.len,
            reason,
        };
        let mut first_chunk = Vec::with_capacity(regions.len());
        let mut total = 0usize;
        for (i, r) in regions.iter().enumerate() {
            if r.len == 0 {
                return Err(bad(i, r, "empty"));
            }
            if r.guest_addr % CHUNK_SIZE != 0
                || r.host_addr % CHUNK_SIZE != 0
                || r.len % CHUNK_SIZE != 0
            {
                return Err(bad(
                    i,
                    r,
                    "guest address, host address and length must be 2 MiB aligned",
                ));
            }
            if r.host_addr.checked_add(r.len).is_none() || r.guest_addr.checked_add(r.len).is_none()
            {
                return Err(bad(i, r, "range wraps around"));
            }
            first_chunk.push(total);
            total += (r.len / CHUNK_SIZE) as usize;
        }
        let mut by_host: Vec<usize> = (0..regions.len()).collect();
        by_host.sort_by_key(|&i| regions[i].host_addr);
        for w in by_host.windows(2) {
            let (a, b) = (&regions[w[0]], &regions[w[1]]);
            if a.host_addr + a.len > b.host_addr {
                return Err(bad(w[1], b, "host range overlaps another region"));
            }
        }
        let mut by_guest: Vec<usize> = (0..regions.len()).collect();
        by_guest.sort_by_key(|&i| regions[i].guest_addr);
        for w in by_guest.windows(2) {
            let (a, b) = (&regions[w[0]], &regions[w[1]]);
            if a.guest_addr + a.len > b.guest_addr {
                return Err(bad(w[1], b, "guest range overlaps another region"));
            }
        }
        Ok(Layout {
            regions: regions.to_vec(),
            first_chunk,
            by_host,
            total_chunks: total,
        })
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    pub fn total_chunks(&self) -> usize {
        self.total_chunks
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_chunks as u64 * CHUNK_SIZE
    }

    pub fn first_chunk(&self, region: usize) -> usize {
        self.first_chunk[region]
    }

    /// Location of global chunk `chunk` (must be < total_chunks).
    pub fn chunk(&self, chunk: usize) -> ChunkLoc {
        self.unit(chunk, CHUNK_SIZE)
    }

    /// Location of copy unit `i` when memory is cut into units of `unit`
    /// bytes (a power of two dividing CHUNK_SIZE: a chunk or a page). Units
    /// are numbered like chunks: region by region, in `begin()` order.
    pub fn unit(&self, i: usize, unit: u64) -> ChunkLoc {
        let per_chunk = (CHUNK_SIZE / unit) as usize;
        let chunk = i / per_chunk;
        // Regions are few (a handful of memslots): a partition search is fine.
        let region = self.first_chunk.partition_point(|&f| f <= chunk) - 1;
        let r = &self.regions[region];
        let within = (i - self.first_chunk[region] * per_chunk) as u64 * unit;
        ChunkLoc {
            region,
            host_addr: r.host_addr + within,
            guest_addr: r.guest_addr + within,
            image_offset: i as u64 * unit,
        }
    }

    /// The chunk holding host address `addr`, if any.
    pub fn chunk_of_host(&self, addr: u64) -> Option<usize> {
        self.unit_of_host(addr, CHUNK_SIZE)
    }

    /// The unit (of `unit` bytes) holding host address `addr`, if any.
    pub fn unit_of_host(&self, addr: u64, unit: u64) -> Option<usize> {
        let per_chunk = (CHUNK_SIZE / unit) as usize;
        let pos = self
            .by_host
            .partition_point(|&i| self.regions[i].host_addr <= addr);
        let i = *self.by_host.get(pos.checked_sub(1)?)?;
        let r = &self.regions[i];
        if addr < r.host_addr + r.len {
            Some(self.first_chunk[i] * per_chunk + ((addr - r.host_addr) / unit) as usize)
        } else {
            None
        }
    }

    /// The chunks overlapping guest range `[guest_addr, +len)`, per region
    /// (a range may span adjacent regions; bytes in no region are skipped:
    /// they are not RAM we snapshot).
    pub fn chunks_of_guest(&self, guest_addr: u64, len: u64) -> Vec<std::ops::Range<usize>> {
        self.units_of_guest(guest_addr, len, CHUNK_SIZE)
    }

    /// Like `chunks_of_guest`, in units of `unit` bytes.
    pub fn units_of_guest(
        &self,
        guest_addr: u64,
        len: u64,
        unit: u64,
    ) -> Vec<std::ops::Range<usize>> {
        let per_chunk = (CHUNK_SIZE / unit) as usize;
        let end = guest_addr.saturating_add(len);
        let mut out = Vec::new();
        for (i, r) in self.regions.iter().enumerate() {
            let lo = guest_addr.max(r.guest_addr);
            let hi = end.min(r.guest_addr + r.len);
            if lo < hi {
                let first = self.first_chunk[i] * per_chunk;
                let a = first + ((lo - r.guest_addr) / unit) as usize;
                let b = first + ((hi - 1 - r.guest_addr) / unit) as usize + 1;
                out.push(a..b);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const M2: u64 = CHUNK_SIZE;

    #[test]
    fn layout_maps_chunks_both_ways() {
        let l = Layout::new(&[
            Region::new(0, 100 * M2, 4 * M2),
            Region::new(1 << 32, 10 * M2, 2 * M2),
        ])
        .unwrap();
        assert_eq!(l.total_chunks(), 6);
        assert_eq!(l.chunk(5).host_addr, 11 * M2);
        assert_eq!(l.chunk(5).guest_addr, (1 << 32) + M2);
        assert_eq!(l.chunk_of_host(100 * M2 + 3 * M2 + 5), Some(3));
        assert_eq!(l.chunk_of_host(10 * M2), Some(4));
        assert_eq!(l.chunk_of_host(12 * M2), None);
        assert_eq!(l.chunk_of_host(0), None);
        assert_eq!(l.chunks_of_guest(M2 - 1, 2), vec![0..2]);
        assert_eq!(
            l.chunks_of_guest(3 * M2, (1 << 32) - 3 * M2 + 1),
            vec![3..4, 4..5]
        );
        assert!(l.chunks_of_guest(8 * M2, 10).is_empty());
        // Page units: 512 per chunk, same numbering.
        let p = PAGE_SIZE;
        assert_eq!(l.unit(512 * 4 + 3, p).host_addr, 10 * M2 + 3 * p);
        assert_eq!(l.unit(512 * 4 + 3, p).image_offset, 4 * M2 + 3 * p);
        assert_eq!(l.unit_of_host(10 * M2 + 3 * p + 7, p), Some(512 * 4 + 3));
        assert_eq!(l.units_of_guest(p - 1, 2, p), vec![0..2]);
        assert_eq!(l.units_of_guest(1 << 32, 1, p), vec![2048..2049]);
    }

    #[test]
    fn layout_rejects_bad_regions() {
        assert!(Layout::new(&[Region::new(0, 4096, M2)]).is_err());
        assert!(Layout::new(&[Region::new(0, 0, 0)]).is_err());
        assert!(Layout::new(&[Region::new(0, 0, 2 * M2), Region::new(4 * M2, M2, M2)]).is_err());
        assert!(Layout::new(&[Region::new(0, 0, 2 * M2), Region::new(M2, 8 * M2, M2)]).is_err());
    }
}
