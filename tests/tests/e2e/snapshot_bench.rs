//! `snapvm-bench snapshot`: the guest's own stall across a snapshot's pause
//! is found in its gap log and is consistent with what the VMM measured.

use snapvm_tests::paths::snapvm_bench_bin;
use snapvm_tests::process::run;
use std::time::Duration;

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing or not a number: {v}"))
}

#[test]
fn guest_stall_across_the_pause_contains_the_held_part_of_the_pause() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let out = run(
        &snapvm_bench_bin(),
        &[
            "snapshot",
            "--memory",
            "256M",
            "--modes",
            "async-fork,stop-the-world",
            "--baseline-ms",
            "200",
            "--dir",
            dir,
        ],
        Duration::from_secs(240),
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    let rows: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(rows.len(), 2, "{out:?}");
    for row in &rows {
        let stall = num(row, "guest_stall_at_fork_us");
        let split = &row["guest_stall_at_fork_before_after_us"];
        let (before, after) = (
            split[0].as_f64().expect("before"),
            split[1].as_f64().expect("after"),
        );
        assert!((before + after - stall).abs() < 0.5, "{row}");
        // The vCPUs were held while the state was captured and the engine
        // began (for stop-the-world: copied everything), so the guest's
        // gap across the pause cannot be shorter than that.
        let sync = &row["metrics"]["sync_us"];
        let held = num(sync, "state_capture") + num(sync, "begin");
        assert!(stall >= held, "stall {stall} µs < held {held} µs: {row}");
        // The whole window's largest gap includes this one.
        assert!(num(row, "guest_pause_us") >= stall - 0.5, "{row}");
    }
    // Nothing left behind in the directory.
    assert_eq!(std::fs::read_dir(dir).unwrap().count(), 0);
}
