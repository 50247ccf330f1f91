//! Identity-mapped page tables.
//!
//! The first 4 GiB are mapped with 2 MiB pages by tables that are plain
//! data in the image (built by the assembler at link time), so ring 0 only
//! loads CR3 and never loops over entries. The 3-4 GiB hole, where MMIO
//! devices live, is mapped uncached. Every entry has U/S = 1 and R/W = 1:
//! all kernel work runs in ring 3, including extending these tables for RAM
//! above 4 GiB ([`map_ram_above_4g`]). Turning not-present entries into
//! present ones needs no TLB flush.

use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{compiler_fence, Ordering};

/// Present, writable, user.
const TABLE_FLAGS: u64 = 0x7;
/// Present, writable, user, 2 MiB page.
const HUGE_FLAGS: u64 = 0x87;
/// Same, with PWT | PCD (uncached) for the MMIO hole.
const HUGE_UC_FLAGS: u64 = 0x9f;
const HUGE_PAGE: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
/// Mapped by the static tables.
pub const STATIC_MAPPED_END: u64 = 4 * GIB;
/// Extra page directories for RAM above 4 GiB (1 GiB each).
const EXTRA_PDS: usize = 60;
/// Highest address [`map_ram_above_4g`] can map.
pub const MAX_MAPPED_END: u64 = STATIC_MAPPED_END + EXTRA_PDS as u64 * GIB;

global_asm!(
    ".pushsection .data.boot_page_tables, \"aw\"",
    ".p2align 12",
    ".global boot_pml4",
    "boot_pml4:",
    "    .quad boot_pdpt + {table}",
    "    .fill 511, 8, 0",
    ".global boot_pdpt",
    "boot_pdpt:",
    "    .quad boot_pd + 0x0000 + {table}",
    "    .quad boot_pd + 0x1000 + {table}",
    "    .quad boot_pd + 0x2000 + {table}",
    "    .quad boot_pd + 0x3000 + {table}",
    "    .fill 508, 8, 0",
    "boot_pd:",
    "    .set pd_index, 0",
    "    .rept 1536",                  // 0-3 GiB: RAM, write-back
    "    .quad (pd_index * {huge_page}) + {huge}",
    "    .set pd_index, pd_index + 1",
    "    .endr",
    "    .rept 512",                   // 3-4 GiB: MMIO hole, uncached
    "    .quad (pd_index * {huge_page}) + {huge_uc}",
    "    .set pd_index, pd_index + 1",
    "    .endr",
    ".popsection",
    table = const TABLE_FLAGS,
    huge = const HUGE_FLAGS,
    huge_uc = const HUGE_UC_FLAGS,
    huge_page = const HUGE_PAGE,
);

#[repr(C, align(4096))]
struct PageTable([u64; 512]);

/// Page directories for RAM above 4 GiB, filled by [`map_ram_above_4g`].
struct ExtraTables(UnsafeCell<[PageTable; EXTRA_PDS]>);
// SAFETY: only the BSP writes these, once, before the APs start.
unsafe impl Sync for ExtraTables {}
static EXTRA: ExtraTables =
    ExtraTables(UnsafeCell::new([const { PageTable([0; 512]) }; EXTRA_PDS]));

extern "C" {
    /// The static PDPT from the assembly above (512 entries).
    static mut boot_pdpt: [u64; 512];
}

/// Maps RAM up to `end` (exclusive) beyond the static 4 GiB, 1 GiB at a
/// time. Returns the end of the identity mapping afterwards, which is less
/// than `end` if it exceeds [`MAX_MAPPED_END`].
///
/// Must run on the BSP before the APs start and before anything touches
/// memory above 4 GiB.
pub fn map_ram_above_4g(end: u64) -> u64 {
    let end = end.min(MAX_MAPPED_END);
    let mut mapped = STATIC_MAPPED_END;
    let mut index = 0;
    while mapped < end {
        let pd = EXTRA.0.get().cast::<PageTable>().wrapping_add(index);
        for (i, entry) in (0..512u64).enumerate() {
            let value = (mapped + entry * HUGE_PAGE) | HUGE_FLAGS;
            // SAFETY: `pd` points at one of EXTRA_PDS static tables (index <
            // EXTRA_PDS because mapped < MAX_MAPPED_END), which nothing
            // else references yet; volatile because the MMU reads it.
            unsafe { core::ptr::addr_of_mut!((*pd).0[i]).write_volatile(value) };
        }
        // The directory must be complete before the PDPT entry makes it
        // reachable.
        compiler_fence(Ordering::SeqCst);
        let slot = (mapped / GIB) as usize;
        // SAFETY: slot < 4 + EXTRA_PDS < 512; the PDPT is identity-mapped
        // and user-writable, and only this CPU changes it, from not-present
        // to present (no TLB flush needed).
        unsafe {
            (&raw mut boot_pdpt)
                .cast::<u64>()
                .add(slot)
                .write_volatile(pd as u64 | TABLE_FLAGS);
        }
        mapped += GIB;
        index += 1;
    }
    mapped
}
