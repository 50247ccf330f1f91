//! Measures what populating fresh destination memory costs on this machine,
//! which is itself a VM (Firecracker, nested PVM) with free page reporting:
//! memory the kernel frees is handed back to the outer host in 4 MiB blocks
//! (`page_reporting.page_reporting_order=11`) within seconds, and the next
//! touch of such memory faults in the outer host too, once per 4 KiB page.
//! `cargo run --release -p snapvm-bench --example mem_probe -- [MiB] [threads]`
//! The numbers quoted in engine.rs ("Destination preparation") come from
//! this program.

use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const CHUNK: usize = 2 * MIB;
const MADV_POPULATE_WRITE: libc::c_int = 23;

struct Map {
    base: *mut libc::c_void,
    ptr: usize,
    len: usize,
}

fn map(len: usize, advice: libc::c_int) -> Map {
    // SAFETY: anonymous private mapping; checked for MAP_FAILED below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + CHUNK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let ptr = (p as usize + CHUNK - 1) & !(CHUNK - 1);
    // SAFETY: advising our own mapping.
    unsafe { libc::madvise(ptr as *mut _, len, advice) };
    Map { base: p, ptr, len }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping what map() mapped.
        unsafe { libc::munmap(self.base, self.len + CHUNK) };
    }
}

/// MADV_POPULATE_WRITE the whole mapping, `threads` threads each taking
/// every `threads`-th chunk. Returns the wall time.
fn populate(m: &Map, threads: usize) -> Duration {
    let t = Instant::now();
    let (ptr, len) = (m.ptr, m.len);
    std::thread::scope(|s| {
        for k in 0..threads {
            s.spawn(move || {
                let mut off = k * CHUNK;
                while off < len {
                    // SAFETY: within our mapping.
                    let rc =
                        unsafe { libc::madvise((ptr + off) as *mut _, CHUNK, MADV_POPULATE_WRITE) };
                    assert_eq!(rc, 0);
                    off += threads * CHUNK;
                }
            });
        }
    });
    t.elapsed()
}

fn copy(src: &Map, dst: &Map) -> Duration {
    let t = Instant::now();
    // SAFETY: both mappings are populated, same length, disjoint.
    unsafe { std::ptr::copy_nonoverlapping(src.ptr as *const u8, dst.ptr as *mut u8, src.len) };
    t.elapsed()
}

fn per_gib(d: Duration, len: usize) -> String {
    format!(
        "{:>8.1} ms ({:.2} GiB/s)",
        d.as_secs_f64() * 1e3,
        len as f64 / (1 << 30) as f64 / d.as_secs_f64()
    )
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let len = args.first().copied().unwrap_or(1024) * MIB;
    let threads = args.get(1).copied().unwrap_or(2);
    let settle = Duration::from_secs(6);
    println!(
        "{} MiB, populate with MADV_POPULATE_WRITE per 2 MiB chunk",
        len / MIB
    );

    for (name, advice) in [
        ("THP (MADV_HUGEPAGE)", libc::MADV_HUGEPAGE),
        ("4 KiB (MADV_NOHUGEPAGE)", libc::MADV_NOHUGEPAGE),
        ("THP (MADV_HUGEPAGE)", libc::MADV_HUGEPAGE),
        ("4 KiB (MADV_NOHUGEPAGE)", libc::MADV_NOHUGEPAGE),
    ] {
        println!("{name}:");
        std::thread::sleep(settle);
        let a = map(len, advice);
        println!(
            "  cold (after {settle:?} idle), 1 thread: {}",
            per_gib(populate(&a, 1), len)
        );
        drop(a);
        let a = map(len, advice);
        println!(
            "  warm (just freed),        1 thread: {}",
            per_gib(populate(&a, 1), len)
        );
        drop(a);
        std::thread::sleep(settle);
        let a = map(len, advice);
        println!(
            "  cold, {threads} threads:               {}",
            per_gib(populate(&a, threads), len)
        );
        drop(a);
        let a = map(len, advice);
        println!(
            "  warm, {threads} threads:               {}",
            per_gib(populate(&a, threads), len)
        );
        // Warm source, warm destination: the memcpy alone.
        let b = map(len, advice);
        populate(&b, threads);
        println!(
            "  memcpy warm → warm:         {}",
            per_gib(copy(&a, &b), len)
        );
    }
}
