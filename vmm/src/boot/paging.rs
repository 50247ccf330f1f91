//! Identity page tables for the 64-bit Linux entry: the first 1 GiB mapped
//! with 2 MiB pages, enough for the decompressor, which builds its own.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{PDPT_ADDR, PD_ADDR, PML4_ADDR};

/// Writes the tables; returns the value for CR3.
pub fn write_identity_tables(mem: &GuestMemoryMmap) -> Result<u64, vm_memory::GuestMemoryError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    mem.write_obj(PDPT_ADDR | PRESENT_RW, GuestAddress(PML4_ADDR))?;
    mem.write_obj(PD_ADDR | PRESENT_RW, GuestAddress(PDPT_ADDR))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | PRESENT_RW | HUGE, GuestAddress(PD_ADDR + i * 8))?;
    }
    Ok(PML4_ADDR)
}
