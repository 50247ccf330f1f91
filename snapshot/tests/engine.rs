//! The engine on plain memory: writer threads stand in for vCPUs.
//!
//! These tests need root and userfaultfd (as in CI). If the engine cannot be
//! created they FAIL with the reason: a skipped snapshot test hides a broken
//! machine.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use snapshot::{
    Engine, Error, FaultInjection, Phase, PrepareControl, Region, Strategy, CHUNK_SIZE, PAGE_SIZE,
};

/// Copy units per 2 MiB chunk for a strategy.
fn units_per_chunk(strategy: Strategy) -> u64 {
    match strategy {
        Strategy::SyncWp => CHUNK_SIZE / PAGE_SIZE,
        _ => 1,
    }
}

/// The invariant under load, for every engine strategy: snapshot == memory
/// at begin(), bit for bit.
fn snapshot_under_load(strategy: Strategy, workers: usize) {
    let mem = Mem::new(24, 8, 32, 42 + workers as u64);
    let ws = Writers::start(&mem, 3);
    ws.run_for(20_000);
    ws.pause();
    let reference = mem.reference();
    let eng = engine_with(
        strategy,
        workers,
        FaultInjection {
            // Workers wait for the four deterministic fault-path copies below.
            hold_workers_until_fault_copies: Some(4),
            ..FaultInjection::default()
        },
    );
    // SAFETY: `mem` outlives the snapshot (wait() below).
    let sync = unsafe { eng.begin(&[mem.region()]) }.expect("begin");

    // Deterministic coverage of each path, writers still paused and workers
    // held until these four fault-path copies are done (stop-the-world has
    // finished copying already: these are plain writes there):
    eng.before_write(0x1_0000_0000 + 5 * CHUNK as u64, 16); // VMM hook
    mem.write(5 * CHUNK, 0xCCCC);
    let untouched = mem.touched_len; // first never-touched chunk
    mem.write(untouched + 5 * PAGE, 0xAAAA); // missing fault (write)
    std::hint::black_box(mem.read(untouched + 3 * CHUNK + PAGE)); // missing fault (read)
    mem.write(2 * CHUNK + 8 * 13, 0xBBBB); // WP fault on a populated chunk

    ws.anywhere.store(true, Ordering::SeqCst);
    ws.resume();
    ws.run_for(50_000);
    let units = 64 * units_per_chunk(strategy);
    match eng.progress() {
        Some(p) => assert_eq!(p.chunks_total as u64, units),
        None => assert_eq!(strategy, Strategy::StopTheWorld),
    }
    let snap = eng.wait().expect("snapshot");
    ws.run_for(10_000);
    ws.stop_and_check();

    compare(&snap, &reference);
    let m = snap.metrics();
    assert_eq!(
        m.chunks_by_workers + m.chunks_by_fault_path + m.chunks_by_hook,
        units,
        "{m:?}"
    );
    assert_eq!(m.chunks_total, 64);
    if strategy != Strategy::StopTheWorld {
        assert!(m.chunks_by_fault_path >= 3, "{m:?}");
        assert!(m.chunks_by_hook >= 1, "{m:?}");
        assert!(m.missing_faults >= 2 && m.wp_faults >= 1, "{m:?}");
    }
    assert!(m.zero_chunks >= 30, "never-touched chunks are holes: {m:?}");
    assert!(m.peak_extra_memory <= 34 * CHUNK_SIZE);
    assert_eq!(mem.wp_pages(), 0, "protection left behind");
    assert!(sync.total >= sync.write_protect);
    assert!(!eng.in_progress());
}

#[test]
fn snapshot_bit_exact_1_worker() {
    snapshot_under_load(Strategy::AsyncFork, 1);
}

#[test]
fn snapshot_bit_exact_2_workers() {
    snapshot_under_load(Strategy::AsyncFork, 2);
}

#[test]
fn snapshot_bit_exact_4_workers() {
    snapshot_under_load(Strategy::AsyncFork, 4);
}

#[test]
fn snapshot_bit_exact_stop_the_world() {
    snapshot_under_load(Strategy::StopTheWorld, 2);
}

#[test]
fn snapshot_bit_exact_sync_wp() {
    snapshot_under_load(Strategy::SyncWp, 1);
}

