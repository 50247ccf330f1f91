//! PVH boot: `hvm_start_info`, its memory map and module list (initrd).

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR, PVH_START_INFO_ADDR};

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Writes the start info for a guest with `ram_size` bytes of RAM, the
/// command line at `cmdline_addr` and an optional initrd `(addr, size)`.
/// Returns the start info address (for EBX).
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    cmdline_addr: u64,
    initrd: Option<(u64, u64)>,
) -> Result<u64, vm_memory::GuestMemoryError> {
    let map = layout::e820_map(ram_size);
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: cmdline_addr,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_ADDR))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(PVH_START_INFO_ADDR))?;
    Ok(PVH_START_INFO_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_info_describes_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let addr = write_start_info(&mem, 16 << 20, 0x20000, Some((0x80_0000, 0x1000))).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.cmdline_paddr, 0x20000);
        assert_eq!(info.memmap_entries, 4);
        assert_eq!(info.nr_modules, 1);
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(info.memmap_paddr + 3 * 24))
            .unwrap();
        assert_eq!(last.addr, 3 << 30);
        assert_eq!(last.type_, layout::E820_RESERVED);
        // The tables must stay clear of each other.
        assert!(
            PVH_MODLIST_ADDR >= PVH_START_INFO_ADDR + std::mem::size_of::<hvm_start_info>() as u64
        );
        assert!(
            PVH_MEMMAP_ADDR >= PVH_MODLIST_ADDR + std::mem::size_of::<hvm_modlist_entry>() as u64
        );
    }
}
