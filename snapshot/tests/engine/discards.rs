//! Memory discarded during or between snapshots: the discard hook copies
//! a chunk first, and successive snapshots follow what became zero.

use std::sync::atomic::Ordering;

use crate::common::*;
use snapvm_snapshot::{FaultInjection, Strategy, CHUNK_SIZE};

#[test]
fn discard_hook_copies_first() {
    let mem = Mem::new(4, 0, 0, 11);
    let reference = mem.reference();
    let eng = engine(
        1,
        FaultInjection {
            hold_workers_until_fault_copies: Some(1),
            ..FaultInjection::default()
        },
    );
    let sink = Sink::new(&mem);
    begin(&eng, &mem, &sink).expect("begin");
    eng.start_copy().expect("start");
    let gpa = mem.region().guest_addr + CHUNK_SIZE;
    eng.before_discard(gpa, CHUNK_SIZE);
    // SAFETY: discarding a range of our own mapping (chunk 1).
    let rc = unsafe { libc::madvise(mem.base.add(CHUNK).cast(), CHUNK, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    // A discarded page reads zero (via the MISSING path while in flight).
    assert_eq!(mem.read(CHUNK + 8), 0);
    let snap = eng.wait().expect("snapshot");
    let img = sink.commit(&snap);
    compare(&snap, &img, &reference);
    assert_eq!(snap.metrics().chunks_by_hook, 1);
}

/// One engine, three snapshots under writers, memory discarded between
/// them: each image is exact where memory became zero since (a discarded
/// chunk is a hole, a chunk that lost every other page holds zeros there)
/// and where it is still never-touched.
fn successive_snapshots_follow_discards(strategy: Strategy) {
    let mem = Mem::new(6, 4, 6, 21);
    let eng = engine_with(strategy, 2, FaultInjection::default());
    for round in 0..3 {
        if round > 0 {
            // Chunk 1 becomes a hole, chunk 2 loses every other page.
            // SAFETY: discarding ranges of our own mapping, no writer runs.
            unsafe {
                assert_eq!(
                    libc::madvise(mem.base.add(CHUNK).cast(), CHUNK, libc::MADV_DONTNEED),
                    0
                );
                for p in (0..CHUNK / PAGE).step_by(2) {
                    let at = mem.base.add(2 * CHUNK + p * PAGE);
                    assert_eq!(libc::madvise(at.cast(), PAGE, libc::MADV_DONTNEED), 0);
                }
            }
        }
        let ws = Writers::start(&mem, 2);
        ws.run_for(5_000);
        ws.anywhere.store(true, Ordering::SeqCst);
        exact_snapshot_under(&eng, &mem, &ws, true, 20_000);
        ws.stop_and_check();
    }
}

#[test]
fn successive_snapshots_follow_discards_bit_exact_async_fork() {
    successive_snapshots_follow_discards(Strategy::AsyncFork);
}

#[test]
fn successive_snapshots_follow_discards_bit_exact_stop_the_world() {
    successive_snapshots_follow_discards(Strategy::StopTheWorld);
}

#[test]
fn successive_snapshots_follow_discards_bit_exact_sync_wp() {
    successive_snapshots_follow_discards(Strategy::SyncWp);
}