/// Workers alone (no writers): everything copied by workers, holes flagged.
fn snapshot_idle_memory(strategy: Strategy) {
    let mem = Mem::new(3, 2, 3, 7);
    let reference = mem.reference();
    let eng = engine_with(strategy, 2, FaultInjection::default());
    // SAFETY: `mem` outlives the snapshot.
    unsafe { eng.begin(&[mem.region()]) }.expect("begin");
    let snap = eng.wait().expect("snapshot");
    compare(&snap, &reference);
    assert_eq!(
        snap.metrics().chunks_by_workers,
        8 * units_per_chunk(strategy)
    );
    assert_eq!(
        snap.zero_chunks(),
        &[false, false, false, false, false, true, true, true]
    );
    assert_eq!(snap.metrics().zero_chunks, 3);
    // Untouched chunks were not even populated by the snapshot.
    assert_eq!(mem.reference(), reference);
}

#[test]
fn snapshot_idle_memory_async_fork() {
    snapshot_idle_memory(Strategy::AsyncFork);
}

#[test]
fn snapshot_idle_memory_stop_the_world() {
    snapshot_idle_memory(Strategy::StopTheWorld);
}

#[test]
fn snapshot_idle_memory_sync_wp() {
    snapshot_idle_memory(Strategy::SyncWp);
}

#[test]
fn sync_wp_protects_every_page_in_begin() {
    let mem = Mem::new(2, 0, 0, 3);
    let eng = engine_with(
        Strategy::SyncWp,
        1,
        FaultInjection {
            hold_workers_until_fault_copies: Some(1000),
            ..FaultInjection::default()
        },
    );
    // SAFETY: `mem` outlives the snapshot.
    unsafe { eng.begin(&[mem.region()]) }.expect("begin");
    assert_eq!(mem.wp_pages(), 2 * CHUNK / PAGE);
    // A write fault copies exactly one page and unprotects only it.
    mem.write(CHUNK + 3 * PAGE, 1);
    assert_eq!(mem.wp_pages(), 2 * CHUNK / PAGE - 1);
    eng.cancel().expect("cancel");
    assert!(matches!(eng.wait(), Err(Error::Cancelled)));
    assert_eq!(mem.wp_pages(), 0);
}

#[test]
fn stop_the_world_failure_leaves_nothing_and_next_succeeds() {
    let mem = Mem::new(4, 0, 2, 13);
    let reference = mem.reference();
    let eng = engine_with(
        Strategy::StopTheWorld,
        2,
        FaultInjection {
            fail_worker_copy_at: Some(2),
            ..FaultInjection::default()
        },
    );
    // SAFETY: `mem` outlives the snapshot.
    let err = unsafe { eng.begin(&[mem.region()]) }.expect_err("injected");
    assert!(
        matches!(
            err,
            Error::Injected {
                phase: Phase::Worker,
                ..
            }
        ),
        "{err}"
    );
    assert!(!eng.in_progress());
    assert!(matches!(eng.wait(), Err(Error::NoSnapshot)));
    let eng = engine_with(Strategy::StopTheWorld, 2, FaultInjection::default());
    // SAFETY: as above.
    unsafe { eng.begin(&[mem.region()]) }.expect("begin");
    assert!(eng.in_progress());
    // SAFETY: as above.
    let again = unsafe { eng.begin(&[mem.region()]) }.expect_err("uncollected");
    assert!(matches!(again, Error::SnapshotInProgress));
    compare(&eng.wait().expect("snapshot"), &reference);
}

#[test]
fn fork_strategy_is_the_vmms_job() {
    let err = Engine::new(snapshot::Config {
        strategy: Strategy::Fork,
        ..snapshot::Config::default()
    })
    .expect_err("refused");
    assert_eq!(
        err.to_string(),
        "invalid configuration: the fork strategy runs in the VMM (process fork), not in the engine"
    );
    for s in [
        Strategy::AsyncFork,
        Strategy::StopTheWorld,
        Strategy::SyncWp,
        Strategy::Fork,
    ] {
        assert_eq!(Strategy::from_name(s.name()), Some(s));
    }
}

/// Rollback checks common to every failure: the error names its phase,
/// writers kept going with their data intact, no protection left, and the
/// next snapshot succeeds.
fn rollback_case(injection: FaultInjection, expect_phase: Option<Phase>, cancel: bool) {
    rollback_case_with(Strategy::AsyncFork, injection, expect_phase, cancel, true)
}

