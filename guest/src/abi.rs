//! The contract between the snapvm guest kernel and the snapvm VMM.
//!
//! Everything the guest and the monitor must agree on lives here, so both
//! sides compile against the same numbers (the VMM depends on this crate as a
//! plain host library). The guest reaches these ports from ring 3 with
//! `in`/`out` on 32-bit operands (IOPL is 3); each access is one exit to the
//! VMM, so none of them may sit on a per-request path.
//!
//! Under another hypervisor (QEMU microvm) the ports are unassigned: reads
//! return all ones and writes are dropped. The guest detects snapvm by reading
//! [`PORT_SIGNATURE`] and falls back to plain behaviour otherwise.

/// Base of the paravirtual port block.
pub const PV_PORT_BASE: u16 = 0x0e00;

/// `in` (32-bit): reads [`SIGNATURE`] under snapvm.
pub const PORT_SIGNATURE: u16 = PV_PORT_BASE;
/// `out` (32-bit): power the VM off; the value is snapvm's exit status (0..=255).
pub const PORT_POWEROFF: u16 = PV_PORT_BASE + 0x04;
/// `out` (32-bit): idle wait. The value is a timeout in microseconds
/// (0 = the VMM's default of 10 ms). The vCPU resumes after the timeout or as
/// soon as the VMM has something for the guest, whichever comes first. This
/// is how an idle guest avoids burning a host core without interrupts.
pub const PORT_WAIT: u16 = PV_PORT_BASE + 0x08;
/// `out` (32-bit): written by the ring-0 exception stubs after they pushed an
/// [`ExceptionFrame`]; `rsp` at the time of the `out` points at the frame.
/// The VMM prints a register dump and powers the VM off with
/// [`EXIT_STATUS_EXCEPTION`].
pub const PORT_EXCEPTION: u16 = PV_PORT_BASE + 0x0c;
/// `in` (32-bit): number of vCPUs the VM was started with.
pub const PORT_CPU_COUNT: u16 = PV_PORT_BASE + 0x10;
/// `out` (32-bit): start the application processors. The value is the
/// guest-physical address (< 4 GiB) of a 32-bit entry point. Every AP starts
/// there in the same state as the PVH entry (32-bit protected mode, flat
/// segments, paging off) with `EBX = 0` and `ESI` = its vCPU index (1..n).
/// Only the first write has an effect.
pub const PORT_START_APS: u16 = PV_PORT_BASE + 0x14;
/// `in` (32-bit): TSC frequency in kHz as KVM reports it (0 if unknown).
pub const PORT_TSC_KHZ: u16 = PV_PORT_BASE + 0x18;
/// `out` (32-bit): guest-physical address (< 4 GiB) of the guest's
/// [`ProbeBlock`], so the VMM (and tests, and benchmarks) can read the
/// guest's heartbeat counters and stall statistics without any transport.
pub const PORT_PROBE_ADDR: u16 = PV_PORT_BASE + 0x1c;

/// Value read from [`PORT_SIGNATURE`] under snapvm: "SPVM" little endian.
pub const SIGNATURE: u32 = u32::from_le_bytes(*b"SPVM");

/// QEMU's `isa-debug-exit` port. On poweroff the guest also writes its status
/// here, so under `qemu-system-x86_64 ... -device isa-debug-exit,iobase=0xf4`
/// QEMU exits with `(status << 1) | 1`.
pub const PORT_QEMU_DEBUG_EXIT: u16 = 0xf4;

/// COM1, a 16550 UART.
pub const PORT_COM1: u16 = 0x3f8;

/// Exit status snapvm uses when the guest took an unhandled exception.
pub const EXIT_STATUS_EXCEPTION: u8 = 3;
/// Exit status the guest powers off with when its Rust code panicked.
pub const EXIT_STATUS_PANIC: u8 = 4;

/// Most vCPUs the guest kernel supports (per-CPU stacks, TSS, probe slots).
pub const MAX_CPUS: usize = 32;

/// What the ring-0 exception stubs push, lowest address first. The CPU pushed
/// `rip..ss`; the stub pushed `error_code` (0 for vectors without one),
/// `vector`, then the general registers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Magic at the start of a [`ProbeBlock`]: "SPVMPROB".
pub const PROBE_MAGIC: u64 = u64::from_le_bytes(*b"SPVMPROB");

/// Per-vCPU slot of the probe block, one cache line each so vCPUs never
/// share a line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeSlot {
    /// Incremented by the vCPU's main loop on every iteration.
    pub heartbeat: u64,
    /// Largest gap between consecutive main-loop iterations, in TSC ticks,
    /// since the last reset.
    pub max_gap_tsc: u64,
    /// TSC value of the last iteration.
    pub last_tsc: u64,
    /// Gaps logged so far: gap `n` is `ProbeBlock::gap_log[cpu][n %
    /// GAP_LOG_LEN]`, written before this count moves past it.
    pub gap_count: u64,
    pub _reserved: [u64; 4],
}

impl ProbeSlot {
    pub const EMPTY: ProbeSlot = ProbeSlot {
        heartbeat: 0,
        max_gap_tsc: 0,
        last_tsc: 0,
        gap_count: 0,
        _reserved: [0; 4],
    };
}

/// Gaps each vCPU keeps in its ring of [`ProbeBlock::gap_log`].
pub const GAP_LOG_LEN: usize = 64;

/// One logged main-loop gap: the iterations that ended and resumed it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GapRecord {
    pub start_tsc: u64,
    pub end_tsc: u64,
}

/// Shared memory block the guest registers through [`PORT_PROBE_ADDR`].
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct ProbeBlock {
    pub magic: u64,
    /// Number of valid slots (vCPUs that run a main loop).
    pub cpus: u64,
    /// TSC frequency in kHz the guest uses to convert ticks.
    pub tsc_khz: u64,
    /// Gaps at least this long (TSC ticks) go into `gap_log`, so a reader
    /// can tell *when* a stall happened, e.g. whether it spans a snapshot's
    /// pause (0: nothing is logged).
    pub gap_log_min_tsc: u64,
    pub _reserved: [u64; 4],
    pub slots: [ProbeSlot; MAX_CPUS],
    pub gap_log: [[GapRecord; GAP_LOG_LEN]; MAX_CPUS],
}

impl ProbeBlock {
    /// All zero: not registered yet (no magic).
    pub const EMPTY: ProbeBlock = ProbeBlock {
        magic: 0,
        cpus: 0,
        tsc_khz: 0,
        gap_log_min_tsc: 0,
        _reserved: [0; 4],
        slots: [ProbeSlot::EMPTY; MAX_CPUS],
        gap_log: [[GapRecord {
            start_tsc: 0,
            end_tsc: 0,
        }; GAP_LOG_LEN]; MAX_CPUS],
    };
}
