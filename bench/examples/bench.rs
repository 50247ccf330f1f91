//! Snapshot a populated THP region while writer threads hammer it and print
//! the engine's metrics.
//!
//! `cargo run --release -p snapvm-bench --example bench -- [MiB] [workers] [writers] [strategy] [key=value...]`
//! - strategy: async-fork (default), stop-the-world, sync-wp
//! - `pop=75`: percent of the region populated before the snapshot (the
//!   rest is never touched; writers write anywhere, so they first-touch it)
//! - `budget=MiB`: the staging pool (default 256)
//! - `repeat=N`: take N snapshots in a row
//! - `idle=S`: sleep S seconds between populating and the first snapshot
//! - `dir=PATH`: where the snapshot directories go (default /var/tmp)
//!
//! Each snapshot is written and committed as a snapshot directory (then
//! removed), so "done" is the durable end a user waits for.
//!
//! Writers acknowledge the pause (as vCPUs leaving KVM_RUN would) before
//! `begin()` runs, so the sync phase is not measured against a writer still
//! inside a page fault.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapvm_snapshot::{
    Config, Engine, Region, SnapshotWriter, StagingPool, Strategy, WriteOptions, CHUNK_SIZE,
};

fn kv(key: &str) -> Option<u64> {
    std::env::args().skip(1).find_map(|a| {
        a.strip_prefix(&format!("{key}="))
            .and_then(|v| v.parse().ok())
    })
}

fn gib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / d.as_secs_f64()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let strategy = std::env::args()
        .skip(1)
        .find_map(|a| Strategy::from_name(&a))
        .unwrap_or_default();
    let mib = *args.first().unwrap_or(&1024);
    let workers = *args.get(1).unwrap_or(&1);
    let writers = *args.get(2).unwrap_or(&1);
    let pop = kv("pop").unwrap_or(75).min(100) as usize;
    let budget = kv("budget").unwrap_or(256) << 20;
    let dir = std::env::args()
        .skip(1)
        .find_map(|a| a.strip_prefix("dir=").map(std::path::PathBuf::from))
        .unwrap_or_else(|| "/var/tmp".into());
    let repeat = kv("repeat").unwrap_or(1).max(1);
    let idle = kv("idle").unwrap_or(0);
    let len = mib << 20;
    let chunk = CHUNK_SIZE as usize;
    // SAFETY: anonymous mapping, checked below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + chunk,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err("mmap failed".into());
    }
    let base = (map as usize + chunk - 1) & !(chunk - 1);
    let populated = len / chunk * pop / 100 * chunk;
    let t = Instant::now();
    // SAFETY: advising and touching our own mapping.
    unsafe {
        libc::madvise(base as *mut _, len, libc::MADV_HUGEPAGE);
        for off in (0..populated).step_by(4096) {
            ((base + off) as *mut u8).write_volatile(1);
        }
    }
    println!(
        "source: {} MiB populated of {mib} MiB in {:?}",
        populated >> 20,
        t.elapsed()
    );
    std::thread::sleep(Duration::from_secs(idle));
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicUsize::new(0));
    let writes = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = (0..writers)
        .map(|t| {
            let (stop, pause, paused, writes) =
                (stop.clone(), pause.clone(), paused.clone(), writes.clone());
            std::thread::spawn(move || {
                let mut r = 0x1234_5678u64 + t as u64;
                while !stop.load(Ordering::Relaxed) {
                    if pause.load(Ordering::SeqCst) {
                        paused.fetch_add(1, Ordering::SeqCst);
                        while pause.load(Ordering::SeqCst) {
                            std::hint::spin_loop();
                        }
                        paused.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                    r ^= r << 13;
                    r ^= r >> 7;
                    r ^= r << 17;
                    let off = (r as usize % (len / 8)) * 8;
                    // SAFETY: in bounds.
                    unsafe { ((base + off) as *mut u64).write_volatile(r) };
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let eng = Engine::new(Config {
        workers,
        strategy,
        staging: Arc::new(StagingPool::new(budget)),
        ..Config::default()
    })?;
    let regions = [Region::new(0, base as u64, len as u64)];
    for round in 0..repeat {
        let target = dir.join(format!("snapshot-bench-{}-{round}", std::process::id()));
        let t_request = Instant::now();
        let writer = SnapshotWriter::create(&target, &regions, &WriteOptions::default())?;
        // SAFETY: the mapping lives until the end of main.
        unsafe { eng.arm(&regions, writer.image()) }?;
        pause.store(true, Ordering::SeqCst);
        while paused.load(Ordering::SeqCst) != writers {
            std::hint::spin_loop();
        }
        // SAFETY: as above.
        let sync = unsafe { eng.begin(&regions, writer.image()) }?;
        pause.store(false, Ordering::SeqCst);
        eng.start_copy()?;
        let w0 = writes.load(Ordering::Relaxed);
        let snap = eng.wait()?;
        let w1 = writes.load(Ordering::Relaxed);
        let summary = writer.commit(&snap, b"")?;
        let done = t_request.elapsed();
        std::fs::remove_dir_all(&target)?;
        let m = snap.metrics();
        println!(
            "[{round}] {strategy}: {mib} MiB, {workers} workers, {writers} writers, pop {pop}%, budget {} MiB; writes during snapshot: {}; request to durable done {done:?} ({:.2} GiB/s written), commit {:?}",
            budget >> 20,
            w1 - w0,
            gib_s(m.bytes_written, done),
            summary.commit,
        );
        println!(
            "[{round}] sync total {:?} (register {:?}, write_protect {:?}); copy {:?} = {:.2} GiB/s written; faults wp {} missing {} latency p50 {} µs p99 {} µs max {} µs; chunks by workers/fault/hook {}/{}/{}, zero {}",
            sync.total,
            sync.register,
            sync.write_protect,
            m.copy_total,
            gib_s(m.bytes_written, m.copy_total),
            m.wp_faults,
            m.missing_faults,
            m.fault_latency.p50_ns / 1000,
            m.fault_latency.p99_ns / 1000,
            m.fault_latency.max_ns / 1000,
            m.chunks_by_workers,
            m.chunks_by_fault_path,
            m.chunks_by_hook,
            m.zero_chunks,
        );
        if round + 1 == repeat {
            println!("{m:#?}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        let _ = h.join();
    }
    Ok(())
}
