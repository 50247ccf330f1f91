//! Measures the kernel facts the engine's design rests on. Run as root:
//! `cargo run --release -p snapvm-bench --example uffd_probe`.
//! The numbers quoted in the engine's doc comments come from this program.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapvm_snapshot::uffd::{feature, feature_names, Event, RegisterMode, Uffd};

const MIB: usize = 1 << 20;
const CHUNK: usize = 2 * MIB;
const PAGE: usize = 4096;

struct Map {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: the mapping is plain memory; threads coordinate by protocol.
unsafe impl Send for Map {}
// SAFETY: as above.
unsafe impl Sync for Map {}

fn map(len: usize, huge: bool) -> Map {
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
    let aligned = ((p as usize + CHUNK - 1) & !(CHUNK - 1)) as *mut u8;
    let advice = if huge {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    // SAFETY: advising our own mapping.
    unsafe { libc::madvise(aligned.cast(), len, advice) };
    Map { ptr: aligned, len }
}

fn touch(m: &Map) {
    for off in (0..m.len).step_by(PAGE) {
        // SAFETY: within the mapping.
        unsafe { m.ptr.add(off).write_volatile(1) };
    }
}

fn anon_huge_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("AnonHugePages:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn poll_event(u: &Uffd, ms: i32) -> Option<Event> {
    let mut pfd = libc::pollfd {
        fd: u.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r <= 0 {
        return None;
    }
    let mut v = Vec::new();
    u.read_events(&mut v).ok()?;
    v.first().copied()
}

fn main() {
    let avail = Uffd::available_features().expect("uffd");
    println!(
        "available features: {:#x} {:?}",
        avail,
        feature_names(avail)
    );

    // 1. write-protect cost on THP vs 4 KiB backed, 1 GiB populated.
    for huge in [true, false] {
        let len = 1024 * MIB;
        let m = map(len, huge);
        touch(&m);
        let u = Uffd::new(feature::PAGEFAULT_FLAG_WP).unwrap();
        let t = Instant::now();
        u.register(m.ptr as u64, len as u64, RegisterMode::WP)
            .unwrap();
        let reg = t.elapsed();
        let t = Instant::now();
        u.write_protect(m.ptr as u64, len as u64, true, false)
            .unwrap();
        let wp = t.elapsed();
        let t = Instant::now();
        u.write_protect(m.ptr as u64, len as u64, false, false)
            .unwrap();
        let unwp = t.elapsed();
        println!(
            "1 GiB populated huge={huge}: register {:?}, WP set {:?}, WP clear {:?} (AnonHuge {} MiB)",
            reg,
            wp,
            unwp,
            anon_huge_kb() / 1024
        );
        // SAFETY: unmapping our mapping.
        unsafe { libc::munmap(m.ptr.cast(), len) };
    }

    // 2. unpopulated memory: does WP see first writes? cost of WP_UNPOPULATED?
    for (feat, name) in [
        (feature::PAGEFAULT_FLAG_WP, "WP"),
        (
            feature::PAGEFAULT_FLAG_WP | feature::WP_UNPOPULATED,
            "WP|WP_UNPOPULATED",
        ),
    ] {
        let len = 1024 * MIB;
        let m = Arc::new(map(len, true));
        let u = Uffd::new(feat).unwrap();
        u.register(m.ptr as u64, len as u64, RegisterMode::WP)
            .unwrap();
        let t = Instant::now();
        u.write_protect(m.ptr as u64, len as u64, true, false)
            .unwrap();
        let wp = t.elapsed();
        let m2 = m.clone();
        let h = std::thread::spawn(move || {
            // SAFETY: within the mapping.
            unsafe { m2.ptr.add(5 * CHUNK + 3 * PAGE).write_volatile(7) };
        });
        let ev = poll_event(&u, 300);
        if ev.is_some() {
            u.write_protect(m.ptr as u64, len as u64, false, false)
                .unwrap();
        }
        h.join().unwrap();
        println!(
            "1 GiB unpopulated, {name}: WP set {:?}; first write trapped: {:?}; AnonHuge after {} MiB",
            wp,
            ev,
            anon_huge_kb() / 1024
        );
        let t = Instant::now();
        drop(u);
        println!("  close uffd {:?}", t.elapsed());
        // SAFETY: unmapping our mapping.
        unsafe { libc::munmap(m.ptr.cast(), len) };
    }

    // 3. MISSING|WP on unpopulated: first read and first write come as missing.
    {
        let len = 64 * MIB;
        let m = Arc::new(map(len, true));
        let u = Uffd::new(feature::PAGEFAULT_FLAG_WP).unwrap();
        let t = Instant::now();
        u.register(
            m.ptr as u64,
            len as u64,
            RegisterMode::WP.union(RegisterMode::MISSING),
        )
        .unwrap();
        let reg = t.elapsed();
        let m2 = m.clone();
        let h = std::thread::spawn(move || {
            // SAFETY: within the mapping.
            let v = unsafe { m2.ptr.add(PAGE).read_volatile() };
            // SAFETY: within the mapping.
            unsafe { m2.ptr.add(CHUNK).write_volatile(v + 1) };
        });
        let e1 = poll_event(&u, 300);
        let t = Instant::now();
        if let Some(Event::PageFault { address, .. }) = e1 {
            u.zeropage(address, PAGE as u64, false).unwrap();
        }
        let zp = t.elapsed();
        let e2 = poll_event(&u, 300);
        let zero = [0u8; PAGE];
        let t = Instant::now();
        if let Some(Event::PageFault { address, .. }) = e2 {
            u.copy(address, zero.as_ptr(), PAGE as u64, false).unwrap();
        }
        let cp = t.elapsed();
        h.join().unwrap();
        println!(
            "MISSING|WP register 64 MiB {:?}; read -> {:?} (zeropage {:?}); write -> {:?} (copy {:?})",
            reg, e1, zp, e2, cp
        );
        // SAFETY: unmapping our mapping.
        unsafe { libc::munmap(m.ptr.cast(), len) };
    }

    // 4. copy cost into cold vs warm destination, and pagemap cost.
    {
        let n = 64;
        let src = map(n * CHUNK, true);
        touch(&src);
        let dst = map(n * CHUNK, true);
        let t = Instant::now();
        for i in 0..n {
            // SAFETY: both within their mappings, non-overlapping.
            unsafe {
                std::ptr::copy_nonoverlapping(src.ptr.add(i * CHUNK), dst.ptr.add(i * CHUNK), CHUNK)
            };
        }
        let cold = t.elapsed() / n as u32;
        let t = Instant::now();
        for i in 0..n {
            // SAFETY: as above.
            unsafe {
                std::ptr::copy_nonoverlapping(src.ptr.add(i * CHUNK), dst.ptr.add(i * CHUNK), CHUNK)
            };
        }
        let warm = t.elapsed() / n as u32;
        let dst2 = map(n * CHUNK, true);
        let t = Instant::now();
        for i in 0..n {
            // SAFETY: advising our own mapping.
            unsafe {
                libc::madvise(
                    dst2.ptr.add(i * CHUNK).cast(),
                    CHUNK,
                    23, /* MADV_POPULATE_WRITE */
                )
            };
        }
        let pop = t.elapsed() / n as u32;
        let f = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut buf = vec![0u8; 512 * 8];
        let t = Instant::now();
        for i in 0..n {
            use std::os::unix::fs::FileExt;
            let off = (src.ptr as u64 + (i * CHUNK) as u64) / PAGE as u64 * 8;
            f.read_exact_at(&mut buf, off).unwrap();
        }
        let pm = t.elapsed() / n as u32;
        println!(
            "per 2 MiB chunk: copy cold {:?}, warm {:?}, MADV_POPULATE_WRITE {:?}, pagemap read {:?}",
            cold, warm, pop, pm
        );
    }

    // 5. fault path granularity: whole chunk vs 4 KiB page.
    for page_gran in [false, true] {
        let n = 32;
        let src = Arc::new(map(n * CHUNK, true));
        touch(&src);
        let dst = map(n * CHUNK, true);
        touch(&dst);
        let before = anon_huge_kb();
        let u = Arc::new(Uffd::new(feature::PAGEFAULT_FLAG_WP).unwrap());
        u.register(src.ptr as u64, (n * CHUNK) as u64, RegisterMode::WP)
            .unwrap();
        u.write_protect(src.ptr as u64, (n * CHUNK) as u64, true, false)
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (u2, stop2, srcp, dstp) = (u.clone(), stop.clone(), src.ptr as usize, dst.ptr as usize);
        let handler = std::thread::spawn(move || {
            let mut handle = Duration::ZERO;
            let mut count = 0;
            while !stop2.load(Ordering::Relaxed) {
                if let Some(Event::PageFault { address, .. }) = poll_event(&u2, 50) {
                    let t = Instant::now();
                    let (start, len) = if page_gran {
                        (address as usize, PAGE)
                    } else {
                        (address as usize & !(CHUNK - 1), CHUNK)
                    };
                    let off = start - srcp;
                    // SAFETY: both within their mappings.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            start as *const u8,
                            (dstp + off) as *mut u8,
                            len,
                        )
                    };
                    u2.write_protect(start as u64, len as u64, false, false)
                        .unwrap();
                    handle += t.elapsed();
                    count += 1;
                }
            }
            (handle, count)
        });
        // writer: first write to each chunk, then 8 more pages in the chunk.
        let mut first = Duration::ZERO;
        let mut more = Duration::ZERO;
        for c in 0..n {
            let t = Instant::now();
            // SAFETY: within the mapping.
            unsafe { src.ptr.add(c * CHUNK).write_volatile(9) };
            first += t.elapsed();
            let t = Instant::now();
            for p in 1..9 {
                // SAFETY: within the mapping.
                unsafe { src.ptr.add(c * CHUNK + p * 37 * PAGE).write_volatile(9) };
            }
            more += t.elapsed();
        }
        stop.store(true, Ordering::Relaxed);
        let (handle, count) = handler.join().unwrap();
        println!(
            "fault path {}: first write {:?}/chunk, next 8 writes {:?}/chunk, handler {:?}/fault over {} faults; AnonHuge {} -> {} MiB",
            if page_gran { "4 KiB page" } else { "2 MiB chunk" },
            first / n as u32,
            more / n as u32,
            handle / count.max(1) as u32,
            count,
            before / 1024,
            anon_huge_kb() / 1024
        );
        // SAFETY: unmapping our mappings.
        unsafe {
            libc::munmap(src.ptr.cast(), n * CHUNK);
            libc::munmap(dst.ptr.cast(), n * CHUNK);
        }
    }
}
