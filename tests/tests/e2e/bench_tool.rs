//! The issue #6 benchmark tool, smoke-sized: tiny guests, one or two modes,
//! a second of load each, QEMU and native Redis included. Checks the JSON
//! it writes (fields present, values sane), the Markdown section and the
//! plots; never timings. Needs KVM, QEMU and redis-server: without them the
//! tool's runs fail and so does this test.

use std::time::Duration;

use serde_json::Value;
use snapvm_tests::paths::{snapvm_bench_bin, snapvm_bin};
use snapvm_tests::process::run;

fn num(v: &Value, path: &str) -> f64 {
    let mut x = v;
    for p in path.split('.') {
        x = &x[p];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number in {v}"))
}

/// p50 ≤ p99 ≤ p99.9 ≤ max, and something was measured.
fn check_summary(v: &Value, what: &str) {
    assert!(num(v, "count") > 0.0, "{what}: no samples: {v}");
    let (p50, p99, p999, max) = (
        num(v, "p50_us"),
        num(v, "p99_us"),
        num(v, "p999_us"),
        num(v, "max_us"),
    );
    assert!(
        p50 > 0.0 && p50 <= p99 && p99 <= p999 && p999 <= max,
        "{what}: quantiles out of order: {v}"
    );
}

#[test]
fn smoke_run_writes_json_markdown_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let md = dir.path().join("BENCH.md");
    std::fs::write(&md, "# Benchmarks\n\nkept text\n").unwrap();
    let snapvm = snapvm_bin();
    let args = [
        "--snapvm",
        snapvm.to_str().unwrap(),
        "--sizes",
        "256M",
        "--hugepages",
        "on",
        "--modes",
        "async-fork:1,stop-the-world",
        "--rate",
        "400",
        "--conns",
        "2",
        "--warmup-s",
        "0.3",
        "--baseline-s",
        "1",
        "--tail-s",
        "0.3",
        "--bucket-ms",
        "100",
        "--guest-bench-size",
        "256M",
        "--guest-bench-modes",
        "async-fork:1",
        "--work-dir",
        dir.path().to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "--json-name",
        "smoke.json",
        "--markdown",
        md.to_str().unwrap(),
        // snapvm gets --snapshot-memory-budget.
        "--memory-budget",
        "16M",
    ];
    let done = run(&snapvm_bench_bin(), &args, Duration::from_secs(600));
    assert_eq!(done.code(), Some(0), "{done:?}");

    let text = std::fs::read_to_string(out.join("smoke.json")).unwrap();
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{text}");
    assert!(r["machine"]["cores"].as_u64().unwrap() >= 1);
    assert_eq!(r["config"]["memory_budget"], "16M", "{text}");

    let kv = r["kv"].as_array().unwrap();
    let modes: Vec<&str> = kv.iter().map(|k| k["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["async-fork", "stop-the-world"]);
    for k in kv {
        let mode = k["mode"].as_str().unwrap();
        assert_eq!(k["memory_mib"], 256);
        assert_eq!(k["hugepages"], true);
        assert_eq!(k["metrics"]["strategy"], mode, "{k}");
        assert!(num(k, "keys") > 0.0);
        check_summary(&k["windows"]["baseline_latency"], "baseline");
        check_summary(&k["windows"]["snapshot_latency"], "snapshot");
        assert_eq!(num(k, "windows.errors"), 0.0, "{k}");
        assert_eq!(num(k, "windows.unanswered"), 0.0, "{k}");
        assert!(num(k, "windows.sent") > 0.0);
        let w = &k["windows"]["snapshot"];
        assert!(num(w, "end_ns") > num(w, "start_ns"), "{w}");
        assert!(num(k, "sync_pause_us") > 0.0, "{k}");
        assert!(
            num(k, "snapshot_total_us") >= num(k, "sync_pause_us"),
            "{k}"
        );
        assert!(num(k, "probe_snapshot.max_loop_gap_us") > 0.0, "{k}");
        // snapvm holds the populated guest RAM at least.
        assert!(num(k, "peak_rss_bytes") > 64.0 * 1048576.0, "{k}");
        assert!(!k["windows"]["series"].as_array().unwrap().is_empty());
    }

    let redis = r["redis"].as_array().unwrap();
    assert_eq!(redis.len(), 1, "{text}");
    assert_eq!(redis[0]["bgsave_status"], "ok");
    assert!(num(&redis[0], "latest_fork_usec") >= 0.0);
    check_summary(&redis[0]["windows"]["snapshot_latency"], "redis snapshot");

    let guest = r["guest_bench"].as_array().unwrap();
    let names: Vec<(String, String)> = guest
        .iter()
        .map(|g| {
            (
                g["vmm"].as_str().unwrap().to_string(),
                g["mode"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("snapvm".to_string(), "async-fork x1".to_string()),
            ("qemu".to_string(), "background-snapshot".to_string()),
            ("qemu".to_string(), "stop-and-save".to_string()),
        ]
    );
    for g in guest {
        for w in ["baseline", "snapshot"] {
            assert!(num(&g[w], "windows") >= 1.0, "{w}: {g}");
            assert!(num(&g[w], "ops_per_s") >= 0.0, "{w}: {g}");
            assert!(num(&g[w], "max_stall_us") > 0.0, "{w}: {g}");
        }
        let (without, during) = (
            num(&g["baseline"], "ops_per_s"),
            num(&g["snapshot"], "ops_per_s"),
        );
        assert!(without > 0.0, "{g}");
        if g["mode"] == "stop-and-save" {
            // Paused from the start of the window to its end: the window
            // that held the pause must not read as work done during it.
            assert!(during < without / 10.0, "{g}");
        } else {
            assert!(during > 0.0, "{g}");
        }
        assert!(num(g, "snapshot_total_us") > 0.0, "{g}");
        if g["vmm"] == "snapvm" {
            assert_eq!(
                g["details"]["memory_budget"],
                16 << 20,
                "the budget reaches it: {g}"
            );
        }
    }

    let targets = r["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 6);
    // Measured here: the p99 ratio, stop-the-world, #17's two load targets
    // and the QEMU comparison; the max-latency ratio against fork needs
    // fork on 4 KiB pages, not in the smoke set.
    assert!(targets[0]["met"].is_boolean(), "{}", targets[0]);
    assert!(targets[1]["met"].is_null(), "{}", targets[1]);
    assert!(targets[2]["met"].is_boolean(), "{}", targets[2]);
    assert!(
        targets[3]["name"]
            .as_str()
            .unwrap()
            .contains("equally long window"),
        "{}",
        targets[3]
    );
    assert!(targets[3]["met"].is_boolean(), "{}", targets[3]);
    assert!(
        targets[3]["detail"]
            .as_str()
            .unwrap()
            .contains("the median of "),
        "{}",
        targets[3]
    );
    assert!(
        targets[4]["name"]
            .as_str()
            .unwrap()
            .starts_with("mode=bench keeps"),
        "{}",
        targets[4]
    );
    assert!(targets[4]["met"].is_boolean(), "{}", targets[4]);
    assert!(targets[5]["met"].is_boolean(), "{}", targets[5]);

    let md_text = std::fs::read_to_string(&md).unwrap();
    assert!(
        md_text.starts_with("# Benchmarks\n\nkept text\n"),
        "{md_text}"
    );
    assert!(md_text.contains("<!-- snapvm-bench:begin"), "{md_text}");
    assert!(md_text.contains("<!-- snapvm-bench:end -->"), "{md_text}");
    assert!(
        md_text.contains("| 256 MiB | THP | async-fork x1 |"),
        "{md_text}"
    );
    assert!(
        md_text.contains("| qemu | background-snapshot |"),
        "{md_text}"
    );

    for png in [
        "latency-256m-thp.png",
        "guest-bench.png",
        "pause-vs-size.png",
        "max-latency-vs-size.png",
    ] {
        let bytes = std::fs::read(out.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{png} is not a PNG"
        );
    }
    // Snapshots are deleted after each run: only the outputs remain.
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut left = left;
    left.sort();
    assert_eq!(left, ["BENCH.md", "out"], "left behind: {left:?}");
}
