//! Failures and cancellation roll back: the error names its phase (sync,
//! worker, fault path, a failed write, a full disk), writers keep going
//! with their data, no protection is left, and the next snapshot is exact.

use std::sync::atomic::Ordering;

use crate::common::*;
use snapvm_snapshot::{
    Error, FaultInjection, PersistError, Phase, Strategy, WriteOptions, CHUNK_SIZE,
};

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
