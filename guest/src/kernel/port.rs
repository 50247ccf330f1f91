//! Port I/O from ring 3, allowed by IOPL 3 or, where the hypervisor drops
//! IOPL (PVM), by the all-ports-allowed TSS I/O bitmap (see `gdt.rs`).

use core::arch::asm;

/// No `nomem`: the VMM may read guest memory on an `out` (probe block, AP
/// stacks) or write it before an `in` returns, so memory accesses must not
/// be reordered across port I/O.
///
/// Port I/O has no memory-safety effect on this guest; the devices behind
/// the ports are the serial line, the PIT, and the VMM's paravirtual block.
pub fn outb(port: u16, value: u8) {
    // SAFETY: IOPL / the TSS I/O bitmap make `out` legal in ring 3; it
    // touches no guest memory.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) };
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nostack, preserves_flags)) };
    value
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    };
}

pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack, preserves_flags))
    };
    value
}