/// `writers_during_copy: false` keeps the writer threads paused until the
/// snapshot has failed: with them running, the fault path can copy every
/// chunk before a worker gets a core (seen on a loaded 2-core CI host), and
/// a worker-side failure would never be reached.
fn rollback_case_with(
    strategy: Strategy,
    injection: FaultInjection,
    expect_phase: Option<Phase>,
    cancel: bool,
    writers_during_copy: bool,
) {
    let mem = Mem::new(8, 4, 4, 99);
    let ws = Writers::start(&mem, 2);
    ws.run_for(5_000);
    ws.pause();
    let eng = engine_with(strategy, 2, injection);
    // SAFETY: `mem` outlives the snapshot.
    let begun = unsafe { eng.begin(&[mem.region()]) };
    ws.anywhere.store(true, Ordering::SeqCst);
    if writers_during_copy {
        ws.resume();
    }
    let err = match begun {
        Err(e) => {
            assert!(!eng.in_progress(), "sync failure leaves nothing behind");
            e
        }
        Ok(_) => {
            // Fault-path coverage: a write to a protected chunk.
            mem.write(3 * CHUNK + 64, 1);
            if cancel {
                eng.cancel().expect("cancel");
            }
            if writers_during_copy {
                ws.run_for(10_000);
            }
            eng.wait().expect_err("snapshot must fail")
        }
    };
    if !writers_during_copy {
        ws.resume();
    }
    match (expect_phase, &err) {
        (Some(p), Error::Injected { phase, .. }) => assert_eq!(*phase, p, "{err}"),
        (None, Error::Cancelled) => {}
        _ => panic!("unexpected error: {err}"),
    }
    // Writers are not blocked: they keep making progress with the handler gone.
    ws.run_for(10_000);
    assert_eq!(mem.wp_pages(), 0, "protection left behind");
    assert!(!eng.in_progress());

    // The next snapshot (no injection) succeeds and is exact.
    let eng = engine_with(strategy, 2, FaultInjection::default());
    next_snapshot_is_exact(&eng, &mem, ws, false);
}

#[test]
fn rollback_sync_phase() {
    rollback_case(
        FaultInjection {
            fail_sync: true,
            ..FaultInjection::default()
        },
        Some(Phase::Sync),
        false,
    );
}

#[test]
fn rollback_worker_failure() {
    rollback_case_with(
        Strategy::AsyncFork,
        FaultInjection {
            fail_worker_copy_at: Some(0),
            ..FaultInjection::default()
        },
        Some(Phase::Worker),
        false,
        false,
    );
}

#[test]
fn rollback_fault_path_failure() {
    rollback_case(
        FaultInjection {
            fail_fault_path_at: Some(0),
            // Workers wait until the fault path has acted (here: failed).
            hold_workers_until_fault_copies: Some(1),
            ..FaultInjection::default()
        },
        Some(Phase::FaultPath),
        false,
    );
}

#[test]
fn rollback_on_cancel() {
    rollback_case(
        FaultInjection {
            // Keep the snapshot in flight until cancel() (no fault-path copy
            // can reach 1000 chunks here).
            hold_workers_until_fault_copies: Some(1000),
            ..FaultInjection::default()
        },
        None,
        true,
    );
}

#[test]
fn rollback_worker_failure_sync_wp() {
    rollback_case_with(
        Strategy::SyncWp,
        FaultInjection {
            fail_worker_copy_at: Some(100),
            ..FaultInjection::default()
        },
        Some(Phase::Worker),
        false,
        false,
    );
}

#[test]
fn rollback_fault_path_failure_sync_wp() {
    rollback_case_with(
        Strategy::SyncWp,
        FaultInjection {
            fail_fault_path_at: Some(0),
            hold_workers_until_fault_copies: Some(1),
            ..FaultInjection::default()
        },
        Some(Phase::FaultPath),
        false,
        true,
    );
}

#[test]
fn second_begin_refused_while_in_flight() {
    let mem = Mem::new(2, 0, 2, 5);
    let eng = engine(
        1,
        FaultInjection {
            hold_workers_until_fault_copies: Some(1000),
            ..FaultInjection::default()
        },
    );
    // SAFETY: `mem` outlives the snapshot.
    unsafe { eng.begin(&[mem.region()]) }.expect("begin");
    // SAFETY: as above.
    let err = unsafe { eng.begin(&[mem.region()]) }.expect_err("second begin");
    assert!(matches!(err, Error::SnapshotInProgress));
    assert_eq!(err.to_string(), "snapshot in progress");
    eng.cancel().expect("cancel");
    assert!(matches!(eng.wait(), Err(Error::Cancelled)));
    assert!(matches!(eng.wait(), Err(Error::NoSnapshot)));
    assert_eq!(mem.wp_pages(), 0);
}

