//! The core invariant for every strategy: the snapshot is the memory at
//! `begin()`, bit for bit, under writers or idle, with holes for
//! never-touched chunks; sync-wp's per-page protection; copiers that wait
//! for `start_copy`; and a supervisor placed on `background_cpus`.

use std::sync::atomic::Ordering;

use crate::common::*;
use snapvm_snapshot::{Engine, Error, FaultInjection, Strategy, CHUNK_SIZE, PAGE_SIZE};

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
