//! `mode=bench`: the guest drives its own KV store and prints one JSON line
//! per time window, under snapvm and (same ELF) under QEMU microvm.

use std::time::Duration;

use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{run, Finished};
use snapvm_tests::qemu;

const CMDLINE: &str = "mode=bench keys=20000 value_size=32 duration_s=2 window_ms=500 dist=zipfian";
const FIELDS: [&str; 7] = [
    "t_ms",
    "ops",
    "p50_us",
    "p99_us",
    "p999_us",
    "max_us",
    "max_stall_us",
];

/// Checks the JSON window lines and the summary of a finished run.
fn check_windows(out: &Finished) {
    assert!(
        out.stdout.contains("bench: populated 20000 keys in "),
        "{out:?}"
    );
    let windows: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
        .collect();
    assert!(windows.len() >= 3, "want >= 3 windows: {out:?}");
    let mut last_t = 0;
    for w in &windows {
        for f in FIELDS {
            assert!(w[f].is_number(), "{f} missing in {w}");
        }
        let t = w["t_ms"].as_u64().expect("t_ms integer");
        assert!(t > last_t, "t_ms not increasing: {w}");
        last_t = t;
        assert!(w["ops"].as_u64().expect("ops integer") > 0, "{w}");
        let q = |f: &str| w[f].as_f64().expect("number");
        assert!(
            q("p50_us") <= q("p99_us")
                && q("p99_us") <= q("p999_us")
                && q("p999_us") <= q("max_us"),
            "quantiles out of order: {w}"
        );
        assert!(q("max_stall_us") > 0.0, "{w}");
    }
    let done = out
        .stdout
        .lines()
        .find(|l| l.starts_with("bench: done "))
        .unwrap_or_else(|| panic!("no summary: {out:?}"));
    assert!(done.contains(" errors=0 "), "{done}");
}

#[test]
fn bench_mode_prints_windows_and_exits_0() {
    let out = run(
        &snapvm_bin(),
        &["run", "--cmdline", CMDLINE],
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    check_windows(&out);
}

#[test]
fn bench_mode_bad_option_is_an_error() {
    let out = run(
        &snapvm_bin(),
        &["run", "--cmdline", "mode=bench write_ratio=7"],
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stdout
            .contains("bench: error: bad value for bench option 'write_ratio'"),
        "{out:?}"
    );
    assert!(!out.stdout.contains("bench: populated"), "{out:?}");

    let out = run(
        &snapvm_bin(),
        &["run", "--cmdline", "mode=bench keyz=10"],
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stdout
            .contains("bench: error: unknown bench option 'keyz'"),
        "{out:?}"
    );
}

#[test]
fn bench_mode_runs_under_qemu_microvm() {
    let out = qemu::run_bundled_guest("512M", CMDLINE, Duration::from_secs(60));
    // The guest powers off with status 0.
    assert_eq!(out.code(), Some(qemu::exit_code_for(0)), "{out:?}");
    assert!(out.stdout.contains("hypervisor=kvm"), "{out:?}");
    check_windows(&out);
}