#[test]
fn hooks_are_noops_without_snapshot() {
    let eng = engine(1, FaultInjection::default());
    eng.before_write(0, 4096);
    eng.before_discard(0, 4096);
    assert!(eng.progress().is_none());
    assert!(matches!(eng.cancel(), Err(Error::NoSnapshot)));
}

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
    // SAFETY: `mem` outlives the snapshot.
    unsafe { eng.begin(&[mem.region()]) }.expect("begin");
    let gpa = mem.region().guest_addr + CHUNK_SIZE;
    eng.before_discard(gpa, CHUNK_SIZE);
    // SAFETY: discarding a range of our own mapping (chunk 1).
    let rc = unsafe { libc::madvise(mem.base.add(CHUNK).cast(), CHUNK, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    // A discarded page reads zero (via the MISSING path while in flight).
    assert_eq!(mem.read(CHUNK + 8), 0);
    let snap = eng.wait().expect("snapshot");
    compare(&snap, &reference);
    assert_eq!(snap.metrics().chunks_by_hook, 1);
}

#[test]
fn invalid_regions_rejected_before_anything_happens() {
    let eng = engine(1, FaultInjection::default());
    // SAFETY: rejected before any memory is touched.
    let err = unsafe { eng.begin(&[Region::new(0, 4096, CHUNK_SIZE)]) }.expect_err("unaligned");
    assert!(matches!(err, Error::InvalidRegion { .. }), "{err}");
    assert!(!eng.in_progress());
}

fn engine_keeping(strategy: Strategy) -> Engine {
    Engine::new(snapshot::Config {
        workers: 2,
        strategy,
        keep_destination: true,
        ..snapshot::Config::default()
    })
    .expect("engine (needs root and userfaultfd)")
}

#[test]
fn kept_destination_is_reused_bit_exact_async_fork() {
    kept_destination_is_reused_bit_exact(Strategy::AsyncFork);
}

#[test]
fn kept_destination_is_reused_bit_exact_stop_the_world() {
    kept_destination_is_reused_bit_exact(Strategy::StopTheWorld);
}

#[test]
fn kept_destination_is_reused_bit_exact_sync_wp() {
    kept_destination_is_reused_bit_exact(Strategy::SyncWp);
}

/// A kept destination holds the previous snapshot's bytes: the next snapshot
/// must still be exact where the source has since become zero (a discarded
/// chunk, discarded pages of a chunk) and where it is still never-touched.
fn kept_destination_is_reused_bit_exact(strategy: Strategy) {
    let mem = Mem::new(6, 4, 6, 21);
    let eng = engine_keeping(strategy);
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
        ws.pause();
        let reference = mem.reference();
        // SAFETY: `mem` outlives the snapshot.
        let sync = unsafe { eng.begin(&[mem.region()]) }.expect("begin");
        ws.anywhere.store(true, Ordering::SeqCst);
        ws.resume();
        ws.run_for(20_000);
        let snap = eng.wait().expect("snapshot");
        ws.stop_and_check();
        compare(&snap, &reference);
        assert!(sync.total >= sync.dest_alloc);
        drop(snap);
        assert_eq!(
            eng.kept_destination_bytes(),
            mem.len as u64,
            "round {round}"
        );
    }
    eng.release_destination();
    assert_eq!(eng.kept_destination_bytes(), 0);

    // Without writers: a chunk copied last time and discarded since is a
    // hole now, and reads zero although the kept memory held its bytes.
    let mem = Mem::new(4, 0, 0, 22);
    for round in 0..2 {
        if round == 1 {
            // SAFETY: discarding chunk 1 of our own mapping, no writer runs.
            let rc =
                unsafe { libc::madvise(mem.base.add(CHUNK).cast(), CHUNK, libc::MADV_DONTNEED) };
            assert_eq!(rc, 0);
        }
        let reference = mem.reference();
        // SAFETY: `mem` outlives the snapshot.
        unsafe { eng.begin(&[mem.region()]) }.expect("begin");
        let snap = eng.wait().expect("snapshot");
        compare(&snap, &reference);
        assert_eq!(snap.chunk_is_zero(1), round == 1);
        let hole = snap.image()[CHUNK..2 * CHUNK].iter().all(|&b| b == 0);
        assert_eq!(hole, round == 1);
    }
}

