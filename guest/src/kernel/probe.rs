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

use snapvm_guest::abi::{GapRecord, ProbeBlock, ProbeSlot, GAP_LOG_LEN, MAX_CPUS, PROBE_MAGIC};

use super::tsc::rdtsc;

struct Probe(UnsafeCell<ProbeBlock>);
// SAFETY: the header is written once by the BSP before any CPU beats;
// afterwards every slot has exactly one writer (its CPU), and all accesses
// go through volatile raw-pointer reads/writes, never references.
unsafe impl Sync for Probe {}

/// Smallest gap logged, in microseconds: above a loop iteration (a few µs
/// to tens of µs), far below the stalls worth placing in time; the reader
/// polls every millisecond, so the 64-entry ring cannot lap it.
const GAP_LOG_MIN_US: u64 = 50;

static PROBE: Probe = Probe(UnsafeCell::new(ProbeBlock::EMPTY));

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
        addr_of_mut!((*block).gap_log_min_tsc).write_volatile(GAP_LOG_MIN_US * tsc_khz / 1000);
        fence(Ordering::Release);
        addr_of_mut!((*block).magic).write_volatile(PROBE_MAGIC);
    }
    block as usize as u32
}

/// One CPU's writer for its slot.
pub struct Heartbeat {
    slot: *mut ProbeSlot,
    log: *mut [GapRecord; GAP_LOG_LEN],
    /// Gaps at least this long are logged (0: none).
    log_min: u64,
    logged: u64,
    count: u64,
    last: u64,
}

impl Heartbeat {
    /// `cpu` must be below `MAX_CPUS` and owned by the caller.
    pub fn new(cpu: usize) -> Self {
        let cpu = cpu.min(MAX_CPUS - 1);
        // SAFETY: cpu < MAX_CPUS, so the slot and the ring are inside the
        // static block; no reference is created; the header was written
        // by `init` before any CPU beats.
        let (slot, log, log_min) = unsafe {
            let block = PROBE.0.get();
            (
                addr_of_mut!((*block).slots[cpu]),
                addr_of_mut!((*block).gap_log[cpu]),
                addr_of_mut!((*block).gap_log_min_tsc).read_volatile(),
            )
        };
        let now = rdtsc();
        // SAFETY: the slot belongs to this CPU alone.
        let logged = unsafe {
            addr_of_mut!((*slot).last_tsc).write_volatile(now);
            addr_of_mut!((*slot).gap_count).read_volatile()
        };
        Self {
            slot,
            log,
            log_min,
            logged,
            count: 0,
            last: now,
        }
    }

    /// Tracks the gap that ended at `now` (largest so far, and the log).
    #[inline(always)]
    fn record_gap(&mut self, now: u64) {
        let start = self.last;
        let gap = now.wrapping_sub(start);
        self.last = now;
        // SAFETY: the slot belongs to this CPU (see `new`); volatile because
        // the VMM reads it and may reset max_gap_tsc concurrently.
        unsafe {
            let max_gap = addr_of_mut!((*self.slot).max_gap_tsc);
            if gap > max_gap.read_volatile() {
                max_gap.write_volatile(gap);
            }
            addr_of_mut!((*self.slot).last_tsc).write_volatile(now);
        }
        if self.log_min != 0 && gap >= self.log_min {
            self.log_gap(start, now);
        }
    }

    #[cold]
    fn log_gap(&mut self, start_tsc: u64, end_tsc: u64) {
        let i = (self.logged % GAP_LOG_LEN as u64) as usize;
        // SAFETY: i < GAP_LOG_LEN, inside this CPU's ring, which only this
        // CPU writes; the record is complete before the count says so.
        unsafe {
            addr_of_mut!((*self.log)[i]).write_volatile(GapRecord { start_tsc, end_tsc });
            fence(Ordering::Release);
            self.logged += 1;
            addr_of_mut!((*self.slot).gap_count).write_volatile(self.logged);
        }
    }

    /// One main-loop iteration: count it and track the largest gap.
    #[inline(always)]
    pub fn beat(&mut self) {
        self.record_gap(rdtsc());
        self.count += 1;
        // SAFETY: the slot belongs to this CPU (see `new`).
        unsafe { addr_of_mut!((*self.slot).heartbeat).write_volatile(self.count) };
    }

    /// A point inside a long iteration: tracks the largest gap like
    /// [`Heartbeat::beat`] but counts nothing, so a loop whose iteration is
    /// long (a pass over a big buffer) still measures stalls finely.
    #[inline(always)]
    pub fn tick(&mut self) {
        self.record_gap(rdtsc());
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
