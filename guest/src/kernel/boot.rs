//! Ring-0 entry: the PVH boot path and the AP entry, in assembly.
//!
//! Ring 0 is emulated instruction by instruction on this host (about 2.7 µs
//! each) and the emulator cannot run SSE, so no Rust code may execute here.
//! This stub only does what needs CPL 0: load the GDT, page tables, TSS and
//! IDT, switch to long mode, enable SSE/AVX for ring 3, then `iretq` to ring 3
//! with interrupts off (ring-3 port I/O goes through the TSS I/O bitmap,
//! see `gdt.rs`). There are no loops on the way (the page
//! tables are built at link time, see `paging.rs`), except for the one-time
//! IDT fill on the BSP.
//!
//! Register contract of both 32-bit entries (PVH and snapvm's AP start):
//! flat 32-bit protected mode, paging off, EBX = physical address of
//! `hvm_start_info` (0 for APs), ESI = CPU index (set to 0 here for the BSP).

use core::arch::global_asm;

use super::gdt::{KERNEL_CS, KERNEL_DS, USER_CS, USER_DS};
use super::{entry, smp};

/// Bytes of ring-0 stack per CPU: the exception stubs push one
/// `ExceptionFrame` and make a few calls, nothing more.
pub const KERNEL_STACK_SIZE: usize = 4096;
/// Bytes of ring-3 stack for the BSP (APs get theirs from the heap).
pub const BSP_STACK_SIZE: usize = 256 * 1024;

/// RFLAGS for ring 3: IOPL = 3 (port I/O; PVM drops it, so the TSS I/O
/// bitmap in gdt.rs allows the ports too), IF = 0 (we poll),
/// bit 1 is reserved and always 1.
const USER_RFLAGS: u64 = 0x3002;

/// CR0: PE, MP, NE, PG set; EM, TS, NW, CD cleared (SSE/x87 usable, caches on).
const CR0_SET: u32 = (1 << 0) | (1 << 1) | (1 << 5) | (1 << 31);
const CR0_CLEAR: u32 = (1 << 2) | (1 << 3) | (1 << 29) | (1 << 30);
/// CR4: PAE, OSFXSR, OSXMMEXCPT. TSD stays clear so ring 3 can `rdtsc`.
const CR4_SET: u32 = (1 << 5) | (1 << 9) | (1 << 10);
const CR4_OSXSAVE: u32 = 1 << 18;
const MSR_EFER: u32 = 0xc000_0080;
const EFER_LME: u32 = 1 << 8;
/// XEN_ELFNOTE_PHYS32_ENTRY: the note type PVH loaders look for.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

