//! What the engine refuses or ignores: the fork strategy (the VMM's job),
//! a second snapshot while one is in flight, hooks with no snapshot, and
//! invalid regions or images before anything is touched.

use crate::common::*;
use snapvm_snapshot::{Engine, Error, FaultInjection, Region, Strategy, CHUNK_SIZE};

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
