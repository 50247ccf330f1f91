//! Fault injection across the engine, with process-wide leak checks: every
//! case counts this process's threads (/proc/self/task) and open fds
//! (/proc/self/fd) before and after, and they must match exactly. That only
//! holds if nothing else runs in the process meanwhile, so this file has its
//! own single-threaded harness (`harness = false` in Cargo.toml): cases run
//! one after the other, in the main thread.
//!
//! In every case: the error names the phase and what failed, the writer
//! threads (standing in for vCPUs) keep running with their data intact, no
//! write protection is left, no thread or fd leaks, and the next snapshot
//! succeeds and is bit-exact. A failed snapshot yields no `Snapshot` at all,
//! and dropping its writer removes the half-written directory, so there is
//! nothing incomplete to restore.
//!
//! Needs root and userfaultfd, like `engine.rs`: without them every case
//! FAILS with the reason.

mod common;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;

use common::*;
use snapvm_snapshot::{
    Error, FaultInjection, PersistError, Phase, Strategy, WriteOptions, CHUNK_SIZE,
};

/// Threads and fds of this process.
fn counts() -> (usize, usize) {
    let n = |p: &str| std::fs::read_dir(p).expect(p).count();
    (n("/proc/self/task"), n("/proc/self/fd"))
}

/// What the failed snapshot must report.
enum Expect {
    Injected(Phase),
    Panicked(Phase),
    /// The image's write failed with this errno, in this phase.
    Write(Phase, i32),
    Cancelled,
}

fn check_error(err: &Error, expect: &Expect) {
    let ok = match (expect, err) {
        (Expect::Injected(p), Error::Injected { phase, .. }) => phase == p,
        (Expect::Panicked(p), Error::Panicked { phase, what }) => {
            phase == p && what.contains("injected")
        }
        (
            Expect::Write(p, errno),
            Error::Write {
                phase,
                source: PersistError::Io { source, .. },
            },
        ) => phase == p && source.raw_os_error() == Some(*errno),
        (Expect::Cancelled, Error::Cancelled) => true,
        _ => false,
    };
    assert!(ok, "unexpected error: {err} ({err:?})");
}

/// One fault: snapshot with `injection` fails as `expect`; then the common
/// checks. `writers_during_copy: false` keeps the writers paused until the
/// snapshot failed (else the fault path may copy every chunk before a
/// worker runs, and a worker-side fault is never reached).
fn fault_case(injection: FaultInjection, expect: Expect, writers_during_copy: bool, cancel: bool) {
    fault_case_with(
        injection,
        TEST_BUDGET,
        &WriteOptions::default(),
        expect,
        writers_during_copy,
        cancel,
    )
}

/// `fault_case` with a staging budget and a failing image.
fn fault_case_with(
    injection: FaultInjection,
    budget: u64,
    opts: &WriteOptions,
    expect: Expect,
    writers_during_copy: bool,
    cancel: bool,
) {
    let before = counts();
    {
        let mem = Mem::new(8, 4, 4, 77);
        let ws = Writers::start(&mem, 2);
        ws.run_for(5_000);
        ws.pause();
        let eng = engine_budget(Strategy::AsyncFork, 2, budget, injection);
        let sink = Sink::with(&mem, opts);
        let begun = begin(&eng, &mem, &sink);
        if begun.is_ok() {
            eng.start_copy().expect("start");
        }
        ws.anywhere.store(true, Ordering::SeqCst);
        let err = match begun {
            Err(e) => {
                assert!(!eng.in_progress(), "a sync failure leaves nothing behind");
                ws.resume();
                e
            }
            Ok(_) => {
                if writers_during_copy {
                    ws.resume();
                    // A write to a protected, populated chunk: the fault
                    // path. Not in the worker cases: a fault-path copy
                    // would race the worker for the injected failure (a
                    // populate counted by both) and fail in the wrong phase.
                    mem.write(3 * CHUNK + 64, 1);
                }
                if cancel {
                    eng.cancel().expect("cancel");
                }
                let e = eng.wait().expect_err("snapshot must fail");
                if !writers_during_copy {
                    ws.resume();
                }
                e
            }
        };
        check_error(&err, &expect);
        // Writers are not blocked and keep going.
        ws.run_for(20_000);
        assert_eq!(mem.wp_pages(), 0, "write protection left behind");
        assert!(!eng.in_progress());
        drop(eng);
        sink.abandon();

        // The next snapshot, without injection, succeeds bit for bit.
        let eng = engine_with(Strategy::AsyncFork, 2, FaultInjection::default());
        next_snapshot_is_exact(&eng, &mem, ws, false);
        assert_eq!(mem.wp_pages(), 0);
    }
    assert_eq!(counts(), before, "(threads, fds) leaked");
}

