//! GDT and per-CPU TSSs.
//!
//! The GDT is static data: flat kernel and user segments plus one 64-bit
//! TSS descriptor per possible CPU. Each CPU fills in its own TSS and its
//! own descriptor in `gdt_load_tss` (the TSS base has to be split into bit
//! fields, which the linker cannot do), so CPUs never write the same bytes.
//!
//! Ring-3 port I/O: the nested hypervisor here (PVM) does not let the guest
//! run ring 3 with IOPL 3 (the IOPL we `iretq` with reads back as 0), but it
//! honours the TSS I/O permission bitmap. So every TSS carries an I/O bitmap
//! that allows all ports. The bitmap is shared: the TSSs sit in one block
//! directly in front of it, and each TSS's I/O map offset (16 bits, relative
//! to its own base) reaches the same 8 KiB of zeros.

use core::arch::global_asm;

use snapvm_guest::abi::MAX_CPUS;

use super::boot::KERNEL_STACK_SIZE;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
/// Selectors without RPL; ring-3 code uses them with RPL 3.
pub const USER_DS: u16 = 0x18;
pub const USER_CS: u16 = 0x20;
/// First TSS descriptor; CPU i uses `TSS_BASE_SEL + 16 * i`.
const TSS_BASE_SEL: u16 = 0x28;
/// Stride of the TSS array (a TSS is 104 bytes).
const TSS_STRIDE: usize = 128;
/// Byte offsets inside a 64-bit TSS.
const TSS_RSP0: usize = 4;
const TSS_IST1: usize = 36;
const TSS_IOMAP: usize = 102;
/// Bytes of the I/O bitmap (one bit per port) plus the all-ones byte the
/// CPU requires after it.
const IO_BITMAP_SIZE: usize = 65536 / 8 + 1;

global_asm!(
    ".pushsection .data.gdt, \"aw\"",
    ".p2align 4",
    "gdt:",
    "    .quad 0",
    "    .quad 0x00af9a000000ffff", // 0x08: kernel code, 64-bit
    "    .quad 0x00cf92000000ffff", // 0x10: kernel data
    "    .quad 0x00cff2000000ffff", // 0x18: user data (DPL 3)
    "    .quad 0x00affa000000ffff", // 0x20: user code, 64-bit (DPL 3)
    "    .skip 16 * {max_cpus}",    // 0x28: TSS descriptors, filled at boot
    "gdt_end:",
    ".p2align 3",
    // lgdt runs in 32-bit mode, where it reads only the low 32 bits of
    // the base: fine, the GDT lives below 4 GiB.
    ".global gdt_ptr",
    "gdt_ptr:",
    "    .word gdt_end - gdt - 1",
    "    .quad gdt",
    ".popsection",

    ".pushsection .data.tss, \"aw\"",
    ".p2align 7",
    "tss_array:",
    "    .fill {tss_stride} * {max_cpus}, 1, 0",
    "io_bitmap:",
    "    .fill {io_bitmap_size} - 1, 1, 0",  // 0 = port allowed
    "    .byte 0xff",
    ".popsection",

    // gdt_load_tss(edi = cpu): point the CPU's TSS at its ring-0 stack
    // (RSP0 = the caller's stack top) and its double-fault stack (IST1),
    // write its descriptor, `ltr`. Clobbers rax, rcx, rdx, rsi.
    ".pushsection .text.boot, \"ax\"",
    ".global gdt_load_tss",
    "gdt_load_tss:",
    "    mov eax, edi",
    "    shl eax, {tss_shift}",
    "    lea rsi, [rax + tss_array]",     // rsi = &tss[cpu]
    "    lea rax, [rsp + 8]",             // stack top before this call
    "    mov [rsi + {tss_rsp0}], rax",
    "    lea eax, [edi + 1]",
    "    shl eax, {kstack_shift}",
    "    lea rax, [rax + double_fault_stacks]",
    "    mov [rsi + {tss_ist1}], rax",
    // I/O map offset = io_bitmap - &tss[cpu] = (MAX_CPUS - cpu) * stride;
    // the segment limit covers the bitmap's last byte.
    "    mov ecx, {max_cpus}",
    "    sub ecx, edi",
    "    shl ecx, {tss_shift}",
    "    mov [rsi + {tss_iomap}], cx",
    "    add ecx, {io_bitmap_size} - 1",          // ecx = limit (< 64 KiB)
    // Descriptor (base < 4 GiB): dword 0 = base[15:0] << 16 | limit[15:0],
    // dword 1 = base[31:24] << 24 | limit[19:16] (0 here) << 16
    // | 0x89 (present, 64-bit TSS) << 8 | base[23:16];
    // the high quadword (base[63:32]) stays zero.
    "    mov eax, edi",
    "    shl eax, 4",
    "    lea rdx, [rax + gdt + {tss_base_sel}]",
    "    mov eax, esi",
    "    shl eax, 16",
    "    or eax, ecx",
    "    mov [rdx], eax",
    "    mov eax, esi",
    "    shr eax, 16",
    "    and eax, 0xff",
    "    mov ecx, esi",
    "    and ecx, 0xff000000",
    "    or eax, ecx",
    "    or eax, 0x8900",
    "    mov [rdx + 4], eax",
    "    mov eax, edi",
    "    shl eax, 4",
    "    add eax, {tss_base_sel}",
    "    ltr ax",
    "    ret",
    ".popsection",

    max_cpus = const MAX_CPUS,
    tss_stride = const TSS_STRIDE,
    tss_shift = const TSS_STRIDE.trailing_zeros(),
    tss_rsp0 = const TSS_RSP0,
    tss_ist1 = const TSS_IST1,
    tss_iomap = const TSS_IOMAP,
    io_bitmap_size = const IO_BITMAP_SIZE,
    tss_base_sel = const TSS_BASE_SEL,
    kstack_shift = const KERNEL_STACK_SIZE.trailing_zeros(),
);

// A TSS is 104 bytes; every I/O map offset and limit must fit 16 bits.
const _: () = assert!(TSS_STRIDE.is_power_of_two() && TSS_STRIDE >= 104);
const _: () = assert!(TSS_STRIDE * MAX_CPUS + IO_BITMAP_SIZE <= 0xffff);
