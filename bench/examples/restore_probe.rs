//! How to load a memory image into userfaultfd-registered guest RAM and
//! keep its huge pages (issue #19): times each way of resolving the
//! missing faults of a whole image, 2 MiB at a time, and reports how much
//! of the destination ends up in huge pages.
//!
//! `cargo run --release -p snapvm-bench --example restore_probe -- [MiB] [dir] [rounds]`
//!
//! - `read`: O_DIRECT reads into one reused buffer (what `dd iflag=direct`
//!   does): the disk's rate, the ceiling.
//! - `copy`: read, then UFFDIO_COPY into the destination (4 KiB pages).
//! - `copy+collapse`: the same, then MADV_COLLAPSE of each chunk.
//! - `move`: read into a THP-advised staging chunk (the read allocates a
//!   huge page), then UFFDIO_MOVE it into the destination (the PMD moves).
//!
//! Each method runs `rounds` times (default 2): the first round backs its
//! memory with fresh host memory, later rounds reuse what the previous one
//! freed (fresh memory is slow on nested hosts: docs/BENCHMARKS.md).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Instant;

use snapvm_snapshot::uffd::{feature, RegisterMode, Uffd};

const CHUNK: usize = 2 << 20;
const MADV_COLLAPSE: i32 = 25;

/// A 2 MiB-aligned anonymous mapping, unmapped on drop.
struct Map {
    addr: *mut u8,
    len: usize,
    raw: *mut libc::c_void,
    raw_len: usize,
}

impl Map {
    fn new(len: usize, huge: bool) -> Map {
        let raw_len = len + CHUNK;
        // SAFETY: anonymous private mapping; checked below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                raw_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED, "mmap");
        let addr = ((raw as usize).div_ceil(CHUNK) * CHUNK) as *mut u8;
        let advice = if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(addr.cast(), len, advice) };
        Map {
            addr,
            len,
            raw,
            raw_len,
        }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.raw, self.raw_len) };
    }
}

/// kB of AnonHugePages in smaps for mappings overlapping `map`.
fn huge_kb(map: &Map) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let (lo, hi) = (map.addr as u64, map.addr as u64 + map.len as u64);
    let mut inside = false;
    let mut kb = 0;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    inside = a < hi && b > lo;
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("AnonHugePages:") {
                kb += v
                    .trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    kb
}

fn pattern(chunk: usize, buf: &mut [u8]) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&((chunk as u64) << 32 | i as u64).to_le_bytes());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: usize = args.first().map_or(1024, |a| a.parse().expect("MiB"));
    let dir = args.get(1).cloned().unwrap_or_else(|| "/var/tmp".into());
    let rounds: usize = args.get(2).map_or(2, |a| a.parse().expect("rounds"));
    let len = mib << 20;
    let chunks = len / CHUNK;
    let path = format!("{dir}/restore-probe-{}.img", std::process::id());
    {
        let buf = Map::new(CHUNK, false);
        // SAFETY: `buf` is CHUNK bytes we own.
        let b = unsafe { std::slice::from_raw_parts_mut(buf.addr, CHUNK) };
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .expect("create image");
        for c in 0..chunks {
            pattern(c, b);
            f.write_all(b).expect("write image");
        }
        f.sync_all().expect("fsync");
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("open image");
    println!("image: {mib} MiB in {path}");
    for method in ["read", "copy", "copy+collapse", "move"] {
        for round in 0..rounds {
            run(method, round, &file, chunks);
        }
    }
    let _ = std::fs::remove_file(&path);
}

fn read_chunk(file: &File, c: usize, into: *mut u8) {
    // SAFETY: `into` is a CHUNK-byte writable buffer of ours.
    let b = unsafe { std::slice::from_raw_parts_mut(into, CHUNK) };
    file.read_exact_at(b, (c * CHUNK) as u64)
        .expect("read chunk");
}

fn run(method: &str, round: usize, file: &File, chunks: usize) {
    let len = chunks * CHUNK;
    let dst = Map::new(len, true);
    let staging = Map::new(CHUNK, true);
    let uffd = Uffd::new(feature::MOVE).expect("userfaultfd with UFFD_FEATURE_MOVE");
    uffd.register(dst.addr as u64, len as u64, RegisterMode::MISSING)
        .expect("register");
    let t = Instant::now();
    for c in 0..chunks {
        let at = dst.addr as u64 + (c * CHUNK) as u64;
        read_chunk(file, c, staging.addr);
        match method {
            "read" => {}
            "copy" | "copy+collapse" => {
                uffd.copy(at, staging.addr, CHUNK as u64, true)
                    .expect("UFFDIO_COPY");
                if method == "copy+collapse" {
                    // SAFETY: advice on our own, fully populated chunk.
                    let rc = unsafe { libc::madvise(at as *mut _, CHUNK, MADV_COLLAPSE) };
                    if rc != 0 && c == 0 {
                        eprintln!("MADV_COLLAPSE: {}", std::io::Error::last_os_error());
                    }
                }
            }
            "move" => {
                uffd.move_pages(at, staging.addr as u64, CHUNK as u64, true)
                    .expect("UFFDIO_MOVE");
            }
            _ => unreachable!(),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let gib = len as f64 / (1u64 << 30) as f64;
    let huge = if method == "read" {
        "-".to_string()
    } else {
        format!(
            "{:.0} %",
            huge_kb(&dst) as f64 * 1024.0 / len as f64 * 100.0
        )
    };
    if method != "read" {
        // Spot-check the contents.
        for c in [0, chunks / 2, chunks - 1] {
            let mut want = vec![0u8; CHUNK];
            pattern(c, &mut want);
            // SAFETY: chunk c of dst is populated now.
            let got = unsafe { std::slice::from_raw_parts(dst.addr.add(c * CHUNK), CHUNK) };
            assert!(got == want.as_slice(), "{method}: chunk {c} differs");
        }
    }
    println!(
        "{method:>14} round {round}: {:.2} GiB/s ({:.0} ms), huge pages {huge}",
        gib / secs,
        secs * 1000.0
    );
    let _ = std::io::stdout().flush();
}
