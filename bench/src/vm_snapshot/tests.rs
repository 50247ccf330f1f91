use super::*;

#[test]
fn the_window_splits_only_once_the_pause_gap_is_logged_or_too_late() {
    use snapvm_guest::abi::GapRecord;
    let mut gaps = ProbeGaps {
        tsc_khz: 1_000_000,
        ..Default::default()
    };
    let now = Instant::now();
    assert!(!pause_gap_closed(&gaps, Some(5_000), now));
    // A gap logged before the pause does not close it.
    gaps.records.push(GapRecord {
        start_tsc: 1_000,
        end_tsc: 2_000,
    });
    assert!(!pause_gap_closed(&gaps, Some(5_000), now));
    gaps.records.push(GapRecord {
        start_tsc: 4_000,
        end_tsc: 9_000,
    });
    assert!(pause_gap_closed(&gaps, Some(5_000), now));
    // No TSC captured, or waited long enough: split anyway.
    assert!(pause_gap_closed(&gaps, None, now));
    let long_ago = now - SPLIT_WAIT - Duration::from_millis(1);
    assert!(pause_gap_closed(
        &ProbeGaps::default(),
        Some(5_000),
        long_ago
    ));
}

fn params(modes: Vec<Strategy>, workers: Vec<usize>) -> Params {
    Params {
        memory_size: 1 << 30,
        vcpus: 1,
        modes,
        workers,
        backing: PageBacking::Huge,
        dir: "/tmp".into(),
        populate_fraction: 0.75,
        warm: false,
        memory_budget: snapvm_snapshot::DEFAULT_BUDGET,
        baseline: Duration::from_secs(1),
        priorities: vec![BackgroundPriority::Idle, BackgroundPriority::Normal],
        cpus: None,
    }
}

#[test]
fn plan_expands_workers_for_async_fork_and_priorities_but_for_fork() {
    let p = params(
        vec![
            Strategy::AsyncFork,
            Strategy::Fork,
            Strategy::StopTheWorld,
            Strategy::SyncWp,
        ],
        vec![1, 2, 4],
    );
    use BackgroundPriority::{Idle, Normal};
    assert_eq!(
        plan(&p),
        vec![
            (Strategy::AsyncFork, 1, Idle),
            (Strategy::AsyncFork, 1, Normal),
            (Strategy::AsyncFork, 2, Idle),
            (Strategy::AsyncFork, 2, Normal),
            (Strategy::AsyncFork, 4, Idle),
            (Strategy::AsyncFork, 4, Normal),
            (Strategy::Fork, 1, Normal),
            (Strategy::StopTheWorld, STOP_THE_WORLD_WORKERS, Idle),
            (Strategy::StopTheWorld, STOP_THE_WORLD_WORKERS, Normal),
            (Strategy::SyncWp, 1, Idle),
            (Strategy::SyncWp, 1, Normal),
        ]
    );
}

#[test]
fn this_process_rss_and_its_peak_are_read() {
    let me = std::process::id();
    let peak = crate::proc::peak_rss(me).expect("VmHWM");
    let now = crate::proc::status_kb(me, "VmRSS").expect("VmRSS");
    // Both are kernel counters updated at different moments: only their
    // presence and units (bytes, not kB) are checked.
    assert!(peak > 1 << 20 && now > 1 << 20, "peak {peak} now {now}");
}