fn worker_panic() {
    fault_case(
        FaultInjection {
            panic_worker_copy_at: Some(2),
            ..FaultInjection::default()
        },
        Expect::Panicked(Phase::Worker),
        false,
        false,
    );
}

fn fault_path_panic() {
    fault_case(
        FaultInjection {
            panic_fault_path_at: Some(0),
            hold_workers_until_fault_copies: Some(1),
            ..FaultInjection::default()
        },
        Expect::Panicked(Phase::FaultPath),
        true,
        false,
    );
}

fn eio(after: u64) -> WriteOptions {
    WriteOptions {
        fail_after_bytes: Some((after, libc::EIO)),
        ..WriteOptions::default()
    }
}

/// The disk fails under a worker's write from guest RAM.
fn worker_write_fails() {
    fault_case_with(
        FaultInjection::default(),
        TEST_BUDGET,
        &eio(CHUNK_SIZE),
        Expect::Write(Phase::Worker, libc::EIO),
        false,
        false,
    );
}

/// No staging pool: the fault path writes the chunk itself, and the disk
/// fails under it. The writer is released all the same.
fn fault_path_write_fails() {
    fault_case_with(
        FaultInjection {
            hold_workers_until_fault_copies: Some(1),
            ..FaultInjection::default()
        },
        0,
        &eio(0),
        Expect::Write(Phase::FaultPath, libc::EIO),
        true,
        false,
    );
}

fn worker_failure() {
    fault_case(
        FaultInjection {
            fail_worker_copy_at: Some(0),
            ..FaultInjection::default()
        },
        Expect::Injected(Phase::Worker),
        false,
        false,
    );
}

fn fault_handler_failure() {
    fault_case(
        FaultInjection {
            fail_fault_path_at: Some(0),
            hold_workers_until_fault_copies: Some(1),
            ..FaultInjection::default()
        },
        Expect::Injected(Phase::FaultPath),
        true,
        false,
    );
}

fn sync_phase_failure() {
    fault_case(
        FaultInjection {
            fail_sync: true,
            ..FaultInjection::default()
        },
        Expect::Injected(Phase::Sync),
        true,
        false,
    );
}

fn cancel_mid_copy() {
    fault_case(
        FaultInjection {
            hold_workers_until_fault_copies: Some(1000),
            ..FaultInjection::default()
        },
        Expect::Cancelled,
        true,
        true,
    );
}

/// A real allocation failure, not a simulated one: with the address-space
/// limit just above what the process maps, the staging pool's mmap in `arm`
/// fails with ENOMEM. The snapshot goes on without a pool (every fault
/// writes its chunk itself) and is exact; the next one gets its pool. The
/// harness is single-threaded, so the limit touches nothing else.
fn staging_pool_mmap_enomem() {
    let before = counts();
    {
        let mem = Mem::new(16, 0, 16, 5);
        let ws = Writers::start(&mem, 2);
        ws.run_for(5_000);
        let eng = engine_budget(Strategy::AsyncFork, 2, 64 << 20, FaultInjection::default());
        let vm_size = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmSize:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmSize")
            * 1024;
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let sink = Sink::new(&mem);
        // SAFETY: plain getrlimit/setrlimit on this process with valid
        // pointers; the old limit is restored below.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_AS, &mut old), 0);
            let tight = libc::rlimit {
                // Room for threads and small allocations, not for a
                // 64 MiB pool.
                rlim_cur: vm_size + (16 << 20),
                rlim_max: old.rlim_max,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &tight), 0);
        }
        let armed = arm(&eng, &mem, &sink);
        // SAFETY: as above.
        unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &old), 0) };
        armed.expect("arm goes on without a pool");
        ws.pause();
        let reference = mem.reference();
        begin(&eng, &mem, &sink).expect("begin");
        ws.anywhere.store(true, Ordering::SeqCst);
        ws.resume();
        eng.start_copy().expect("start");
        ws.run_for(20_000);
        let snap = eng.wait().expect("snapshot");
        let img = sink.commit(&snap);
        compare(&snap, &img, &reference);
        assert_eq!(snap.metrics().staging_bytes, 0, "{:?}", snap.metrics());

        let next = next_snapshot_is_exact(&eng, &mem, ws, true);
        assert!(next.metrics().staging_bytes <= 32 * CHUNK_SIZE);
        assert_eq!(
            eng.config()
                .staging
                .wait_filled(std::time::Duration::from_secs(60)),
            32 * CHUNK_SIZE,
            "the next snapshot got its pool"
        );
    }
    assert_eq!(counts(), before, "(threads, fds) leaked");
}

