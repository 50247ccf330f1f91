//! The probe block (`abi::ProbeBlock`): per-CPU heartbeat counters and
//! stall statistics that the VMM, tests and benchmarks read straight from
//! guest memory.
//!
//! Each slot is written only by its own CPU; the VMM may reset
//! `max_gap_tsc` at any time, so it is re-read on every beat. All accesses
//! are volatile: the other side is outside the program.

use core::cell::UnsafeCell;
use core::ptr::addr_of_mut;
use core::sync::atomic::{fence, Ordering};

use snapvm_guest::abi::{ProbeBlock, ProbeSlot, MAX_CPUS, PROBE_MAGIC};

use super::tsc::rdtsc;

struct Probe(UnsafeCell<ProbeBlock>);
// SAFETY: the header is written once by the BSP before any CPU beats;
// afterwards every slot has exactly one writer (its CPU), and all accesses
// go through volatile raw-pointer reads/writes, never references.
unsafe impl Sync for Probe {}

const EMPTY_SLOT: ProbeSlot = ProbeSlot {
    heartbeat: 0,
    max_gap_tsc: 0,
    last_tsc: 0,
    _reserved: [0; 5],
};

static PROBE: Probe = Probe(UnsafeCell::new(ProbeBlock {
    magic: 0,
    cpus: 0,
    tsc_khz: 0,
    _reserved: [0; 5],
    slots: [EMPTY_SLOT; MAX_CPUS],
}));

/// Fills in the header (magic last, so a reader never sees a half-written
/// block) and returns the block's physical address (< 4 GiB: it is in the
/// kernel image).
pub fn init(cpus: u32, tsc_khz: u64) -> u32 {
    let block = PROBE.0.get();
    // SAFETY: `block` points at the static; the BSP is the only CPU
    // running; raw-pointer writes create no references.
    unsafe {
        addr_of_mut!((*block).cpus).write_volatile(u64::from(cpus));
        addr_of_mut!((*block).tsc_khz).write_volatile(tsc_khz);
        fence(Ordering::Release);
        addr_of_mut!((*block).magic).write_volatile(PROBE_MAGIC);
    }
    block as usize as u32
}

/// One CPU's writer for its slot.
pub struct Heartbeat {
    slot: *mut ProbeSlot,
    count: u64,
    last: u64,
}

impl Heartbeat {
    /// `cpu` must be below `MAX_CPUS` and owned by the caller.
    pub fn new(cpu: usize) -> Self {
        let cpu = cpu.min(MAX_CPUS - 1);
        // SAFETY: cpu < MAX_CPUS, so the slot is inside the static block;
        // no reference is created.
        let slot = unsafe { addr_of_mut!((*PROBE.0.get()).slots[cpu]) };
        let now = rdtsc();
        // SAFETY: the slot belongs to this CPU alone.
        unsafe { addr_of_mut!((*slot).last_tsc).write_volatile(now) };
        Self {
            slot,
            count: 0,
            last: now,
        }
    }

    /// One main-loop iteration: count it and track the largest gap.
    #[inline(always)]
    pub fn beat(&mut self) {
        let now = rdtsc();
        let gap = now.wrapping_sub(self.last);
        self.last = now;
        self.count += 1;
        // SAFETY: the slot belongs to this CPU (see `new`); volatile because
        // the VMM reads it and may reset max_gap_tsc concurrently.
        unsafe {
            let max_gap = addr_of_mut!((*self.slot).max_gap_tsc);
            if gap > max_gap.read_volatile() {
                max_gap.write_volatile(gap);
            }
            addr_of_mut!((*self.slot).last_tsc).write_volatile(now);
            addr_of_mut!((*self.slot).heartbeat).write_volatile(self.count);
        }
    }

    /// A point inside a long iteration: tracks the largest gap like
    /// [`Heartbeat::beat`] but counts nothing, so a loop whose iteration is
    /// long (a pass over a big buffer) still measures stalls finely.
    #[inline(always)]
    pub fn tick(&mut self) {
        let now = rdtsc();
        let gap = now.wrapping_sub(self.last);
        self.last = now;
        // SAFETY: as in `beat`.
        unsafe {
            let max_gap = addr_of_mut!((*self.slot).max_gap_tsc);
            if gap > max_gap.read_volatile() {
                max_gap.write_volatile(gap);
            }
            addr_of_mut!((*self.slot).last_tsc).write_volatile(now);
        }
    }

    /// Restarts the gap timer without counting a beat: for a pause the
    /// caller causes on purpose (e.g. printing), which is not a stall.
    pub fn skip_gap(&mut self) {
        let now = rdtsc();
        self.last = now;
        // SAFETY: as in `beat`.
        unsafe { addr_of_mut!((*self.slot).last_tsc).write_volatile(now) };
    }
}
