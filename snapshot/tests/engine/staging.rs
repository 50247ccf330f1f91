//! The staging pool for fault-path saves: exact with no pool, with a pool
//! that fills up, and with a tiny one under full-speed writers.

use std::sync::atomic::Ordering;

use crate::common::*;
use snapvm_snapshot::{FaultInjection, Strategy, CHUNK_SIZE};

/// The staging pool cannot be allocated (ENOMEM injected): the snapshot
/// goes on without it, every fault writing its chunk itself, and is exact.
#[test]
fn snapshot_without_a_staging_pool_is_exact() {
    let mem = Mem::new(8, 4, 8, 31);
    let ws = Writers::start(&mem, 2);
    ws.anywhere.store(true, Ordering::SeqCst);
    ws.run_for(5_000);
    let eng = engine_with(
        Strategy::AsyncFork,
        1,
        FaultInjection {
            fail_staging: true,
            hold_workers_until_fault_copies: Some(3),
            ..FaultInjection::default()
        },
    );
    let snap = exact_snapshot_under(&eng, &mem, &ws, true, 20_000);
    ws.stop_and_check();
    let m = snap.metrics();
    assert_eq!(m.staging_bytes, 0, "{m:?}");
    assert_eq!(m.chunks_staged, 0, "{m:?}");
    assert!(m.chunks_by_fault_path >= 3, "{m:?}");
}

/// Fault-path saves land in the staging pool while it has room and are
/// written out later; with the pool full (or no pool) the fault path writes
/// the chunk itself. The image is exact in every case, and the pool is
/// allocated once for the engine's successive snapshots.
#[test]
fn staged_and_direct_fault_saves_are_bit_exact() {
    const FAULTED: [usize; 5] = [1, 4, 7, 10, 13];
    for slots in [16u64, 2, 0] {
        let mem = Mem::new(24, 8, 32, 80 + slots);
        let ws = Writers::start(&mem, 3);
        ws.run_for(20_000);
        ws.pause();
        let eng = engine_budget(
            Strategy::AsyncFork,
            2,
            slots * CHUNK_SIZE,
            FaultInjection {
                // Workers wait for the five fault-path saves below, so no
                // slot is written out before they all happened.
                hold_workers_until_fault_copies: Some(FAULTED.len() as u64),
                ..FaultInjection::default()
            },
        );
        for round in 0..2 {
            let sink = Sink::new(&mem);
            arm(&eng, &mem, &sink).expect("arm");
            // The pool fills on its own thread once a snapshot's workers
            // run: have it all now, for the count.
            eng.config().staging.fill_now();
            eng.config()
                .staging
                .wait_filled(std::time::Duration::from_secs(60));
            let reference = mem.reference();
            let sync = begin(&eng, &mem, &sink).expect("begin");
            if round == 1 {
                assert!(sync.staging_alloc.is_zero(), "allocated once: {sync:?}");
            }
            eng.start_copy().expect("start");
            for c in FAULTED {
                mem.write(c * CHUNK + 8 * c, 0xD000 + c as u64);
            }
            ws.anywhere.store(true, Ordering::SeqCst);
            ws.resume();
            ws.run_for(30_000);
            let snap = eng.wait().expect("snapshot");
            ws.pause();
            let img = sink.commit(&snap);
            compare(&snap, &img, &reference);
            let m = snap.metrics();
            let n = FAULTED.len() as u64;
            assert!(m.chunks_by_fault_path >= n, "{m:?}");
            // The first five saves: staged while a slot was free (nothing
            // is written out before the fifth), the rest written directly.
            assert!(m.chunks_staged >= n.min(slots), "{m:?}");
            if slots < n {
                assert!(m.direct_fault_writes >= n - slots, "{m:?}");
            }
            assert!(m.staging_peak_bytes <= slots * CHUNK_SIZE, "{m:?}");
            assert_eq!(m.staging_bytes, slots * CHUNK_SIZE, "{m:?}");
            assert_eq!(mem.wp_pages(), 0, "protection left behind");
        }
        ws.resume();
        ws.stop_and_check();
        assert!(!eng.in_progress());
    }
}

/// Writers at full speed over all of memory with a pool of two chunks:
/// most faults find the pool full and write their chunk themselves, and
/// every snapshot is still exact.
#[test]
fn tiny_budget_under_full_speed_writers_is_bit_exact() {
    let mem = Mem::new(24, 8, 16, 61);
    let ws = Writers::start(&mem, 3);
    ws.anywhere.store(true, Ordering::SeqCst);
    ws.run_for(20_000);
    let eng = engine_budget(
        Strategy::AsyncFork,
        2,
        2 * CHUNK_SIZE,
        FaultInjection::default(),
    );
    for _ in 0..3 {
        let snap = exact_snapshot_under(&eng, &mem, &ws, true, 50_000);
        let m = snap.metrics();
        assert!(m.staging_peak_bytes <= 2 * CHUNK_SIZE, "{m:?}");
        assert_eq!(
            m.chunks_by_fault_path + m.chunks_by_workers + m.chunks_by_hook,
            48,
            "{m:?}"
        );
    }
    ws.stop_and_check();
}
