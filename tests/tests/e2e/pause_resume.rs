//! The pause/resume primitive that snapshots stand on: 1000 cycles with two
//! vCPUs spinning in ring 3; every counter must keep advancing
//! (`snapvm-bench pause`).

use snapvm_tests::paths::snapvm_bench_bin;
use snapvm_tests::process::run;
use std::time::Duration;

fn bench_pause(vcpus: u32, cycles: u32) -> serde_json::Value {
    let out = run(
        &snapvm_bench_bin(),
        &[
            "pause",
            "--vcpus",
            &vcpus.to_string(),
            "--cycles",
            &cycles.to_string(),
        ],
        Duration::from_secs(240),
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("bench output is not JSON ({e}): {out:?}"))
}

#[test]
fn thousand_pause_resume_cycles_with_two_vcpus() {
    let report = bench_pause(2, 1000);
    assert_eq!(report["vcpus"], 2, "{report}");
    assert_eq!(report["cycles"], 1000, "{report}");
    for key in ["pause_us", "resume_us", "round_trip_us"] {
        let max = report[key]["max"]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}.max missing: {report}"));
        assert!(max > 0.0, "{key}.max = {max}: {report}");
    }
}

#[test]
fn pause_resume_with_one_vcpu() {
    let report = bench_pause(1, 50);
    assert_eq!(report["vcpus"], 1, "{report}");
    assert_eq!(report["cycles"], 50, "{report}");
}
