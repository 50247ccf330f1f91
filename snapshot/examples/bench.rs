//! Snapshot a populated THP region while writer threads hammer it and print
//! the engine's metrics. `cargo run --release -p snapshot --example bench -- [MiB] [workers] [writers] [strategy]`
//! (strategy: async-fork (default), stop-the-world, sync-wp).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use snapshot::{Config, Engine, Region, Strategy, CHUNK_SIZE};

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
    // SAFETY: advising and touching our own mapping (3/4 populated).
    unsafe {
        libc::madvise(base as *mut _, len, libc::MADV_HUGEPAGE);
        for off in (0..len * 3 / 4).step_by(4096) {
            ((base + off) as *mut u8).write_volatile(1);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = (0..writers)
        .map(|t| {
            let (stop, pause, writes) = (stop.clone(), pause.clone(), writes.clone());
            std::thread::spawn(move || {
                let mut r = 0x1234_5678u64 + t as u64;
                while !stop.load(Ordering::Relaxed) {
                    if pause.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
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
    std::thread::sleep(std::time::Duration::from_millis(200));
    let eng = Engine::new(Config {
        workers,
        strategy,
        ..Config::default()
    })?;
    pause.store(true, Ordering::SeqCst);
    // SAFETY: the mapping lives until the end of main.
    let sync = unsafe { eng.begin(&[Region::new(0, base as u64, len as u64)]) }?;
    pause.store(false, Ordering::SeqCst);
    let w0 = writes.load(Ordering::Relaxed);
    let snap = eng.wait()?;
    let w1 = writes.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        let _ = h.join();
    }
    let m = snap.metrics();
    println!(
        "{strategy}: {mib} MiB, {workers} workers, {writers} writers; writes during snapshot: {}",
        w1 - w0
    );
    println!("sync: {:?}", sync);
    println!("{m:#?}");
    Ok(())
}
