//! The kernel heap: every byte of free RAM, handed to `talc`.
//!
//! Free RAM = the memory map's RAM regions, minus everything below 1 MiB
//! (real-mode leftovers, the loader's start info), minus the kernel image
//! (which contains the page tables, GDT/IDT/TSSs and static stacks), limited
//! to what is identity-mapped. The start info was copied out before this
//! runs, so its memory may be reused. Overlapping memory-map entries are
//! clipped so no byte is claimed twice.

use spin::mutex::SpinMutex;
use talc::source::Manual;
use talc::TalcLock;

use super::start_info::{BootInfo, MAX_MEMMAP};

#[global_allocator]
static ALLOCATOR: TalcLock<SpinMutex<()>, Manual> = TalcLock::new(Manual);

/// Below this, RAM is left alone.
const LOW_LIMIT: u64 = 1 << 20;

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

/// `[start, end)` of the loaded kernel image, page-aligned (linker.ld).
pub fn kernel_image() -> (u64, u64) {
    (
        (&raw const __kernel_start) as u64,
        (&raw const __kernel_end) as u64,
    )
}

/// Claims free RAM below `mapped_end` for the heap; returns the bytes
/// claimed. BSP only, once, before any allocation and before the APs run.
pub fn init(boot: &BootInfo, mapped_end: u64) -> u64 {
    let mut regions = [(0u64, 0u64); MAX_MEMMAP];
    let mut count = 0;
    for (start, end) in boot.ram() {
        let (start, end) = (start.max(LOW_LIMIT), end.min(mapped_end));
        if start < end && count < regions.len() {
            regions[count] = (start, end);
            count += 1;
        }
    }
    let regions = &mut regions[..count];
    regions.sort_unstable_by_key(|&(start, _)| start);

    let (kernel_start, kernel_end) = kernel_image();
    let mut claimed_end = 0;
    let mut total = 0;
    for &(start, end) in regions.iter() {
        let start = start.max(claimed_end);
        if start >= end {
            continue;
        }
        claimed_end = end;
        // The part before and the part after the kernel image.
        for (s, e) in [(start, end.min(kernel_start)), (start.max(kernel_end), end)] {
            if s < e {
                total += claim(s, e);
            }
        }
    }
    total
}

/// Bytes taken from the heap, allocator metadata and alignment included:
/// what the KV store checks `maxmemory` against.
pub fn used_bytes() -> usize {
    let talc = ALLOCATOR.lock();
    let c = talc.counters();
    c.claimed_bytes.saturating_sub(c.available_bytes)
}

fn claim(start: u64, end: u64) -> u64 {
    let size = (end - start) as usize;
    // SAFETY: [start, end) is RAM per the memory map, identity-mapped,
    // outside the kernel image and above 1 MiB, not claimed before (regions
    // are clipped against each other), and nothing else uses it: the start
    // info was copied and no AP runs yet.
    match unsafe { ALLOCATOR.lock().claim(start as *mut u8, size) } {
        Some(_) => size as u64,
        // Too small to hold a chunk (or talc's metadata, for the first).
        None => 0,
    }
}
