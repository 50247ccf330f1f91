//! Mode `scribble`: every vCPU writes across the whole heap buffer at full
//! speed, forever, so a snapshot taken meanwhile meets writes to every
//! chunk (the fault path) while its workers copy. Each CPU owns every
//! `cpus`-th 4 KiB page of each 32 MiB block and writes one 8-byte word per page per pass (the
//! word's position moves each pass), then beats its heartbeat: heartbeat
//! N means N passes over its pages.
//!
//! `scribble_pct=P` (default 75) sizes the buffer as P % of the heap. The
//! first pass touches every page, so once every CPU's heartbeat is >= 1 the
//! buffer is populated. Inside a pass the CPU also ticks its probe slot
//! every [`TICK_PAGES`] pages, so `max_gap_tsc` measures stalls (e.g. a
//! snapshot's pause or a write fault) at a few-microsecond resolution
//! rather than per pass.

use alloc::alloc::{alloc, Layout};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use super::cmdline::Cmdline;
use super::probe::Heartbeat;
use super::{pv, smp};

const PAGE: u64 = 4096;
const WORDS_PER_PAGE: u64 = PAGE / 8;
/// Pages written between two probe ticks.
const TICK_PAGES: u64 = 64;
const AP_TIMEOUT_MS: u64 = 5_000;
const EXIT_STATUS_USAGE: u8 = 2;

/// The buffer is allocated in blocks of this size: guest RAM above 3 GiB
/// is split by the MMIO hole, so one allocation could not hold it all.
const BLOCK_BYTES: u64 = 32 << 20;
const PAGES_PER_BLOCK: u64 = BLOCK_BYTES / PAGE;
/// Most blocks (128 GiB).
const MAX_BLOCKS: usize = 4096;

static ACTIVE: AtomicBool = AtomicBool::new(false);
static BLOCKS: [AtomicU64; MAX_BLOCKS] = [const { AtomicU64::new(0) }; MAX_BLOCKS];
static NBLOCKS: AtomicU64 = AtomicU64::new(0);
static PAGES: AtomicU64 = AtomicU64::new(0);
static CPUS: AtomicU32 = AtomicU32::new(1);

/// Whether APs should scribble (set before they start).
pub fn active() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

pub fn run_bsp(cmdline: &Cmdline, cpus: u32, heap_bytes: u64) -> ! {
    let pct = match cmdline.get_u64("scribble_pct", 75) {
        Ok(p) if (1..=95).contains(&p) => p,
        _ => {
            println!("scribble: scribble_pct must be 1..=95");
            pv::poweroff(EXIT_STATUS_USAGE)
        }
    };
    let pages = (heap_bytes / 100 * pct / PAGE).max(1);
    let nblocks = pages.div_ceil(PAGES_PER_BLOCK);
    if nblocks > MAX_BLOCKS as u64 {
        println!("scribble: buffer too large");
        pv::poweroff(EXIT_STATUS_USAGE)
    }
    for (i, slot) in BLOCKS.iter().enumerate().take(nblocks as usize) {
        let block_pages = (pages - i as u64 * PAGES_PER_BLOCK).min(PAGES_PER_BLOCK);
        let Ok(layout) = Layout::from_size_align((block_pages * PAGE) as usize, PAGE as usize)
        else {
            println!("scribble: bad buffer size");
            pv::poweroff(EXIT_STATUS_USAGE)
        };
        // SAFETY: the layout has a non-zero size. Leaked on purpose: the
        // CPUs write it forever.
        let base = unsafe { alloc(layout) };
        if base.is_null() {
            println!(
                "scribble: cannot allocate {} MiB (block {i} of {nblocks})",
                (pages * PAGE) >> 20
            );
            pv::poweroff(1)
        }
        slot.store(base as u64, Ordering::Relaxed);
    }
    NBLOCKS.store(nblocks, Ordering::Relaxed);
    PAGES.store(pages, Ordering::Relaxed);
    CPUS.store(cpus.max(1), Ordering::Relaxed);
    ACTIVE.store(true, Ordering::Release);
    let aps = match smp::start_aps(cpus) {
        0 => 0,
        started => smp::wait_for_aps(started, AP_TIMEOUT_MS),
    };
    CPUS.store(aps + 1, Ordering::Release);
    println!(
        "scribble mode: {} cpus writing {} MiB",
        aps + 1,
        (pages * PAGE) >> 20
    );
    scribble_loop(0)
}

pub fn run_ap(cpu: usize) -> ! {
    scribble_loop(cpu)
}

fn scribble_loop(cpu: usize) -> ! {
    let mut heartbeat = Heartbeat::new(cpu);
    let pages = PAGES.load(Ordering::Acquire);
    let nblocks = NBLOCKS.load(Ordering::Acquire) as usize;
    let mut pass: u64 = 0;
    loop {
        // Re-read: the BSP fixes the CPU count once the APs checked in.
        let cpus = u64::from(CPUS.load(Ordering::Acquire).max(1));
        let word = pass % WORDS_PER_PAGE;
        let value = ((cpu as u64) << 56) | pass;
        let mut until_tick = TICK_PAGES;
        for (i, block) in BLOCKS.iter().enumerate().take(nblocks) {
            let base = block.load(Ordering::Relaxed) as *mut u64;
            let block_pages = (pages - i as u64 * PAGES_PER_BLOCK).min(PAGES_PER_BLOCK);
            let mut page = cpu as u64;
            while page < block_pages {
                // SAFETY: page < block_pages and word < WORDS_PER_PAGE, so
                // the word is inside this leaked block; each page is
                // written by the one CPU that owns it (page % cpus == cpu)
                // while cpus is stable.
                unsafe {
                    base.add((page * WORDS_PER_PAGE + word) as usize)
                        .write_volatile(value)
                };
                page += cpus;
                until_tick -= 1;
                if until_tick == 0 {
                    until_tick = TICK_PAGES;
                    heartbeat.tick();
                }
            }
        }
        pass += 1;
        heartbeat.beat();
    }
}