global_asm!(
    // The PVH note: tells the loader the 32-bit entry point.
    ".pushsection .note.Xen, \"a\", @note",
    ".p2align 2",
    ".long 4",              // namesz: "Xen\0"
    ".long 4",              // descsz: one 32-bit address
    ".long {note_type}",
    ".asciz \"Xen\"",
    ".p2align 2",
    ".long pvh_entry32",
    ".popsection",

    ".pushsection .text.boot, \"ax\"",
    ".code32",
    ".global pvh_entry32",
    "pvh_entry32:",
    "    cli",
    "    cld",
    "    xor esi, esi",           // the BSP is CPU 0; EBX = start_info
    "    jmp 2f",

    // snapvm starts every AP here (PORT_START_APS), EBX = 0, ESI = index.
    ".global ap_entry32",
    "ap_entry32:",
    "    cli",
    "    cld",
    "    xor ebx, ebx",

    "2:",
    // An index we have no per-CPU structures for: stop here rather than
    // overrun the stack and TSS arrays.
    "    cmp esi, {max_cpus}",
    "    jae 9f",
    "    lgdt [gdt_ptr]",
    "    mov eax, {kernel_ds}",
    "    mov ds, eax",
    "    mov es, eax",
    "    mov ss, eax",
    "    mov fs, eax",
    "    mov gs, eax",
    "    mov eax, cr4",
    "    or eax, {cr4_set}",
    "    mov cr4, eax",
    "    mov eax, offset boot_pml4",
    "    mov cr3, eax",
    "    mov ecx, {msr_efer}",
    "    rdmsr",
    "    or eax, {efer_lme}",
    "    wrmsr",
    "    mov eax, cr0",
    "    and eax, {cr0_clear_inv}",
    "    or eax, {cr0_set}",
    "    mov cr0, eax",
    // Far jump into the 64-bit code segment: `ljmp KERNEL_CS:entry64`,
    // spelled as bytes because assemblers disagree on its Intel syntax.
    "    .byte 0xea",
    "    .long 3f",
    "    .word {kernel_cs}",

    ".code64",
    "3:",
    "    mov r12d, esi",          // r12 = CPU index (callee-saved below)
    "    mov r13d, ebx",          // r13 = start_info address
    // This CPU's ring-0 stack; it also becomes TSS.RSP0.
    "    lea eax, [esi + 1]",
    "    shl eax, {kstack_shift}",
    "    lea rsp, [rax + kernel_stacks]",

    // XSAVE/AVX: needed so ring-3 code compiled for AVX would not fault;
    // only when CPUID offers them (QEMU's default CPU model does not).
    "    mov eax, 1",
    "    cpuid",
    "    bt ecx, 26",             // XSAVE
    "    jnc 4f",
    "    mov r8d, ecx",
    "    mov rax, cr4",
    "    or eax, {cr4_osxsave}",
    "    mov cr4, rax",
    "    mov eax, 3",             // XCR0: x87 | SSE
    "    bt r8d, 28",             // AVX
    "    jnc 5f",
    "    or eax, 4",              // | AVX
    "5:",
    "    xor ecx, ecx",
    "    xor edx, edx",
    "    xsetbv",
    "4:",
    "    mov edi, r12d",
    "    call gdt_load_tss",      // TSS (RSP0, IST1) + ltr for CPU edi
    "    test r12d, r12d",
    "    jnz 6f",
    "    call idt_fill",          // shared IDT: built once, by the BSP
    "6:",
    "    lidt [idt_ptr]",

    // Ring-3 stack and Rust entry: static for the BSP, from the table the
    // BSP filled for the APs before starting them.
    "    test r12d, r12d",
    "    jnz 7f",
    "    mov rax, offset bsp_stack_top",
    "    mov rcx, offset {bsp_entry}",
    "    jmp 8f",
    "7:",
    "    mov rax, [{ap_stacks} + r12 * 8]",
    "    test rax, rax",            // started without a stack: stop
    "    jz 9f",
    "    mov rcx, offset {ap_entry}",
    "8:",
    // Leave a fake return-address slot so the Rust function sees the
    // stack alignment of a normal call (rsp + 8 is 16-byte aligned).
    "    sub rax, 8",
    "    push {user_ds}",         // SS
    "    push rax",               // RSP
    "    push {user_rflags}",     // RFLAGS
    "    push {user_cs}",         // CS
    "    push rcx",               // RIP
    "    mov edi, r12d",          // arg 0: CPU index
    "    mov esi, r13d",          // arg 1: start_info address
    "    iretq",
    // Dead end for both modes: cli/hlt/jmp rel8 encode the same in 32-
    // and 64-bit code.
    "9:",
    "    cli",
    "    hlt",
    "    jmp 9b",
    ".popsection",

    // Static stacks. They are inside [__kernel_start, __kernel_end), so the
    // heap never overlaps them.
    ".pushsection .bss.boot_stacks, \"aw\", @nobits",
    ".p2align 12",
    ".global kernel_stacks",
    "kernel_stacks:",
    "    .skip {kstack_size} * {max_cpus}",
    ".global double_fault_stacks",
    "double_fault_stacks:",
    "    .skip {kstack_size} * {max_cpus}",
    "bsp_stack:",
    "    .skip {bsp_stack_size}",
    "bsp_stack_top:",
    ".popsection",

    note_type = const XEN_ELFNOTE_PHYS32_ENTRY,
    kernel_ds = const KERNEL_DS,
    kernel_cs = const KERNEL_CS,
    user_ds = const USER_DS | 3,
    user_cs = const USER_CS | 3,
    user_rflags = const USER_RFLAGS,
    cr4_set = const CR4_SET,
    cr4_osxsave = const CR4_OSXSAVE,
    cr0_set = const CR0_SET,
    cr0_clear_inv = const !CR0_CLEAR,
    msr_efer = const MSR_EFER,
    efer_lme = const EFER_LME,
    kstack_shift = const KERNEL_STACK_SIZE.trailing_zeros(),
    kstack_size = const KERNEL_STACK_SIZE,
    bsp_stack_size = const BSP_STACK_SIZE,
    max_cpus = const snapvm_guest::abi::MAX_CPUS,
    bsp_entry = sym entry::bsp_entry,
    ap_entry = sym entry::ap_entry,
    ap_stacks = sym smp::AP_STACK_TOPS,
);

/// Start of the 32-bit AP entry, for `PORT_START_APS`.
pub fn ap_entry_address() -> u32 {
    extern "C" {
        fn ap_entry32();
    }
    // The image is linked at 1 MiB, so every code address fits in 32 bits.
    ap_entry32 as *const () as usize as u32
}

const _: () = assert!(KERNEL_STACK_SIZE.is_power_of_two());
