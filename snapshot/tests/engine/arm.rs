//! Arming ahead of the pause (`arm`, then `begin`): exact under load,
//! refused twice, released by `disarm` or by a `begin` on other regions,
//! rolled back when the sync phase fails.

use std::sync::atomic::Ordering;

use crate::common::*;
use snapvm_snapshot::{Engine, Error, FaultInjection, Phase, CHUNK_SIZE};

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
