//! IDT and the ring-0 exception stubs.
//!
//! Vectors 0-31 each get a tiny stub that pushes an error code (0 when the
//! CPU pushed none) and the vector, then jumps to `isr_common`, which pushes
//! the general registers so the stack holds an `abi::ExceptionFrame` and
//! reports it to the VMM with `out PORT_EXCEPTION` (snapvm dumps the frame
//! and powers off). Under another hypervisor that `out` is dropped, so the
//! stub then prints one short line on COM1 itself, exits through QEMU's
//! isa-debug-exit and halts. No Rust runs here: this is ring 0.
//!
//! There are no interrupt vectors: the guest runs with IF = 0 and polls.

use core::arch::global_asm;

use snapvm_guest::abi::{EXIT_STATUS_EXCEPTION, PORT_COM1, PORT_EXCEPTION, PORT_QEMU_DEBUG_EXIT};

use super::gdt::KERNEL_CS;

/// Vectors for which the CPU pushes an error code.
/// (8 #DF, 10 #TS, 11 #NP, 12 #SS, 13 #GP, 14 #PF, 17 #AC, 21 #CP, 29 #VC, 30 #SX)
const IDT_ENTRIES: usize = 32;
/// IDT index of the double fault, which runs on IST1 so a broken stack
/// still produces a report instead of a triple fault.
const VECTOR_DOUBLE_FAULT: usize = 8;

global_asm!(
    ".pushsection .text.boot, \"ax\"",
    ".macro ISR_NOERR v",
    "isr_\\v:",
    "    push 0",
    "    push \\v",
    "    jmp isr_common",
    ".endm",
    ".macro ISR_ERR v",
    "isr_\\v:",
    "    push \\v",
    "    jmp isr_common",
    ".endm",
    ".irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31",
    "    ISR_NOERR \\v",
    ".endr",
    ".irp v, 8,10,11,12,13,14,17,21,29,30",
    "    ISR_ERR \\v",
    ".endr",

    "isr_common:",
    // Lowest address last: r15 ends up at rsp, as ExceptionFrame says.
    "    push rax",
    "    push rbx",
    "    push rcx",
    "    push rdx",
    "    push rsi",
    "    push rdi",
    "    push rbp",
    "    push r8",
    "    push r9",
    "    push r10",
    "    push r11",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    mov rbx, rsp",
    "    mov eax, ebx",
    "    mov dx, {port_exception}",
    "    out dx, eax",
    // Still here: nobody handled the port. Print
    // "EXCEPTION vector=VV err=EEEEEEEE rip=RRRRRRRRRRRRRRRR cr2=..." on COM1.
    "    lea rsi, [rip + exc_msg_vector]",
    "    call exc_puts",
    "    mov rax, [rbx + 15 * 8]",      // vector
    "    mov ecx, 2",
    "    call exc_hex",
    "    lea rsi, [rip + exc_msg_err]",
    "    call exc_puts",
    "    mov rax, [rbx + 16 * 8]",      // error code
    "    mov ecx, 8",
    "    call exc_hex",
    "    lea rsi, [rip + exc_msg_rip]",
    "    call exc_puts",
    "    mov rax, [rbx + 17 * 8]",      // rip
    "    mov ecx, 16",
    "    call exc_hex",
    "    lea rsi, [rip + exc_msg_fl]",
    "    call exc_puts",
    "    mov rax, [rbx + 19 * 8]",      // rflags
    "    mov ecx, 8",
    "    call exc_hex",
    "    lea rsi, [rip + exc_msg_cr2]",
    "    call exc_puts",
    "    mov rax, cr2",
    "    mov ecx, 16",
    "    call exc_hex",
    "    mov al, 10",
    "    call exc_putc",
    "    mov al, {exit_status}",
    "    mov dx, {port_debug_exit}",
    "    out dx, al",
    "2:",
    "    cli",
    "    hlt",
    "    jmp 2b",

    // exc_putc(al): wait for THR empty (LSR bit 5), send. Clobbers edx, r8d.
    "exc_putc:",
    "    mov r8d, eax",
    "    mov dx, {com1} + 5",
    "3:",
    "    in al, dx",
    "    test al, 0x20",
    "    jz 3b",
    "    mov dx, {com1}",
    "    mov eax, r8d",
    "    out dx, al",
    "    ret",

    // exc_puts(rsi = NUL-terminated string). Clobbers rax, rdx, rsi, r8.
    "exc_puts:",
    "    mov al, [rsi]",
    "    test al, al",
    "    jz 4f",
    "    call exc_putc",
    "    inc rsi",
    "    jmp exc_puts",
    "4:",
    "    ret",

    // exc_hex(rax = value, ecx = digits): most significant digit first.
    // Clobbers rax, rcx, rdx, r8, r9, r10.
    "exc_hex:",
    "    mov r10, rax",
    "    mov r9d, ecx",
    "5:",
    "    dec r9d",
    "    lea ecx, [4 * r9]",
    "    mov rax, r10",
    "    shr rax, cl",
    "    and eax, 0xf",
    "    cmp al, 10",
    "    jb 6f",
    "    add al, 39",                   // 'a' - '0' - 10
    "6:",
    "    add al, 48",                   // '0'
    "    call exc_putc",
    "    test r9d, r9d",
    "    jnz 5b",
    "    ret",

    // idt_fill: build the 32 gates from isr_table (BSP, once). Each gate:
    // dword 0 = KERNEL_CS << 16 | offset[15:0],
    // dword 1 = offset[31:16] << 16 | 0x8e00 (present, DPL 0, interrupt gate),
    // dwords 2-3 = offset[63:32] = 0 (the image is below 4 GiB).
    // Clobbers rax, rcx, rdx, rsi, rdi.
    ".global idt_fill",
    "idt_fill:",
    "    lea rsi, [rip + isr_table]",
    "    lea rdi, [rip + idt]",
    "    mov ecx, {idt_entries}",
    "7:",
    "    mov eax, [rsi]",
    "    mov edx, eax",
    "    and eax, 0xffff",
    "    or eax, {kernel_cs} << 16",
    "    mov [rdi], eax",
    "    and edx, 0xffff0000",
    "    or edx, 0x8e00",
    "    mov [rdi + 4], edx",
    "    add rsi, 8",
    "    add rdi, 16",
    "    dec ecx",
    "    jnz 7b",
    "    mov byte ptr [rip + idt + {df} * 16 + 4], 1", // IST1
    "    ret",
    ".popsection",

    ".pushsection .rodata.idt, \"a\"",
    ".p2align 3",
    "isr_table:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .quad isr_\\v",
    ".endr",
    "exc_msg_vector: .asciz \"EXCEPTION vector=\"",
    "exc_msg_err: .asciz \" err=\"",
    "exc_msg_rip: .asciz \" rip=\"",
    "exc_msg_cr2: .asciz \" cr2=\"",
    "exc_msg_fl: .asciz \" rflags=\"",
    ".p2align 3",
    ".global idt_ptr",
    "idt_ptr:",
    "    .word {idt_entries} * 16 - 1",
    "    .quad idt",
    ".popsection",

    ".pushsection .bss.idt, \"aw\", @nobits",
    ".p2align 4",
    "idt:",
    "    .skip {idt_entries} * 16",
    ".popsection",

    port_exception = const PORT_EXCEPTION,
    port_debug_exit = const PORT_QEMU_DEBUG_EXIT,
    exit_status = const EXIT_STATUS_EXCEPTION,
    com1 = const PORT_COM1,
    idt_entries = const IDT_ENTRIES,
    kernel_cs = const KERNEL_CS,
    df = const VECTOR_DOUBLE_FAULT,
);
