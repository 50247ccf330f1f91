//! snapvm's paravirtual port block (see `abi.rs`), with fallbacks for other
//! hypervisors (QEMU microvm), where those ports read as all ones.

use core::sync::atomic::{AtomicBool, Ordering};

use snapvm_guest::abi::{
    PORT_CPU_COUNT, PORT_POWEROFF, PORT_PROBE_ADDR, PORT_QEMU_DEBUG_EXIT, PORT_SIGNATURE,
    PORT_START_APS, PORT_TSC_KHZ, PORT_WAIT, SIGNATURE,
};

use super::port::{inl, outb, outl};
use super::tsc;

static UNDER_SNAPVM: AtomicBool = AtomicBool::new(false);

/// Reads the signature port once, at boot (BSP).
pub fn detect() -> bool {
    let found = inl(PORT_SIGNATURE) == SIGNATURE;
    UNDER_SNAPVM.store(found, Ordering::Relaxed);
    found
}

pub fn under_snapvm() -> bool {
    UNDER_SNAPVM.load(Ordering::Relaxed)
}

/// "snapvm", else what CPUID's hypervisor leaf says ("kvm" under QEMU/KVM),
/// "other" for an unknown hypervisor, "none" on bare metal.
pub fn hypervisor_name() -> &'static str {
    if under_snapvm() {
        return "snapvm";
    }
    if tsc::cpuid(1, 0)[2] & (1 << 31) == 0 {
        return "none";
    }
    let [_, ebx, ecx, edx] = tsc::cpuid(0x4000_0000, 0);
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&ecx.to_le_bytes());
    vendor[8..12].copy_from_slice(&edx.to_le_bytes());
    match &vendor {
        b"KVMKVMKVM\0\0\0" => "kvm",
        b"TCGTCGTCGTCG" => "tcg",
        _ => "other",
    }
}

/// Powers the VM off: snapvm's port, then QEMU's isa-debug-exit (which
/// exits with `status << 1 | 1`). If neither worked, idle forever.
pub fn poweroff(status: u8) -> ! {
    outl(PORT_POWEROFF, u32::from(status));
    outb(PORT_QEMU_DEBUG_EXIT, status);
    loop {
        wait_us(10_000);
    }
}

/// Idles for about `us` microseconds (0 = the VMM's default), returning
/// early when snapvm has something for the guest. Elsewhere, spins.
pub fn wait_us(us: u32) {
    if under_snapvm() {
        outl(PORT_WAIT, us);
    } else {
        tsc::spin_us(if us == 0 { 10_000 } else { u64::from(us) });
    }
}

/// vCPUs the VM was started with (1 when not under snapvm).
pub fn cpu_count() -> u32 {
    if under_snapvm() {
        inl(PORT_CPU_COUNT).max(1)
    } else {
        1
    }
}

/// snapvm's TSC frequency in kHz, if it knows it.
pub fn tsc_khz() -> Option<u64> {
    if !under_snapvm() {
        return None;
    }
    match inl(PORT_TSC_KHZ) {
        0 | u32::MAX => None,
        khz => Some(u64::from(khz)),
    }
}

pub fn register_probe(paddr: u32) {
    if under_snapvm() {
        outl(PORT_PROBE_ADDR, paddr);
    }
}

pub fn start_aps(entry: u32) {
    if under_snapvm() {
        outl(PORT_START_APS, entry);
    }
}