/// Preparation fails (ENOMEM injected): an error, nothing kept, the running
/// VM untouched, and snapshots work as without preparation.
#[test]
fn prepare_failure_keeps_nothing_and_snapshot_works() {
    let mem = Mem::new(4, 2, 2, 5);
    let reference = mem.reference();
    let eng = engine_with(
        Strategy::AsyncFork,
        2,
        FaultInjection {
            fail_prepare_at: Some(3),
            ..FaultInjection::default()
        },
    );
    let err = eng
        .prepare_destination(mem.len as u64)
        .expect_err("injected");
    assert!(
        matches!(
            err,
            Error::Memory {
                phase: Phase::Prepare,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(eng.kept_destination_bytes(), 0);
    assert!(!eng.in_progress());
    // SAFETY: `mem` outlives the snapshot.
    unsafe { eng.begin(&[mem.region()]) }.expect("begin");
    let again = eng.prepare_destination(mem.len as u64);
    assert!(matches!(again, Err(Error::SnapshotInProgress)));
    compare(&eng.wait().expect("snapshot"), &reference);
    assert_eq!(mem.reference(), reference);
}

/// A prepared destination survives a sync-phase failure (it was never
/// written) and is used, then given back (keep_destination off), by the
/// next snapshot.
#[test]
fn prepared_destination_survives_sync_failure() {
    let mem = Mem::new(3, 2, 3, 8);
    let reference = mem.reference();
    let eng = engine_with(
        Strategy::AsyncFork,
        1,
        FaultInjection {
            fail_sync: true,
            ..FaultInjection::default()
        },
    );
    eng.prepare_destination(mem.len as u64).expect("prepare");
    assert_eq!(eng.kept_destination_bytes(), mem.len as u64);
    // SAFETY: `mem` outlives the snapshot.
    unsafe { eng.begin(&[mem.region()]) }.expect_err("injected");
    assert_eq!(eng.kept_destination_bytes(), mem.len as u64);

    for strategy in [Strategy::AsyncFork, Strategy::StopTheWorld] {
        let eng = engine_with(strategy, 2, FaultInjection::default());
        eng.prepare_destination(mem.len as u64).expect("prepare");
        // SAFETY: as above.
        unsafe { eng.begin(&[mem.region()]) }.expect("begin");
        assert_eq!(eng.kept_destination_bytes(), 0, "in use");
        let snap = eng.wait().expect("snapshot");
        compare(&snap, &reference);
        drop(snap);
        assert_eq!(
            eng.kept_destination_bytes(),
            0,
            "not kept without keep_destination"
        );
    }
}

/// Preparing for a snapshot populates the destination of exactly the chunks
/// that hold data (full and partial, not untouched ones); the snapshot that
/// follows copies into it without staging, stays bit-exact although the
/// writers also fill untouched chunks after the preparation, and gives the
/// memory back afterwards (no keep_destination).
#[test]
fn prepare_for_populates_chunks_with_data_and_the_snapshot_stays_exact() {
    let mem = Mem::new(3, 2, 4, 41);
    let eng = engine_with(Strategy::AsyncFork, 2, FaultInjection::default());
    let control = PrepareControl::default();
    eng.prepare_for(&[mem.region()], &control).expect("prepare");
    assert_eq!(control.total.load(Ordering::SeqCst), 5 * CHUNK_SIZE);
    assert_eq!(control.done.load(Ordering::SeqCst), 5 * CHUNK_SIZE);
    assert_eq!(eng.kept_destination_bytes(), mem.len as u64);

    let ws = Writers::start(&mem, 2);
    ws.anywhere.store(true, Ordering::SeqCst);
    ws.run_for(5_000);
    let snap = next_snapshot_is_exact(&eng, &mem, ws, false);
    assert_eq!(snap.metrics().chunks_staged, 0, "prepared memory is warm");
    drop(snap);
    assert_eq!(eng.kept_destination_bytes(), 0, "not kept");
}

/// A preparation that fails (ENOMEM injected at its second chunk) or is
/// cancelled keeps nothing, says why, and the next snapshot is exact.
#[test]
fn prepare_for_failure_or_cancel_keeps_nothing() {
    let mem = Mem::new(3, 1, 2, 43);
    let reference = mem.reference();
    let eng = engine_with(
        Strategy::AsyncFork,
        2,
        FaultInjection {
            fail_prepare_at: Some(1),
            ..FaultInjection::default()
        },
    );
    let control = PrepareControl::default();
    let err = eng
        .prepare_for(&[mem.region()], &control)
        .expect_err("injected");
    assert!(
        matches!(
            err,
            Error::Memory {
                phase: Phase::Prepare,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(control.done.load(Ordering::SeqCst), CHUNK_SIZE);
    assert_eq!(eng.kept_destination_bytes(), 0);

    let eng = engine_with(Strategy::AsyncFork, 2, FaultInjection::default());
    let control = PrepareControl::default();
    control.cancel.store(true, Ordering::SeqCst);
    let err = eng
        .prepare_for(&[mem.region()], &control)
        .expect_err("cancelled");
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert_eq!(control.done.load(Ordering::SeqCst), 0);
    assert_eq!(eng.kept_destination_bytes(), 0);
    // SAFETY: `mem` outlives the snapshot.
    unsafe { eng.begin(&[mem.region()]) }.expect("begin");
    compare(&eng.wait().expect("snapshot"), &reference);
    assert_eq!(mem.reference(), reference);
}

/// `begin` only sets the copy up: no copier runs until `start_copy` (the
/// caller resumes its writers first), and writes meanwhile are copied by
/// the fault path. The snapshot is exact either way.
#[test]
fn copiers_start_only_with_start_copy() {
    let mem = Mem::new(6, 2, 2, 47);
    let eng = engine_with(Strategy::AsyncFork, 2, FaultInjection::default());
    let ws = Writers::start(&mem, 2);
    ws.run_for(2_000);
    ws.pause();
    let reference = mem.reference();
    // SAFETY: `mem` outlives the snapshot.
    unsafe { eng.begin(&[mem.region()]) }.expect("begin");
    std::thread::sleep(std::time::Duration::from_millis(50));
    let p = eng.progress().expect("in flight");
    assert_eq!(p.chunks_done, 0, "a copier ran before start_copy: {p:?}");
    ws.resume();
    ws.run_for(5_000);
    eng.start_copy().expect("start");
    eng.start_copy().expect("a second call does nothing");
    let snap = eng.wait().expect("snapshot");
    ws.stop_and_check();
    compare(&snap, &reference);
    assert!(snap.metrics().chunks_by_workers > 0);
}

/// `arm` with the writers running, then the pause: writes between the two
/// are let through and their chunks protected again in `begin`, so the
/// snapshot is still the memory at `begin()`, bit for bit.
#[test]
fn armed_snapshot_bit_exact_under_load() {
    for workers in [1, 2] {
        let mem = Mem::new(24, 8, 32, 70 + workers as u64);
        let ws = Writers::start(&mem, 3);
        ws.anywhere.store(true, Ordering::SeqCst);
        ws.run_for(20_000);
        // Armed in 3-chunk steps (8 of them here), as 8 GiB is in 256 MiB
        // ones: the writers run between steps.
        let eng = Engine::new(snapshot::Config {
            workers,
            arm_step: 3 * CHUNK_SIZE,
            ..snapshot::Config::default()
        })
        .expect("engine (needs root and userfaultfd)");
        // SAFETY: `mem` outlives the snapshot (wait() below).
        unsafe { eng.arm(&[mem.region()]) }.expect("arm");
        assert!(eng.in_progress(), "armed counts as in flight");
        ws.run_for(50_000);
        ws.pause();
        let reference = mem.reference();
        // SAFETY: as above.
        let sync = unsafe { eng.begin(&[mem.region()]) }.expect("begin");
        assert!(sync.reprotected_chunks > 0, "writes while armed: {sync:?}");
        assert!(sync.reprotected_chunks <= 64, "{sync:?}");
        // 8 steps, with a (sleep-guaranteed) 100 µs gap between each two.
        assert!(
            sync.arm >= std::time::Duration::from_micros(700),
            "{sync:?}"
        );
        ws.resume();
        ws.run_for(50_000);
        let snap = eng.wait().expect("snapshot");
        ws.run_for(10_000);
        ws.stop_and_check();
        compare(&snap, &reference);
        assert_eq!(mem.wp_pages(), 0, "protection left behind");
        assert!(!eng.in_progress());
    }
}

#[test]
fn arm_twice_is_refused_and_disarm_leaves_nothing() {
    let mem = Mem::new(8, 4, 8, 9);
    let ws = Writers::start(&mem, 2);
    ws.anywhere.store(true, Ordering::SeqCst);
    let eng = engine(2, FaultInjection::default());
    // SAFETY: `mem` outlives the engine's use of it (disarm / wait below).
    unsafe { eng.arm(&[mem.region()]) }.expect("arm");
    // SAFETY: as above.
    let err = unsafe { eng.arm(&[mem.region()]) }.expect_err("second arm");
    assert!(matches!(err, Error::SnapshotInProgress), "{err}");
    ws.run_for(20_000);
    eng.disarm();
    assert!(!eng.in_progress());
    assert_eq!(mem.wp_pages(), 0, "disarm lifts every protection");
    ws.run_for(20_000);

    // The next snapshot, armed or not, is exact.
    ws.pause();
    let reference = mem.reference();
    // SAFETY: as above.
    unsafe { eng.begin(&[mem.region()]) }.expect("begin");
    ws.resume();
    let snap = eng.wait().expect("snapshot");
    compare(&snap, &reference);
    ws.stop_and_check();
    assert_eq!(mem.wp_pages(), 0);
}

#[test]
fn armed_begin_with_other_regions_takes_the_full_path() {
    let mem = Mem::new(4, 2, 4, 11);
    let other = Mem::new(4, 0, 4, 12);
    let eng = engine(1, FaultInjection::default());
    // SAFETY: both outlive the engine's use of them.
    unsafe { eng.arm(&[mem.region()]) }.expect("arm");
    let reference = other.reference();
    // SAFETY: as above.
    let sync = unsafe { eng.begin(&[other.region()]) }.expect("begin");
    assert_eq!(sync.reprotected_chunks, 0);
    assert_eq!(mem.wp_pages(), 0, "the armed regions were released");
    let snap = eng.wait().expect("snapshot");
    compare(&snap, &reference);
}

#[test]
fn armed_sync_failure_rolls_back_and_next_succeeds() {
    let mem = Mem::new(8, 4, 8, 13);
    let ws = Writers::start(&mem, 2);
    let eng = engine(
        2,
        FaultInjection {
            fail_sync: true,
            ..FaultInjection::default()
        },
    );
    // SAFETY: `mem` outlives the engine's use of it.
    unsafe { eng.arm(&[mem.region()]) }.expect("arm");
    ws.run_for(20_000);
    ws.pause();
    // SAFETY: as above.
    let err = unsafe { eng.begin(&[mem.region()]) }.expect_err("injected");
    assert!(
        matches!(
            err,
            Error::Injected {
                phase: Phase::Sync,
                ..
            }
        ),
        "{err}"
    );
    assert!(!eng.in_progress());
    assert_eq!(mem.wp_pages(), 0);
    ws.resume();
    ws.run_for(20_000);
    ws.stop_and_check();
}

/// An armed engine with `slots` staging slots (staging.rs).
fn staging_engine(workers: usize, slots: usize, keep: bool, injection: FaultInjection) -> Engine {
    Engine::new(snapshot::Config {
        workers,
        staging: std::sync::Arc::new(snapshot::StagingSlots::new(slots)),
        keep_destination: keep,
        injection,
        ..snapshot::Config::default()
    })
    .expect("engine (needs root and userfaultfd)")
}

/// Fault-path copies into a fresh destination land in warm slots and are
/// moved to the destination later; the image is exact either way, with as
/// many slots as faults or fewer (the rest copy directly), and a kept (warm)
/// destination does not use them.
#[test]
fn staged_fault_copies_are_bit_exact() {
    const FAULTED: [usize; 5] = [1, 4, 7, 10, 13];
    for slots in [16, 2] {
        let mem = Mem::new(24, 8, 32, 80 + slots as u64);
        let ws = Writers::start(&mem, 3);
        ws.run_for(20_000);
        ws.pause();
        let eng = staging_engine(
            2,
            slots,
            true,
            FaultInjection {
                // Workers wait for the five fault-path copies below, so no
                // slot is drained before they all happened.
                hold_workers_until_fault_copies: Some(FAULTED.len() as u64),
                ..FaultInjection::default()
            },
        );
        for round in 0..2 {
            // SAFETY: `mem` outlives the snapshot (wait() below).
            unsafe { eng.arm(&[mem.region()]) }.expect("arm");
            let reference = mem.reference();
            // SAFETY: as above.
            unsafe { eng.begin(&[mem.region()]) }.expect("begin");
            for c in FAULTED {
                mem.write(c * CHUNK + 8 * c, 0xD000 + c as u64);
            }
            ws.anywhere.store(true, Ordering::SeqCst);
            ws.resume();
            ws.run_for(30_000);
            let snap = eng.wait().expect("snapshot");
            ws.pause();
            compare(&snap, &reference);
            let m = snap.metrics();
            assert!(m.chunks_by_fault_path >= FAULTED.len() as u64, "{m:?}");
            if round == 0 {
                // Fresh destination: every fault copy staged while a slot
                // was free (the workers drain none before the fifth).
                assert!(m.chunks_staged >= FAULTED.len().min(slots) as u64, "{m:?}");
                assert!(m.chunks_staged <= m.chunks_by_fault_path, "{m:?}");
            } else {
                assert_eq!(m.chunks_staged, 0, "kept destination is warm: {m:?}");
            }
            assert_eq!(mem.wp_pages(), 0, "protection left behind");
            drop(snap);
        }
        ws.resume();
        ws.stop_and_check();
        assert!(!eng.in_progress());
    }
}

/// Moving a staged chunk fails (its destination cannot be allocated): the
/// snapshot rolls back like any worker failure and the next one is exact.
#[test]
fn staged_chunk_drain_failure_rolls_back() {
    let mem = Mem::new(8, 4, 4, 91);
    let ws = Writers::start(&mem, 2);
    ws.run_for(5_000);
    ws.pause();
    let eng = staging_engine(
        1,
        4,
        false,
        FaultInjection {
            // The fault-path copy goes to a slot (no populate), so the
            // single worker's first populate is the drain's.
            fail_populate_at: Some(0),
            hold_workers_until_fault_copies: Some(1),
            ..FaultInjection::default()
        },
    );
    // SAFETY: `mem` outlives the snapshot (wait() below).
    unsafe { eng.arm(&[mem.region()]) }.expect("arm");
    // SAFETY: as above.
    unsafe { eng.begin(&[mem.region()]) }.expect("begin");
    mem.write(3 * CHUNK + 64, 1);
    let err = eng.wait().expect_err("the drain's populate fails");
    match &err {
        Error::Memory { phase, op, .. } => {
            assert_eq!(*phase, Phase::Worker, "{err}");
            assert_eq!(*op, "populate destination (injected)", "{err}");
        }
        _ => panic!("unexpected error: {err}"),
    }
    assert_eq!(mem.wp_pages(), 0, "protection left behind");
    ws.anywhere.store(true, Ordering::SeqCst);
    ws.resume();
    ws.run_for(10_000);

    let eng = staging_engine(1, 4, false, FaultInjection::default());
    next_snapshot_is_exact(&eng, &mem, ws, true);
}

/// `background_cpus` keeps the supervisor (and the copiers it starts,
/// which inherit its affinity) on those CPUs; the snapshot is as exact.
#[test]
fn background_cpus_place_the_supervisor_and_the_snapshot_stays_exact() {
    let allowed = snapshot::CpuSet::allowed().expect("affinity");
    let first: snapshot::CpuSet = allowed
        .to_string()
        .split([',', '-'])
        .next()
        .expect("a CPU")
        .parse()
        .expect("cpu");
    let mem = Mem::new(8, 4, 8, 21);
    let ws = Writers::start(&mem, 2);
    ws.anywhere.store(true, Ordering::SeqCst);
    let eng = Engine::new(snapshot::Config {
        workers: 2,
        background_cpus: Some(first.clone()),
        ..snapshot::Config::default()
    })
    .expect("engine (needs root and userfaultfd)");
    // SAFETY: `mem` outlives the snapshot (wait() below).
    unsafe { eng.arm(&[mem.region()]) }.expect("arm");
    // The standby supervisor pins itself as it starts: give it a moment.
    let want = first.to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !snapshot::cpus::thread_cpu_lists(std::process::id(), "snap-supervisor").contains(&want) {
        assert!(
            std::time::Instant::now() < deadline,
            "no supervisor on CPUs {want}: {:?}",
            snapshot::cpus::thread_cpu_lists(std::process::id(), "snap-supervisor")
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    ws.run_for(20_000);
    // Armed above: the snapshot it takes is as exact as an unplaced one.
    next_snapshot_is_exact(&eng, &mem, ws, false);
    assert_eq!(mem.wp_pages(), 0);
}
