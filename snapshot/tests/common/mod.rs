//! Shared test fixtures: guest RAM stand-in over plain memory, writer
//! threads standing in for vCPUs, engine construction, comparison.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use snapvm_snapshot::persist::{WriteSummary, MEMORY_FILE};
use snapvm_snapshot::{
    Config, Engine, Error, FaultInjection, ImageFile, PersistError, Region, Snapshot, SnapshotDir,
    SnapshotWriter, StagingPool, Strategy, SyncMetrics, WriteOptions, CHUNK_SIZE, PAGE_SIZE,
};

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

/// The staging budget of these tests' engines: small guests, and many
/// tests at once.
pub const TEST_BUDGET: u64 = 32 << 20;

pub fn engine_with(strategy: Strategy, workers: usize, injection: FaultInjection) -> Engine {
    engine_budget(strategy, workers, TEST_BUDGET, injection)
}

/// An engine with a staging pool of `budget` bytes.
pub fn engine_budget(
    strategy: Strategy,
    workers: usize,
    budget: u64,
    injection: FaultInjection,
) -> Engine {
    match Engine::new(Config {
        workers,
        strategy,
        injection,
        staging: Arc::new(StagingPool::new(budget)),
        ..Config::default()
    }) {
        Ok(e) => e,
        Err(e) => {
            panic!("snapshot engine unavailable (these tests need root and userfaultfd): {e}")
        }
    }
}

/// VM state stored beside the image by these tests.
pub const VM_STATE: &[u8] = b"vcpu0: rip=0x100000 rsp=0x8000; serial: lcr=3";

/// A snapshot directory being written for one `Mem`, in its own temp dir
/// on a disk file system (O_DIRECT).
pub struct Sink {
    pub dir: tempfile::TempDir,
    pub target: PathBuf,
    writer: Option<SnapshotWriter>,
}

impl Sink {
    pub fn new(mem: &Mem) -> Sink {
        Sink::with(mem, &WriteOptions::default())
    }

    pub fn with(mem: &Mem, opts: &WriteOptions) -> Sink {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let target = dir.path().join("snap");
        let writer = SnapshotWriter::create(&target, &[mem.region()], opts).expect("writer");
        Sink {
            dir,
            target,
            writer: Some(writer),
        }
    }

    pub fn image(&self) -> &Arc<ImageFile> {
        self.writer.as_ref().expect("not committed yet").image()
    }

    /// Commits `snap`, checks every chunk against its checksum, and
    /// returns the image's bytes.
    pub fn commit(mut self, snap: &Snapshot) -> Vec<u8> {
        let w = self.writer.take().expect("not committed yet");
        w.commit(snap, VM_STATE).expect("commit");
        let opened = SnapshotDir::open(&self.target).expect("open");
        assert_eq!(opened.vm_state(), VM_STATE);
        opened
            .verify_chunks()
            .expect("every chunk matches its checksum");
        std::fs::read(self.target.join(MEMORY_FILE)).expect("read image")
    }

    /// A failed snapshot: dropping the writer leaves nothing behind.
    pub fn abandon(mut self) {
        drop(self.writer.take());
        let left: Vec<_> = std::fs::read_dir(self.dir.path())
            .expect("read_dir")
            .collect();
        assert!(left.is_empty(), "a failed snapshot left {left:?}");
    }
}

/// `eng.arm` of `mem` into `sink`.
pub fn arm(eng: &Engine, mem: &Mem, sink: &Sink) -> Result<(), Error> {
    // SAFETY: every test keeps `mem` alive until the snapshot is collected
    // (wait) or disarmed.
    unsafe { eng.arm(&[mem.region()], sink.image()) }
}

/// `eng.begin` of `mem` into `sink`.
pub fn begin(eng: &Engine, mem: &Mem, sink: &Sink) -> Result<SyncMetrics, Error> {
    // SAFETY: as for `arm`.
    unsafe { eng.begin(&[mem.region()], sink.image()) }
}

/// Takes an idle snapshot of `mem` (nobody writes) into `target`:
/// create, arm, begin, wait, commit.
pub fn snapshot_into(
    eng: &Engine,
    mem: &Mem,
    target: &Path,
    opts: &WriteOptions,
) -> Result<(Snapshot, WriteSummary), String> {
    let w = SnapshotWriter::create(target, &[mem.region()], opts).map_err(|e| e.to_string())?;
    let regions = [mem.region()];
    // SAFETY: `mem` outlives the snapshot (wait() below).
    unsafe { eng.arm(&regions, w.image()) }.map_err(|e| e.to_string())?;
    // SAFETY: as above.
    unsafe { eng.begin(&regions, w.image()) }.map_err(|e| e.to_string())?;
    let snap = eng.wait().map_err(|e| e.to_string())?;
    let sum = w
        .commit(&snap, VM_STATE)
        .map_err(|e: PersistError| e.to_string())?;
    Ok((snap, sum))
}

/// The image equals the reference, byte for byte, and the chunks flagged
/// as holes are zero in the reference.
pub fn compare(snap: &Snapshot, img: &[u8], reference: &[u8]) {
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
        let zero = reference[c * CHUNK..(c + 1) * CHUNK]
            .iter()
            .all(|&b| b == 0);
        assert_eq!(
            snap.chunk_is_zero(c),
            zero,
            "chunk {c}: a hole exactly where memory reads zero"
        );
    }
}

/// A snapshot with the writers running around its pause: `arm` (if
/// `arm_first`), pause the writers, `begin`, resume them, start the copy,
/// let them make `accesses` more accesses, wait, commit. Checks the image
/// against memory at `begin`, bit for bit, and returns the snapshot.
pub fn exact_snapshot_under(
    eng: &Engine,
    mem: &Mem,
    ws: &Writers,
    arm_first: bool,
    accesses: u64,
) -> Snapshot {
    let sink = Sink::new(mem);
    if arm_first {
        arm(eng, mem, &sink).expect("arm");
    }
    ws.pause();
    let reference = mem.reference();
    begin(eng, mem, &sink).expect("begin");
    ws.resume();
    eng.start_copy().expect("start");
    ws.run_for(accesses);
    let snap = eng.wait().expect("snapshot");
    let img = sink.commit(&snap);
    compare(&snap, &img, &reference);
    snap
}

/// After a rollback: the next snapshot (armed first with `arm_first`)
/// succeeds and is exact, with the writers running around it; stops the
/// writers (checking their data) and returns the snapshot.
pub fn next_snapshot_is_exact(eng: &Engine, mem: &Mem, ws: Writers, arm_first: bool) -> Snapshot {
    let snap = exact_snapshot_under(eng, mem, &ws, arm_first, 10_000);
    ws.stop_and_check();
    snap
}
