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
//! so there is nothing incomplete to persist or restore.
//!
//! Needs root and userfaultfd, like `engine.rs`: without them every case
//! FAILS with the reason.

mod common;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;

use common::*;
use snapshot::{Error, FaultInjection, Phase, Strategy};

/// Threads and fds of this process.
fn counts() -> (usize, usize) {
    let n = |p: &str| std::fs::read_dir(p).expect(p).count();
    (n("/proc/self/task"), n("/proc/self/fd"))
}

/// What the failed snapshot must report.
enum Expect {
    Injected(Phase),
    Panicked(Phase),
    /// A real allocation error path: `Error::Memory` with ENOMEM and an
    /// operation naming the destination.
    NoMemory(Phase, &'static str),
    Cancelled,
}

fn check_error(err: &Error, expect: &Expect) {
    let ok = match (expect, err) {
        (Expect::Injected(p), Error::Injected { phase, .. }) => phase == p,
        (Expect::Panicked(p), Error::Panicked { phase, what }) => {
            phase == p && what.contains("injected")
        }
        (
            Expect::NoMemory(p, op_part),
            Error::Memory {
                phase, op, source, ..
            },
        ) => phase == p && op.contains(op_part) && source.raw_os_error() == Some(libc::ENOMEM),
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
    let before = counts();
    {
        let mem = Mem::new(8, 4, 4, 77);
        let ws = Writers::start(&mem, 2);
        ws.run_for(5_000);
        ws.pause();
        let eng = engine_with(Strategy::AsyncFork, 2, injection);
        // SAFETY: `mem` outlives the snapshot (wait() below).
        let begun = unsafe { eng.begin(&[mem.region()]) };
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

fn worker_cannot_allocate_snapshot_memory() {
    fault_case(
        FaultInjection {
            fail_populate_at: Some(1),
            ..FaultInjection::default()
        },
        Expect::NoMemory(Phase::Worker, "populate destination"),
        false,
        false,
    );
}

fn fault_path_cannot_allocate_snapshot_memory() {
    fault_case(
        FaultInjection {
            fail_populate_at: Some(0),
            hold_workers_until_fault_copies: Some(1),
            ..FaultInjection::default()
        },
        Expect::NoMemory(Phase::FaultPath, "populate destination"),
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
/// limit just above what the process maps, the destination mmap in the
/// sync phase fails with ENOMEM. The harness is single-threaded, so the
/// limit touches nothing else.
fn destination_mmap_enomem() {
    let before = counts();
    {
        let mem = Mem::new(16, 0, 16, 5);
        let ws = Writers::start(&mem, 2);
        ws.run_for(5_000);
        ws.pause();
        let reference = mem.reference();
        let eng = engine_with(Strategy::AsyncFork, 2, FaultInjection::default());
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
        // SAFETY: plain getrlimit/setrlimit on this process with valid
        // pointers; the old limit is restored below.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_AS, &mut old), 0);
            let tight = libc::rlimit {
                // Room for small allocations, not for a 64 MiB destination.
                rlim_cur: vm_size + (8 << 20),
                rlim_max: old.rlim_max,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &tight), 0);
        }
        // SAFETY: `mem` outlives the snapshot.
        let begun = unsafe { eng.begin(&[mem.region()]) };
        // SAFETY: as above.
        unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &old), 0) };
        let err = begun.expect_err("no address space for the destination");
        check_error(&err, &Expect::NoMemory(Phase::Sync, "mmap destination"));
        assert_eq!(
            err.to_string(),
            format!(
                "sync phase: mmap destination of [0x0, +{:#x}) failed: Cannot allocate memory (os error 12)",
                mem.len
            )
        );
        assert!(!eng.in_progress());
        assert_eq!(mem.wp_pages(), 0);
        // Memory untouched by the failed attempt, and the next one works.
        assert!(
            mem.reference() == reference,
            "memory changed by a failed begin"
        );
        ws.resume();
        ws.run_for(10_000);
        ws.pause();
        let reference = mem.reference();
        // SAFETY: `mem` outlives the snapshot.
        unsafe { eng.begin(&[mem.region()]) }.expect("begin with the limit lifted");
        ws.resume();
        let snap = eng.wait().expect("snapshot");
        ws.stop_and_check();
        compare(&snap, &reference);
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
                    fail_populate_at: Some(0),
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
            // SAFETY: `mem` outlives the snapshot.
            if unsafe { eng.begin(&[mem.region()]) }.is_ok() {
                eng.wait().expect_err("injected");
            }
            assert_eq!(mem.wp_pages(), 0);
        }
        let reference = mem.reference();
        let eng = engine_with(Strategy::AsyncFork, 2, FaultInjection::default());
        // SAFETY: `mem` outlives the snapshot.
        unsafe { eng.begin(&[mem.region()]) }.expect("begin");
        compare(&eng.wait().expect("snapshot"), &reference);
    }
    assert_eq!(counts(), before, "(threads, fds) leaked");
}

type Case = (&'static str, fn());

const CASES: &[Case] = &[
    ("worker_panic", worker_panic),
    ("fault_path_panic", fault_path_panic),
    (
        "worker_cannot_allocate_snapshot_memory",
        worker_cannot_allocate_snapshot_memory,
    ),
    (
        "fault_path_cannot_allocate_snapshot_memory",
        fault_path_cannot_allocate_snapshot_memory,
    ),
    ("worker_failure", worker_failure),
    ("fault_handler_failure", fault_handler_failure),
    ("sync_phase_failure", sync_phase_failure),
    ("cancel_mid_copy", cancel_mid_copy),
    ("destination_mmap_enomem", destination_mmap_enomem),
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
