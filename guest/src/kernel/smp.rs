//! Application processors (snapvm only).
//!
//! The BSP gives every AP a ring-3 stack (from the heap) through
//! [`AP_STACK_TOPS`], which the ring-0 AP entry in `boot.rs` reads, and then
//! asks snapvm to start them at `ap_entry32`. APs share the GDT (each has
//! its own TSS descriptor), IDT and page tables. Each AP checks in once it
//! runs Rust code.

use alloc::alloc::{alloc, Layout};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use snapvm_guest::abi::MAX_CPUS;

use super::{boot, pv, tsc};

/// Ring-3 stack size of each AP.
const AP_STACK_SIZE: usize = 256 * 1024;

/// Top of each AP's ring-3 stack (index = CPU), read by the boot stub.
pub static AP_STACK_TOPS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// APs that reached Rust.
static CHECKED_IN: AtomicU32 = AtomicU32::new(0);

/// Starts CPUs 1..cpus and returns how many APs were started: all of
/// them, or none if their stacks could not be allocated (snapvm starts
/// every AP at once, so a partial start is not possible).
pub fn start_aps(cpus: u32) -> u32 {
    let cpus = (cpus as usize).min(MAX_CPUS);
    if cpus <= 1 || !pv::under_snapvm() {
        return 0;
    }
    let layout = match Layout::from_size_align(AP_STACK_SIZE, 4096) {
        Ok(layout) => layout,
        Err(_) => return 0,
    };
    for top in &AP_STACK_TOPS[1..cpus] {
        // SAFETY: the layout has a non-zero size.
        let stack = unsafe { alloc(layout) };
        if stack.is_null() {
            println!("smp: no memory for AP stacks, not starting APs");
            return 0;
        }
        // Leaked on purpose: the AP uses it forever.
        top.store(stack as u64 + AP_STACK_SIZE as u64, Ordering::Release);
    }
    pv::start_aps(boot::ap_entry_address());
    cpus as u32 - 1
}

/// Called by each AP when it enters Rust.
pub fn check_in() {
    CHECKED_IN.fetch_add(1, Ordering::AcqRel);
}

/// Waits up to `timeout_ms` for `expected` APs to check in; returns how
/// many did.
pub fn wait_for_aps(expected: u32, timeout_ms: u64) -> u32 {
    let khz = match tsc::khz() {
        0 => 1_000_000,
        khz => khz,
    };
    let deadline = tsc::rdtsc().saturating_add(timeout_ms.saturating_mul(khz));
    loop {
        let arrived = CHECKED_IN.load(Ordering::Acquire);
        if arrived >= expected || tsc::rdtsc() >= deadline {
            return arrived;
        }
        pv::wait_us(1000);
    }
}