/// Many failures in a row leak nothing either (a leak of one fd per
/// failure would hide in a single case's noise, not in twenty).
fn repeated_failures_leak_nothing() {
    let before = counts();
    {
        let mem = Mem::new(4, 2, 2, 9);
        for i in 0..20 {
            let injection = match i % 4 {
                0 => FaultInjection {
                    panic_worker_copy_at: Some(0),
                    ..FaultInjection::default()
                },
                1 => FaultInjection {
                    panic_fault_path_at: Some(0),
                    ..FaultInjection::default()
                },
                2 => FaultInjection {
                    fail_worker_copy_at: Some(1),
                    ..FaultInjection::default()
                },
                _ => FaultInjection {
                    fail_sync: true,
                    ..FaultInjection::default()
                },
            };
            let eng = engine_with(Strategy::AsyncFork, 2, injection);
            // Every other round the disk fails too.
            let sink = if i % 2 == 0 {
                Sink::new(&mem)
            } else {
                Sink::with(&mem, &eio(4096))
            };
            if begin(&eng, &mem, &sink).is_ok() {
                if i % 4 == 1 {
                    // The fault path's first save panics.
                    mem.write(64, 1);
                }
                eng.wait().expect_err("injected");
            }
            assert_eq!(mem.wp_pages(), 0);
            sink.abandon();
        }
        let reference = mem.reference();
        let eng = engine_with(Strategy::AsyncFork, 2, FaultInjection::default());
        let sink = Sink::new(&mem);
        begin(&eng, &mem, &sink).expect("begin");
        let snap = eng.wait().expect("snapshot");
        let img = sink.commit(&snap);
        compare(&snap, &img, &reference);
    }
    assert_eq!(counts(), before, "(threads, fds) leaked");
}

type Case = (&'static str, fn());

const CASES: &[Case] = &[
    ("worker_panic", worker_panic),
    ("fault_path_panic", fault_path_panic),
    ("worker_write_fails", worker_write_fails),
    ("fault_path_write_fails", fault_path_write_fails),
    ("worker_failure", worker_failure),
    ("fault_handler_failure", fault_handler_failure),
    ("sync_phase_failure", sync_phase_failure),
    ("cancel_mid_copy", cancel_mid_copy),
    ("staging_pool_mmap_enomem", staging_pool_mmap_enomem),
    (
        "repeated_failures_leak_nothing",
        repeated_failures_leak_nothing,
    ),
];

fn main() {
    // Injected panics are expected: keep their messages out of the output,
    // report every other panic as usual.
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if !msg.starts_with("injected ") {
            default(info);
        }
    }));
    // Options cargo passes to every test binary (--test-threads, --nocapture,
    // ...) do not apply; a plain argument filters cases by substring.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in CASES {
            println!("{name}: test");
        }
        return;
    }
    let mut failed = Vec::new();
    let selected: Vec<&Case> = CASES
        .iter()
        .filter(|(name, _)| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", selected.len());
    for (name, case) in selected.iter().copied() {
        let ok = std::panic::catch_unwind(AssertUnwindSafe(case)).is_ok();
        println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            failed.push(*name);
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        selected.len() - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        std::process::exit(1);
    }
}
