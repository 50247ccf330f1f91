//! The finished snapshot: the snapshot VM's memory and what it cost.

use std::sync::Arc;

use crate::error::Error;
use crate::memory::Destination;
use crate::metrics::Metrics;
use crate::region::{Layout, Region, CHUNK_SIZE};

/// Guest memory as it was when `begin()` ran, bit for bit.
#[derive(Debug)]
pub struct Snapshot {
    pub(crate) dest: Arc<Destination>,
    pub(crate) layout: Layout,
    pub(crate) zero: Vec<bool>,
    pub(crate) metrics: Metrics,
}

impl Snapshot {
    /// The regions, as passed to `begin()` (host addresses are the running
    /// VM's, kept for reference only).
    pub fn regions(&self) -> &[Region] {
        self.layout.regions()
    }

    /// Region `i`'s memory in the snapshot.
    pub fn region_memory(&self, i: usize) -> &[u8] {
        let r = &self.layout.regions()[i];
        let off = self.layout.first_chunk(i) as u64 * CHUNK_SIZE;
        &self.dest.as_slice()[off as usize..(off + r.len) as usize]
    }

    /// The whole image: regions back to back in `begin()` order.
    pub fn image(&self) -> &[u8] {
        self.dest.as_slice()
    }

    pub fn chunk_count(&self) -> usize {
        self.zero.len()
    }

    /// Chunk `i` (global numbering, image order) had no populated page at
    /// the fork: it reads as zero and can be persisted as a hole.
    pub fn chunk_is_zero(&self, i: usize) -> bool {
        self.zero[i]
    }

    pub fn zero_chunks(&self) -> &[bool] {
        &self.zero
    }

    /// Copies guest-physical `[guest_addr, +buf.len())` out of the snapshot.
    pub fn read(&self, guest_addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        let len = buf.len() as u64;
        for (i, r) in self.layout.regions().iter().enumerate() {
            if guest_addr >= r.guest_addr && guest_addr + len <= r.guest_addr + r.len {
                let off = (guest_addr - r.guest_addr) as usize;
                buf.copy_from_slice(&self.region_memory(i)[off..off + buf.len()]);
                return Ok(());
            }
        }
        Err(Error::OutOfRange { guest_addr, len })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
