//! Shared test fixtures: guest RAM stand-in over plain memory, writer
//! threads standing in for vCPUs, engine construction, comparison.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use snapshot::{Config, Engine, FaultInjection, Region, Snapshot, Strategy, CHUNK_SIZE, PAGE_SIZE};

pub const CHUNK: usize = CHUNK_SIZE as usize;
pub const PAGE: usize = PAGE_SIZE as usize;

/// Guest RAM stand-in: `full` chunks fully populated, then `partial` chunks
/// with every third page populated, then `untouched` chunks never touched.
pub struct Mem {
    pub base: *mut u8,
    pub len: usize,
    map: *mut libc::c_void,
    map_len: usize,
    /// Bytes the pre-fork writers may touch (full + partial chunks).
    pub touched_len: usize,
    pub partial: std::ops::Range<usize>,
}
// SAFETY: plain anonymous memory; the tests coordinate access.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    pub fn new(full: usize, partial: usize, untouched: usize, seed: u64) -> Arc<Mem> {
        let len = (full + partial + untouched) * CHUNK;
        let map_len = len + CHUNK;
        // SAFETY: anonymous private mapping, checked below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED, "mmap guest memory");
        let base = ((map as usize + CHUNK - 1) & !(CHUNK - 1)) as *mut u8;
        // SAFETY: advising our own mapping.
        assert_eq!(
            unsafe { libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE) },
            0
        );
        let m = Mem {
            base,
            len,
            map,
            map_len,
            touched_len: (full + partial) * CHUNK,
            partial: full..full + partial,
        };
        let mut rng = seed | 1;
        for c in 0..full + partial {
            let step = if m.partial.contains(&c) { 3 } else { 1 };
            for p in (0..CHUNK / PAGE).step_by(step) {
                let off = c * CHUNK + p * PAGE;
                for w in 0..4 {
                    m.write(off + w * 1024, xorshift(&mut rng));
                }
            }
        }
        Arc::new(m)
    }

    pub fn region(&self) -> Region {
        Region::new(0x1_0000_0000, self.base as u64, self.len as u64)
    }

    pub fn write(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.len);
        // SAFETY: in bounds, 8-byte aligned by construction.
        unsafe { (self.base.add(off) as *mut u64).write_volatile(v) }
    }

    pub fn read(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.len);
        // SAFETY: in bounds, aligned.
        unsafe { (self.base.add(off) as *const u64).read_volatile() }
    }

    /// What the memory holds now, without touching never-populated pages
    /// (reading them would map the zero page and make them "touched"):
    /// pages with no page-table entry read as zero by definition.
    pub fn reference(&self) -> Vec<u8> {
        let pm = File::open("/proc/self/pagemap").expect("open pagemap");
        let pages = self.len / PAGE;
        let mut raw = vec![0u8; pages * 8];
        pm.read_exact_at(&mut raw, self.base as u64 / PAGE as u64 * 8)
            .expect("read pagemap");
        let mut out = vec![0u8; self.len];
        for p in 0..pages {
            let e = u64::from_ne_bytes(raw[p * 8..p * 8 + 8].try_into().unwrap());
            if e & (3 << 62) != 0 {
                // SAFETY: page p is in bounds and populated.
                let src = unsafe { std::slice::from_raw_parts(self.base.add(p * PAGE), PAGE) };
                out[p * PAGE..(p + 1) * PAGE].copy_from_slice(src);
            }
        }
        out
    }

    /// Pages still carrying a uffd write-protect bit (pagemap bit 57).
    pub fn wp_pages(&self) -> usize {
        let pm = File::open("/proc/self/pagemap").expect("open pagemap");
        let pages = self.len / PAGE;
        let mut raw = vec![0u8; pages * 8];
        pm.read_exact_at(&mut raw, self.base as u64 / PAGE as u64 * 8)
            .expect("read pagemap");
        (0..pages)
            .filter(|p| {
                u64::from_ne_bytes(raw[p * 8..p * 8 + 8].try_into().unwrap()) & (1 << 57) != 0
            })
            .count()
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

pub fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Writer threads: writer t owns the 8-byte slots ≡ t (mod n), writes
/// distinct values at random, and remembers its last value per slot.
pub struct Writers {
    mem: Arc<Mem>,
    n: usize,
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    paused: Arc<AtomicUsize>,
    /// false: only the pre-fork touched part; true: anywhere.
    pub anywhere: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    handles: Vec<JoinHandle<HashMap<usize, u64>>>,
}

impl Writers {
    pub fn start(mem: &Arc<Mem>, n: usize) -> Writers {
        let mut w = Writers {
            mem: mem.clone(),
            n,
            stop: Arc::default(),
            pause: Arc::default(),
            paused: Arc::default(),
            anywhere: Arc::default(),
            writes: Arc::default(),
            handles: Vec::new(),
        };
        for t in 0..n {
            let (mem, stop, pause, paused, anywhere, writes) = (
                mem.clone(),
                w.stop.clone(),
                w.pause.clone(),
                w.paused.clone(),
                w.anywhere.clone(),
                w.writes.clone(),
            );
            w.handles.push(std::thread::spawn(move || {
                let mut rng = 0x9E37_79B9_7F4A_7C15 ^ ((t as u64 + 1) * 0x1234_5678_9abc);
                let mut last = HashMap::new();
                let mut count = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    if pause.load(Ordering::SeqCst) {
                        paused.fetch_add(1, Ordering::SeqCst);
                        while pause.load(Ordering::SeqCst) {
                            std::thread::yield_now();
                        }
                        paused.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                    let limit = if anywhere.load(Ordering::SeqCst) {
                        mem.len
                    } else {
                        mem.touched_len
                    };
                    let slots = limit / 8 / n;
                    let r = xorshift(&mut rng);
                    let slot = (r as usize % slots) * n + t;
                    count += 1;
                    let v = ((t as u64 + 1) << 56) | count;
                    if r >> 60 == 0 {
                        // Sometimes read instead (read faults on untouched pages).
                        std::hint::black_box(mem.read(slot * 8));
                    } else {
                        mem.write(slot * 8, v);
                        last.insert(slot, v);
                    }
                    writes.fetch_add(1, Ordering::Relaxed);
                }
                last
            }));
        }
        w
    }

    pub fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        while self.paused.load(Ordering::SeqCst) != self.n {
            std::thread::yield_now();
        }
    }

    pub fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    /// Waits until the writers made `n` more accesses (progress, not time).
    pub fn run_for(&self, n: u64) {
        let start = self.writes.load(Ordering::Relaxed);
        while self.writes.load(Ordering::Relaxed) < start + n {
            std::thread::yield_now();
        }
    }

    /// Stops the writers and checks every writer's last value is in memory.
    pub fn stop_and_check(self) {
        self.stop.store(true, Ordering::SeqCst);
        let mut checked = 0;
        for h in self.handles {
            let last = h.join().expect("writer panicked");
            for (slot, v) in last {
                assert_eq!(
                    self.mem.read(slot * 8),
                    v,
                    "writer value lost at slot {slot}"
                );
                checked += 1;
            }
        }
        assert!(checked > 0);
    }
}

