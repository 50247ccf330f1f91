//! The guest-physical address map: where RAM, the MMIO hole and the boot
//! structures live, and the e820 map that describes it to the guest.
//!
//! Everything the loader places below 1 MiB is listed here so that no two
//! structures can overlap by accident.

/// 2 MiB: one host PMD entry and one THP; RAM sizes are rounded up to it.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// Start of the MMIO hole (reserved for virtio-mmio devices).
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// End of the MMIO hole; RAM beyond 3 GiB continues here.
pub const MMIO_HOLE_END: u64 = 4 << 30;
/// Size of the hole.
pub const MMIO_HOLE_SIZE: u64 = MMIO_HOLE_END - MMIO_HOLE_START;
/// First virtio-mmio register window (4 KiB per device), in the hole.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The IRQ named in `virtio_mmio.device=` (Linux wants one; our guest polls).
pub const VIRTIO_MMIO_IRQ: u32 = 5;

/// Boot GDT (see boot/gdt.rs).
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Empty IDT for the 64-bit Linux entry (interrupts stay off until Linux sets its own).
pub const BOOT_IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd), right after the start info.
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map table.
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// Linux zero page (`boot_params`); PVH and Linux boots never coexist.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack of the 64-bit Linux entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables of the 64-bit Linux entry: PML4, PDPT, PD.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line we accept, NUL included (Linux's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the EBDA: low RAM ends here, the legacy BIOS area follows.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// e820 / PVH memory map types (identical numbering).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// A contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub start: u64,
    pub len: u64,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Rounds `bytes` up to a multiple of [`HUGE_PAGE_SIZE`] (saturating).
pub fn round_up_to_huge_page(bytes: u64) -> u64 {
    bytes
        .checked_add(HUGE_PAGE_SIZE - 1)
        .map(|b| b & !(HUGE_PAGE_SIZE - 1))
        .unwrap_or(!(HUGE_PAGE_SIZE - 1))
}

/// Splits `ram_size` bytes of RAM around the MMIO hole: up to 3 GiB from 0,
/// the rest from 4 GiB.
pub fn ram_ranges(ram_size: u64) -> Vec<RamRange> {
    let low = ram_size.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange { start: 0, len: low }];
    if ram_size > MMIO_HOLE_START {
        ranges.push(RamRange {
            start: MMIO_HOLE_END,
            len: ram_size - MMIO_HOLE_START,
        });
    }
    ranges
}

/// The e820 map shown to the guest: low RAM below the EBDA, the legacy area
/// (EBDA, VGA, BIOS) reserved, RAM from 1 MiB, the MMIO hole reserved, and
/// RAM above 4 GiB.
pub fn e820_map(ram_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = ram_size.min(MMIO_HOLE_START);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    map.push(E820Entry {
        addr: MMIO_HOLE_START,
        size: MMIO_HOLE_SIZE,
        kind: E820_RESERVED,
    });
    if ram_size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: MMIO_HOLE_END,
            size: ram_size - MMIO_HOLE_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn rounding() {
        assert_eq!(round_up_to_huge_page(0), 0);
        assert_eq!(round_up_to_huge_page(1), 2 * MIB);
        assert_eq!(round_up_to_huge_page(2 * MIB), 2 * MIB);
        assert_eq!(round_up_to_huge_page(2 * MIB + 1), 4 * MIB);
        assert_eq!(round_up_to_huge_page(u64::MAX), !(2 * MIB - 1));
    }

    #[test]
    fn small_vm_has_one_range() {
        assert_eq!(
            ram_ranges(512 * MIB),
            vec![RamRange {
                start: 0,
                len: 512 * MIB
            }]
        );
    }

    #[test]
    fn big_vm_skips_the_hole() {
        let r = ram_ranges(5 * GIB);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            RamRange {
                start: 0,
                len: 3 * GIB
            }
        );
        assert_eq!(
            r[1],
            RamRange {
                start: 4 * GIB,
                len: 2 * GIB
            }
        );
        assert_eq!(r[1].end(), 6 * GIB);
    }

    #[test]
    fn e820_small() {
        let m = e820_map(512 * MIB);
        assert_eq!(
            m[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM
            }
        );
        assert_eq!(m[1].kind, E820_RESERVED);
        assert_eq!(
            m[2],
            E820Entry {
                addr: MIB,
                size: 511 * MIB,
                kind: E820_RAM
            }
        );
        assert_eq!(
            m[3],
            E820Entry {
                addr: 3 * GIB,
                size: GIB,
                kind: E820_RESERVED
            }
        );
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn e820_big_covers_all_ram_and_entries_do_not_overlap() {
        let m = e820_map(6 * GIB);
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Everything but the legacy hole between the EBDA and 1 MiB.
        assert_eq!(ram, 6 * GIB - (HIMEM_START - EBDA_START));
        for w in m.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
        assert_eq!(m.last().map(|e| e.addr + e.size), Some(7 * GIB));
    }
}
