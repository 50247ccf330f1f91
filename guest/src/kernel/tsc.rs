//! Time stamp counter: reading it (ring 3 may, CR4.TSD is clear) and
//! finding its frequency.
//!
//! Sources, best first: snapvm's `PORT_TSC_KHZ`, the hypervisor timing leaf
//! CPUID 0x40000010, CPUID 0x15 (crystal ratio), CPUID 0x16 (base MHz),
//! and as a last resort a rough calibration against PIT channel 2.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use super::port::{inb, outb};
use super::pv;

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the counter; CR4.TSD is clear so it is
    // allowed in ring 3.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// CPUID leaf/subleaf -> [eax, ebx, ecx, edx].
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let (eax, ebx, ecx, edx): (u32, u64, u32, u32);
    // SAFETY: cpuid has no side effects; rbx is reserved by LLVM, so it
    // is saved in a scratch register around the instruction.
    unsafe {
        asm!(
            "mov {tmp}, rbx",
            "cpuid",
            "xchg {tmp}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        )
    };
    [eax, ebx as u32, ecx, edx]
}

/// TSC frequency in kHz, 0 if unknown.
pub fn khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Finds the TSC frequency (BSP, at boot) and returns it with its source.
pub fn init() -> (u64, &'static str) {
    let (khz, source) = if let Some(khz) = pv::tsc_khz() {
        (khz, "snapvm")
    } else if let Some(khz) = from_hypervisor_leaf() {
        (khz, "cpuid-40000010")
    } else if let Some(khz) = from_leaf_15() {
        (khz, "cpuid-15")
    } else if let Some(khz) = from_leaf_16() {
        (khz, "cpuid-16")
    } else if let Some(khz) = calibrate_with_pit() {
        (khz, "pit")
    } else {
        (0, "unknown")
    };
    TSC_KHZ.store(khz, Ordering::Relaxed);
    (khz, source)
}

fn from_hypervisor_leaf() -> Option<u64> {
    // Bit 31 of CPUID.1:ECX: running under a hypervisor.
    if cpuid(1, 0)[2] & (1 << 31) == 0 || cpuid(0x4000_0000, 0)[0] < 0x4000_0010 {
        return None;
    }
    nonzero(u64::from(cpuid(0x4000_0010, 0)[0]))
}

fn from_leaf_15() -> Option<u64> {
    if cpuid(0, 0)[0] < 0x15 {
        return None;
    }
    let [denominator, numerator, crystal_hz, _] = cpuid(0x15, 0);
    if denominator == 0 || numerator == 0 || crystal_hz == 0 {
        return None;
    }
    nonzero(u64::from(crystal_hz) * u64::from(numerator) / u64::from(denominator) / 1000)
}

fn from_leaf_16() -> Option<u64> {
    if cpuid(0, 0)[0] < 0x16 {
        return None;
    }
    nonzero(u64::from(cpuid(0x16, 0)[0] & 0xffff) * 1000)
}

/// Times about 10 ms of PIT channel 2 with the TSC, reading the counter
/// back with latch commands (QEMU microvm has no port 0x61 to watch OUT2).
/// Rough: each port access is a VM exit of unknown length.
fn calibrate_with_pit() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const TARGET_PIT_TICKS: u64 = PIT_HZ / 100; // 10 ms
    const PORT_CH2: u16 = 0x42;
    const PORT_CMD: u16 = 0x43;
    const PORT_GATE: u16 = 0x61;
    const GATE2: u8 = 0x01;
    const SPEAKER: u8 = 0x02;
    // Give up after ~1 s of a 10 GHz TSC: no PIT behind the ports.
    const GIVE_UP_TICKS: u64 = 10_000_000_000;

    let read_ch2 = || {
        outb(PORT_CMD, 0b1000_0000); // latch channel 2
        let lo = inb(PORT_CH2);
        let hi = inb(PORT_CH2);
        u64::from(u16::from_le_bytes([lo, hi]))
    };

    let saved_gate = inb(PORT_GATE);
    outb(PORT_GATE, (saved_gate & !SPEAKER) | GATE2); // where the gate exists
    outb(PORT_CMD, 0b1011_0000); // channel 2, lo/hi byte, mode 0, binary
    outb(PORT_CH2, 0xff);
    outb(PORT_CH2, 0xff); // counts down from 65535: ~55 ms before wrapping
    let first = read_ch2();
    let start = rdtsc();
    let result = loop {
        let count = read_ch2();
        let now = rdtsc();
        let elapsed = first.saturating_sub(count);
        if elapsed >= TARGET_PIT_TICKS {
            break Some((now - start) * PIT_HZ / elapsed / 1000);
        }
        if now - start > GIVE_UP_TICKS {
            break None;
        }
    };
    outb(PORT_GATE, saved_gate);
    // Below 100 MHz is not a TSC we believe in.
    result.filter(|&khz| khz >= 100_000)
}

fn nonzero(khz: u64) -> Option<u64> {
    (khz != 0).then_some(khz)
}

/// Busy-waits about `us` microseconds (guessing 1 GHz if the TSC frequency
/// is unknown).
pub fn spin_us(us: u64) {
    let khz = match khz() {
        0 => 1_000_000,
        khz => khz,
    };
    let start = rdtsc();
    let ticks = us.saturating_mul(khz) / 1000;
    while rdtsc().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}