pub fn engine(workers: usize, injection: FaultInjection) -> Engine {
    engine_with(Strategy::AsyncFork, workers, injection)
}

pub fn engine_with(strategy: Strategy, workers: usize, injection: FaultInjection) -> Engine {
    match Engine::new(Config {
        workers,
        strategy,
        injection,
        ..Config::default()
    }) {
        Ok(e) => e,
        Err(e) => {
            panic!("snapshot engine unavailable (these tests need root and userfaultfd): {e}")
        }
    }
}

pub fn compare(snap: &Snapshot, reference: &[u8]) {
    let img = snap.region_memory(0);
    assert_eq!(img.len(), reference.len());
    let mismatches = img.iter().zip(reference).filter(|(a, b)| a != b).count();
    if mismatches > 0 {
        let first = img.iter().zip(reference).position(|(a, b)| a != b).unwrap();
        panic!(
            "{mismatches} mismatching bytes; first at {first:#x} (chunk {})",
            first / CHUNK
        );
    }
    for c in 0..snap.chunk_count() {
        if snap.chunk_is_zero(c) {
            assert!(
                reference[c * CHUNK..(c + 1) * CHUNK]
                    .iter()
                    .all(|&b| b == 0),
                "chunk {c} flagged zero but is not"
            );
        }
    }
}

/// After a rollback (or a preparation): the next snapshot (armed first
/// with `arm`) succeeds and is exact, with the writers running around it;
/// stops the writers and returns the snapshot.
pub fn next_snapshot_is_exact(eng: &Engine, mem: &Mem, ws: Writers, arm: bool) -> Snapshot {
    if arm {
        // SAFETY: `mem` outlives the snapshot (wait() below).
        unsafe { eng.arm(&[mem.region()]) }.expect("arm after rollback");
    }
    ws.pause();
    let reference = mem.reference();
    // SAFETY: as above.
    unsafe { eng.begin(&[mem.region()]) }.expect("begin after rollback");
    ws.resume();
    ws.run_for(10_000);
    let snap = eng.wait().expect("snapshot after rollback");
    ws.stop_and_check();
    compare(&snap, &reference);
    snap
}
