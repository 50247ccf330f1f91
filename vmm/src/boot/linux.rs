//! The Linux 64-bit boot protocol: the zero page (`boot_params`) with the
//! setup header from the bzImage, the e820 map, command line and initrd.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, ZERO_PAGE_ADDR};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    #[error("too many e820 entries ({0})")]
    TooManyE820Entries(usize),
    #[error("cannot write the zero page: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Writes the zero page; returns its address (for RSI).
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    hdr: setup_header,
    ram_size: u64,
    cmdline_addr: u64,
    cmdline_size: u32,
    initrd: Option<(u64, u64)>,
) -> Result<u64, LinuxBootError> {
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = cmdline_addr as u32;
    params.hdr.cmdline_size = cmdline_size;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = layout::e820_map(ram_size);
    if map.len() > params.e820_table.len() {
        return Err(LinuxBootError::TooManyE820Entries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))?;
    Ok(ZERO_PAGE_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_page_has_e820_and_cmdline() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let at =
            write_boot_params(&mem, setup_header::default(), 16 << 20, 0x20000, 10, None).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(at)).unwrap();
        assert_eq!(p.e820_entries, 4);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.e820_table[2].addr }, 1 << 20);
    }
}
