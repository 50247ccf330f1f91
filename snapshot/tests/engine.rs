//! The engine on plain memory: writer threads stand in for vCPUs.
//!
//! These tests need root and userfaultfd (as in CI). If the engine cannot be
//! created they FAIL with the reason: a skipped snapshot test hides a broken
//! machine.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use snapvm_snapshot::{
    Engine, Error, FaultInjection, PersistError, Phase, Region, Strategy, WriteOptions, CHUNK_SIZE,
    PAGE_SIZE,
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
    let sink = Sink::new(&mem);
    let sync = begin(&eng, &mem, &sink).expect("begin");
    if strategy != Strategy::StopTheWorld {
        eng.start_copy().expect("start");
    }

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

    let img = sink.commit(&snap);
    compare(&snap, &img, &reference);
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
    assert!(m.staging_peak_bytes <= TEST_BUDGET, "{m:?}");
    assert!(m.bytes_written <= 34 * CHUNK_SIZE, "{m:?}");
    assert!(m.direct_io, "a disk file system takes O_DIRECT");
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
    let sink = Sink::new(&mem);
    begin(&eng, &mem, &sink).expect("begin");
    let snap = eng.wait().expect("snapshot");
    let img = sink.commit(&snap);
    compare(&snap, &img, &reference);
    assert_eq!(
        snap.metrics().chunks_by_workers,
        8 * units_per_chunk(strategy)
    );
    let zero: Vec<bool> = snap.chunks().iter().map(|c| c.zero).collect();
    assert_eq!(zero, &[false, false, false, false, false, true, true, true]);
    assert_eq!(snap.metrics().zero_chunks, 3);
    // Only populated pages were written: 3 full chunks, and of the 2
    // partial ones every third page or (THP backs it) all of them.
    let partial_pages = (CHUNK / PAGE).div_ceil(3) as u64;
    let written = snap.metrics().bytes_written;
    assert!(
        written >= 3 * CHUNK_SIZE + 2 * partial_pages * PAGE_SIZE && written <= 5 * CHUNK_SIZE,
        "{written}"
    );
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
    let sink = Sink::new(&mem);
    begin(&eng, &mem, &sink).expect("begin");
    eng.start_copy().expect("start");
    assert_eq!(mem.wp_pages(), 2 * CHUNK / PAGE);
    // A write fault saves exactly one page and unprotects only it.
    mem.write(CHUNK + 3 * PAGE, 1);
    assert_eq!(mem.wp_pages(), 2 * CHUNK / PAGE - 1);
    eng.cancel().expect("cancel");
    assert!(matches!(eng.wait(), Err(Error::Cancelled)));
    assert_eq!(mem.wp_pages(), 0);
    sink.abandon();
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
    let sink = Sink::new(&mem);
    let err = begin(&eng, &mem, &sink).expect_err("injected");
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
    sink.abandon();
    let eng = engine_with(Strategy::StopTheWorld, 2, FaultInjection::default());
    let sink = Sink::new(&mem);
    begin(&eng, &mem, &sink).expect("begin");
    assert!(eng.in_progress());
    let again = begin(&eng, &mem, &sink).expect_err("uncollected");
    assert!(matches!(again, Error::SnapshotInProgress));
    let snap = eng.wait().expect("snapshot");
    let img = sink.commit(&snap);
    compare(&snap, &img, &reference);
}

