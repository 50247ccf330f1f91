//! `PUT|GET|DELETE /snapshot/schedule` and `snapvm snapshot schedule`: a
//! schedule started over the API takes snapshots into its directory (what
//! `--snapshot-every` does), shows in `GET /snapshots` and `/metrics`,
//! refuses bad bodies and a VM-less snapvm, stops on DELETE, and its
//! `latest` restores with the keys written before it.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::run;
use snapvm_tests::redis_cli::{first_reply, redis};
use snapvm_tests::snapvm::restore_kv;

use super::harness::*;

/// Complete snapshots (`snap-*` holding a state file) in `dir`.
fn complete(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("snap-"))
                .filter(|e| e.path().join("state.bin").exists())
                .count()
        })
        .unwrap_or(0)
}

/// Polls the schedule until it has taken `n` snapshots.
fn wait_done(sock: &Path, n: u64) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let s = get(sock, "/snapshot/schedule").json();
        if s["done"].as_u64().unwrap_or(0) >= n {
            return s;
        }
        assert!(Instant::now() < deadline, "schedule stuck: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_schedule_set_over_the_api_snapshots_until_stopped_and_its_latest_restores() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let dir = tmp.path().join("sched");
    let (mut vm, sock, port) = start_kv(tmp.path(), &[]);

    get(&sock, "/snapshot/schedule").assert_fault(404, "no snapshot schedule is running");
    req(&sock, "DELETE", "/snapshot/schedule", None)
        .assert_fault(404, "no snapshot schedule is running");
    put(
        &sock,
        "/snapshot/schedule",
        json!({"snapshot_dir": "rel", "every": "1s"}),
    )
    .assert_fault(400, "snapshot_dir 'rel' must be an absolute path");
    put(
        &sock,
        "/snapshot/schedule",
        json!({"snapshot_dir": dir, "every": "soon"}),
    )
    .assert_fault(
        400,
        "every: invalid duration 'soon': expected number at 0 (examples: 30s, 5m, 1h)",
    );
    put(
        &sock,
        "/snapshot/schedule",
        json!({"snapshot_dir": dir, "every": "1s", "keep": 0}),
    )
    .assert_fault(400, "keep 0: expected 1..=10000");
    let r = put(
        &sock,
        "/snapshot/schedule",
        json!({"snapshot_dir": dir, "every": "1s", "bogus": 1}),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(!dir.exists(), "a refused schedule creates nothing");

    for i in 0..500 {
        assert_eq!(
            redis(port, &["SET", &format!("before{i}"), "v"]).as_deref(),
            Some("OK")
        );
    }
    let r = put(
        &sock,
        "/snapshot/schedule",
        json!({"snapshot_dir": dir, "every": "200ms", "keep": 2, "full_every": 3}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"snapshot_dir": dir, "every_ms": 200, "keep": 2, "full_every": 3,
               "done": 0, "failed": 0, "chain_length": 0})
    );
    // Full, then diffs: the fourth is full again (full_every 3).
    let s = wait_done(&sock, 4);
    assert_eq!(s["failed"], 0, "{s}");
    let list = get(&sock, "/snapshots").json();
    assert_eq!(list["schedule"]["snapshot_dir"], json!(dir), "{list}");
    let metrics = get(&sock, "/metrics").body;
    assert!(
        metric(
            &metrics,
            "snapvm_schedule_snapshots_total{outcome=\"done\"}"
        ) >= 4.0,
        "{metrics}"
    );

    // The CLI shows the same schedule.
    let out = run(
        &snapvm_bin(),
        &["snapshot", "schedule", "--api-sock", sock.to_str().unwrap()],
        T,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    let shown: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(shown["every_ms"], 200, "{shown}");

    // Replaced from the CLI, then stopped from it. A replace asked while a
    // snapshot is under way is refused: retry.
    let replace = || {
        run(
            &snapvm_bin(),
            &[
                "snapshot",
                "schedule",
                "--api-sock",
                sock.to_str().unwrap(),
                "--dir",
                dir.to_str().unwrap(),
                "--every",
                "150ms",
                "--keep",
                "2",
                "--full-every",
                "2",
            ],
            T,
        )
    };
    let mut out = replace();
    let deadline = Instant::now() + T;
    while out.code() != Some(0) {
        assert!(
            out.stderr.contains("the schedule is taking a snapshot in"),
            "{out:?}"
        );
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(30));
        out = replace();
    }
    let replaced: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(replaced["every_ms"], 150, "{replaced}");
    assert_eq!(replaced["done"], 0, "{replaced}");
    for i in 0..500 {
        assert_eq!(
            redis(port, &["SET", &format!("later{i}"), "v"]).as_deref(),
            Some("OK")
        );
    }
    // Two more snapshots: the second begun after the last write.
    let d = get(&sock, "/snapshot/schedule").json()["done"]
        .as_u64()
        .unwrap();
    wait_done(&sock, d + 2);
    let out = run(
        &snapvm_bin(),
        &[
            "snapshot",
            "schedule",
            "--api-sock",
            sock.to_str().unwrap(),
            "--stop",
        ],
        T,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    get(&sock, "/snapshot/schedule").assert_fault(404, "no snapshot schedule is running");
    // Stopped means no more snapshots (one under way may still land).
    std::thread::sleep(Duration::from_millis(400));
    let n = complete(&dir);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(complete(&dir), n, "snapshots after the stop");
    // keep 2, chains of at most 2: the newest two and a parent at most.
    assert!((2..=3).contains(&n), "{n} kept with keep 2 (and parents)");
    // With the schedule gone, SIGUSR1 takes no snapshot and says so (the
    // schedule had made it ask for snapshots).
    // SAFETY: kill(2) on our own child's pid has no memory-safety concerns.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGUSR1) }, 0);
    vm.wait_for_stderr("SIGUSR1 ignored: nothing takes snapshots on it", T);
    assert_eq!(
        complete(&dir),
        n,
        "a snapshot after SIGUSR1 with no schedule"
    );
    shutdown(vm, &sock);

    let (restored, port) = restore_kv(&dir.join("latest"), Path::new("/dev/null"), &[]);
    assert_eq!(first_reply(&restored, port, &["PING"], T), "PONG");
    assert_eq!(redis(port, &["DBSIZE"]).as_deref(), Some("1000"));
    assert_eq!(redis(port, &["EXISTS", "later499"]).as_deref(), Some("1"));
    drop(restored);
}

#[test]
fn a_snapvm_without_a_running_vm_refuses_a_schedule() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let (waiting, sock, _) = start_waiting(tmp.path(), "sched");
    put(
        &sock,
        "/snapshot/schedule",
        json!({"snapshot_dir": tmp.path().join("s"), "every": "1s"}),
    )
    .assert_fault(409, "no running VM to snapshot: load and resume one first");
    shutdown(waiting, &sock);
}