#[test]
fn fork_strategy_is_the_vmms_job() {
    let err = Engine::new(snapvm_snapshot::Config {
        strategy: Strategy::Fork,
        ..snapvm_snapshot::Config::default()
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
    let sink = Sink::new(&mem);
    let begun = begin(&eng, &mem, &sink);
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
            eng.start_copy().expect("start");
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
    sink.abandon();

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
            // Sync-wp's worker saves a chunk's pages together.
            fail_worker_copy_at: Some(5),
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
    let sink = Sink::new(&mem);
    begin(&eng, &mem, &sink).expect("begin");
    let err = begin(&eng, &mem, &sink).expect_err("second begin");
    assert!(matches!(err, Error::SnapshotInProgress));
    assert_eq!(err.to_string(), "snapshot in progress");
    let err = arm(&eng, &mem, &sink).expect_err("arm while in flight");
    assert!(matches!(err, Error::SnapshotInProgress));
    eng.cancel().expect("cancel");
    assert!(matches!(eng.wait(), Err(Error::Cancelled)));
    assert!(matches!(eng.wait(), Err(Error::NoSnapshot)));
    assert_eq!(mem.wp_pages(), 0);
    sink.abandon();
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

#[test]
fn invalid_regions_rejected_before_anything_happens() {
    let eng = engine(1, FaultInjection::default());
    let mem = Mem::new(1, 0, 0, 1);
    let sink = Sink::new(&mem);
    // SAFETY: rejected before any memory is touched.
    let err = unsafe { eng.begin(&[Region::new(0, 4096, CHUNK_SIZE)], sink.image()) }
        .expect_err("unaligned");
    assert!(matches!(err, Error::InvalidRegion { .. }), "{err}");
    assert!(!eng.in_progress());
    // An image of another size than the regions is refused too.
    let big = Mem::new(2, 0, 0, 1);
    let err = begin(&eng, &big, &sink).expect_err("image too small");
    assert_eq!(
        err.to_string(),
        "invalid configuration: the memory image's length differs from the regions'"
    );
    assert!(!eng.in_progress());
    assert_eq!(big.wp_pages(), 0);
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
    let sink = Sink::new(&mem);
    begin(&eng, &mem, &sink).expect("begin");
    std::thread::sleep(std::time::Duration::from_millis(50));
    let p = eng.progress().expect("in flight");
    assert_eq!(p.chunks_done, 0, "a copier ran before start_copy: {p:?}");
    ws.resume();
    ws.run_for(5_000);
    eng.start_copy().expect("start");
    eng.start_copy().expect("a second call does nothing");
    let snap = eng.wait().expect("snapshot");
    ws.stop_and_check();
    let img = sink.commit(&snap);
    compare(&snap, &img, &reference);
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
        let eng = Engine::new(snapvm_snapshot::Config {
            workers,
            arm_step: 3 * CHUNK_SIZE,
            ..snapvm_snapshot::Config::default()
        })
        .expect("engine (needs root and userfaultfd)");
        let sink = Sink::new(&mem);
        arm(&eng, &mem, &sink).expect("arm");
        assert!(eng.in_progress(), "armed counts as in flight");
        ws.run_for(50_000);
        ws.pause();
        let reference = mem.reference();
        let sync = begin(&eng, &mem, &sink).expect("begin");
        assert!(sync.reprotected_chunks > 0, "writes while armed: {sync:?}");
        assert!(sync.reprotected_chunks <= 64, "{sync:?}");
        // 8 steps, with a (sleep-guaranteed) 100 µs gap between each two.
        assert!(
            sync.arm >= std::time::Duration::from_micros(700),
            "{sync:?}"
        );
        ws.resume();
        eng.start_copy().expect("start");
        ws.run_for(50_000);
        let snap = eng.wait().expect("snapshot");
        ws.run_for(10_000);
        ws.stop_and_check();
        let img = sink.commit(&snap);
        compare(&snap, &img, &reference);
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
    let sink = Sink::new(&mem);
    arm(&eng, &mem, &sink).expect("arm");
    let err = arm(&eng, &mem, &sink).expect_err("second arm");
    assert!(matches!(err, Error::SnapshotInProgress), "{err}");
    ws.run_for(20_000);
    eng.disarm();
    assert!(!eng.in_progress());
    assert_eq!(mem.wp_pages(), 0, "disarm lifts every protection");
    ws.run_for(20_000);

    // The next snapshot, armed or not, is exact.
    ws.pause();
    let reference = mem.reference();
    begin(&eng, &mem, &sink).expect("begin");
    ws.resume();
    let snap = eng.wait().expect("snapshot");
    let img = sink.commit(&snap);
    compare(&snap, &img, &reference);
    ws.stop_and_check();
    assert_eq!(mem.wp_pages(), 0);
}

#[test]
fn armed_begin_with_other_regions_takes_the_full_path() {
    let mem = Mem::new(4, 2, 4, 11);
    let other = Mem::new(4, 0, 4, 12);
    let eng = engine(1, FaultInjection::default());
    let sink = Sink::new(&mem);
    arm(&eng, &mem, &sink).expect("arm");
    let reference = other.reference();
    let other_sink = Sink::new(&other);
    let sync = begin(&eng, &other, &other_sink).expect("begin");
    assert_eq!(sync.reprotected_chunks, 0);
    assert_eq!(mem.wp_pages(), 0, "the armed regions were released");
    let snap = eng.wait().expect("snapshot");
    let img = other_sink.commit(&snap);
    compare(&snap, &img, &reference);
    sink.abandon();
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
    let sink = Sink::new(&mem);
    arm(&eng, &mem, &sink).expect("arm");
    ws.run_for(20_000);
    ws.pause();
    let err = begin(&eng, &mem, &sink).expect_err("injected");
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
    sink.abandon();
    ws.resume();
    ws.run_for(20_000);
    ws.stop_and_check();
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

/// Writing a staged chunk out fails (EIO from the disk): the snapshot rolls
/// back like any worker failure, nothing is left behind, and the next one
/// is exact.
#[test]
fn staged_chunk_write_failure_rolls_back() {
    let mem = Mem::new(8, 4, 4, 91);
    let ws = Writers::start(&mem, 2);
    ws.run_for(5_000);
    ws.pause();
    let eng = engine_with(
        Strategy::AsyncFork,
        1,
        FaultInjection {
            hold_workers_until_fault_copies: Some(1),
            ..FaultInjection::default()
        },
    );
    // The fault-path save goes to a slot (no write), so the first write of
    // the image is the worker's, of that staged chunk.
    let sink = Sink::with(
        &mem,
        &WriteOptions {
            fail_after_bytes: Some((0, libc::EIO)),
            ..WriteOptions::default()
        },
    );
    arm(&eng, &mem, &sink).expect("arm");
    eng.config().staging.fill_now();
    eng.config()
        .staging
        .wait_filled(std::time::Duration::from_secs(60));
    begin(&eng, &mem, &sink).expect("begin");
    eng.start_copy().expect("start");
    mem.write(3 * CHUNK + 64, 1);
    let err = eng.wait().expect_err("the staged chunk's write fails");
    match &err {
        Error::Write {
            phase: Phase::Worker,
            source: PersistError::Io { op, source, .. },
        } => {
            assert_eq!(*op, "write");
            assert_eq!(source.raw_os_error(), Some(libc::EIO));
        }
        _ => panic!("unexpected error: {err:?}"),
    }
    assert!(
        err.to_string().starts_with("worker: write ")
            && err
                .to_string()
                .ends_with("/memory.img: Input/output error (os error 5)"),
        "{err}"
    );
    assert_eq!(mem.wp_pages(), 0, "protection left behind");
    sink.abandon();
    ws.anywhere.store(true, Ordering::SeqCst);
    ws.resume();
    ws.run_for(10_000);

    let eng = engine_with(Strategy::AsyncFork, 1, FaultInjection::default());
    next_snapshot_is_exact(&eng, &mem, ws, true);
}

/// The disk fills up in the middle of the image (ENOSPC), with writers
/// running: rolled back, the error says so, writers keep their data, and
/// the next snapshot is exact.
#[test]
fn disk_full_mid_image_rolls_back() {
    for strategy in [Strategy::AsyncFork, Strategy::SyncWp] {
        let mem = Mem::new(12, 4, 4, 93);
        let ws = Writers::start(&mem, 2);
        ws.anywhere.store(true, Ordering::SeqCst);
        ws.run_for(5_000);
        let eng = engine_with(strategy, 2, FaultInjection::default());
        let sink = Sink::with(
            &mem,
            &WriteOptions {
                fail_after_bytes: Some((3 * CHUNK_SIZE + 4096, libc::ENOSPC)),
                ..WriteOptions::default()
            },
        );
        arm(&eng, &mem, &sink).expect("arm");
        ws.pause();
        begin(&eng, &mem, &sink).expect("begin");
        ws.resume();
        eng.start_copy().expect("start");
        ws.run_for(10_000);
        let err = eng.wait().expect_err("the disk is full");
        assert!(
            matches!(
                &err,
                Error::Write {
                    source: PersistError::NoSpace { .. },
                    ..
                }
            ),
            "{strategy}: {err:?}"
        );
        assert!(
            err.to_string()
                .ends_with("/memory.img: no space left on device"),
            "{err}"
        );
        ws.run_for(10_000);
        assert_eq!(mem.wp_pages(), 0, "protection left behind");
        sink.abandon();
        next_snapshot_is_exact(&eng, &mem, ws, true);
    }
}

/// `background_cpus` keeps the supervisor (and the copiers it starts,
/// which inherit its affinity) on those CPUs; the snapshot is as exact.
#[test]
fn background_cpus_place_the_supervisor_and_the_snapshot_stays_exact() {
    let allowed = snapvm_snapshot::CpuSet::allowed().expect("affinity");
    let first: snapvm_snapshot::CpuSet = allowed
        .to_string()
        .split([',', '-'])
        .next()
        .expect("a CPU")
        .parse()
        .expect("cpu");
    let mem = Mem::new(8, 4, 8, 21);
    let ws = Writers::start(&mem, 2);
    ws.anywhere.store(true, Ordering::SeqCst);
    let eng = Engine::new(snapvm_snapshot::Config {
        workers: 2,
        background_cpus: Some(first.clone()),
        ..snapvm_snapshot::Config::default()
    })
    .expect("engine (needs root and userfaultfd)");
    let sink = Sink::new(&mem);
    arm(&eng, &mem, &sink).expect("arm");
    // The standby supervisor pins itself as it starts: give it a moment.
    let want = first.to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !snapvm_snapshot::cpus::thread_cpu_lists(std::process::id(), "snap-supervisor")
        .contains(&want)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no supervisor on CPUs {want}: {:?}",
            snapvm_snapshot::cpus::thread_cpu_lists(std::process::id(), "snap-supervisor")
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    ws.run_for(20_000);
    // Armed above: the snapshot it takes is as exact as an unplaced one.
    ws.pause();
    let reference = mem.reference();
    begin(&eng, &mem, &sink).expect("begin");
    ws.resume();
    ws.run_for(10_000);
    let snap = eng.wait().expect("snapshot");
    ws.stop_and_check();
    compare(&snap, &sink.commit(&snap), &reference);
    assert_eq!(mem.wp_pages(), 0);
}
