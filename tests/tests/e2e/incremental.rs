//! Incremental and scheduled snapshots (issue #20), end to end: diffs
//! through the API hold exactly the keys written before them, restore
//! through their chain, merge into a full snapshot, and a chain with a
//! missing layer is refused naming it; `--snapshot-every` survives SIGKILL
//! at any moment with DIR/latest restorable.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{free_port, run, Proc};
use snapvm_tests::redis_cli::{first_reply, redis};
use snapvm_tests::snapvm::restore_kv;

use crate::api::harness::{req, shutdown, start_kv, T};

fn exists(port: u16, k: &str) -> bool {
    redis(port, &["EXISTS", k]).as_deref() == Some("1")
}

/// `snapvm run --restore dir` on a free port.
fn restore(dir: &Path, tmp: &Path, name: &str) -> (Proc, u16) {
    let (vm, port) = restore_kv(dir, &tmp.join(format!("{name}.txt")), &[]);
    assert_eq!(first_reply(&vm, port, &["PING"], T), "PONG");
    (vm, port)
}

fn create(sock: &Path, dir: &Path, diff: bool) -> Value {
    let mut body = json!({ "snapshot_path": dir });
    if diff {
        body["snapshot_type"] = "Diff".into();
    }
    let r = req(
        sock,
        "PUT",
        "/snapshot/create?wait=true",
        Some(&body.to_string()),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let s = r.json();
    assert_eq!(s["state"], "done", "{s}");
    s
}

#[test]
fn diffs_hold_exactly_the_keys_written_before_them_restore_through_their_chain_and_merge() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let (vm, sock, port) = start_kv(tmp.path(), &[]);
    assert_eq!(
        redis(port, &["DEBUG", "POPULATE", "100000", "bulk", "500"]).as_deref(),
        Some("OK")
    );
    // No parent yet: refused, saying what to do.
    let r = req(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&json!({"snapshot_path": tmp.path().join("x"), "snapshot_type": "Diff"}).to_string()),
    );
    r.assert_fault(
        409,
        "cannot take an incremental snapshot: this VM has no snapshot with its writes tracked since; take a full one first",
    );
    let full = tmp.path().join("s0");
    let f = create(&sock, &full, false);
    assert_eq!(f["metrics"]["snapshot_type"], "Full");
    let full_bytes = f["metrics"]["engine"]["bytes_written"].as_u64().unwrap();
    let mut diffs: Vec<PathBuf> = Vec::new();
    for i in 1..=4 {
        assert_eq!(
            redis(port, &["SET", &format!("k{i}"), &format!("v{i}")]).as_deref(),
            Some("OK")
        );
        let d = tmp.path().join(format!("s{i}"));
        let s = create(&sock, &d, true);
        let m = &s["metrics"];
        assert_eq!(m["snapshot_type"], "Diff", "{m}");
        let parent = if i == 1 {
            full.clone()
        } else {
            diffs[i - 2].clone()
        };
        assert_eq!(m["parent"], parent.display().to_string(), "{m}");
        let bytes = m["engine"]["bytes_written"].as_u64().unwrap();
        assert!(
            bytes * 5 < full_bytes,
            "diff {i} wrote {bytes} bytes, the full one {full_bytes}"
        );
        assert!(m["engine"]["chunks_inherited"].as_u64().unwrap() > 0, "{m}");
        diffs.push(d);
    }
    let list = req(&sock, "GET", "/snapshots", None).json();
    assert_eq!(
        list["tracking"]["parent"],
        diffs[3].display().to_string(),
        "{list}"
    );
    shutdown(vm, &sock);

    // Each diff restores with exactly the keys written before it.
    for (j, d) in diffs.iter().enumerate() {
        let (vm, p) = restore(d, tmp.path(), &format!("r{j}"));
        for i in 1..=4 {
            assert_eq!(
                exists(p, &format!("k{i}")),
                i <= j + 1,
                "k{i} in diff {}",
                j + 1
            );
        }
        assert_eq!(
            redis(p, &["DBSIZE"]).as_deref(),
            Some(format!("{}", 100_000 + j + 1).as_str())
        );
        drop(vm);
    }

    // The merge is the same VM, as one full snapshot.
    let merged = tmp.path().join("merged");
    let out = run(
        &snapvm_bin(),
        &[
            "snapshot",
            "merge",
            diffs[3].to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    let summary: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(summary["layers_merged"], 5, "{summary}");
    let (vm, p) = restore(&merged, tmp.path(), "merged");
    assert_eq!(redis(p, &["GET", "k4"]).as_deref(), Some("v4"));
    drop(vm);

    // A missing middle layer: refused, naming it.
    std::fs::remove_dir_all(&diffs[1]).unwrap();
    let port = free_port();
    let out = run(
        &snapvm_bin(),
        &[
            "run",
            "--restore",
            diffs[3].to_str().unwrap(),
            "--kv-listen",
            &format!("127.0.0.1:{port}"),
        ],
        T,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.starts_with(&format!(
            "snapvm: error: cannot restore {}: snapshot {}: its parent {} cannot be used: read {}/state.bin: No such file",
            diffs[3].display(),
            diffs[2].display(),
            diffs[1].display(),
            diffs[1].display()
        )),
        "{}",
        out.stderr
    );
}

/// A scheduled KV VM on `dir`: booted, or restored from `dir/latest` (a
/// database restarting from its last snapshot and snapshotting on).
fn scheduled(dir: &Path, from_latest: bool) -> (Proc, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let latest = dir.join("latest");
    let mut args = vec!["run"];
    if from_latest {
        args.extend([
            "--restore",
            latest.to_str().unwrap(),
            "--serial",
            "/dev/null",
        ]);
    } else {
        args.extend(["--memory", "256M"]);
    }
    args.extend([
        "--kv-listen",
        &listen,
        "--snapshot-dir",
        dir.to_str().unwrap(),
        "--snapshot-every",
        "150ms",
        "--snapshot-keep",
        "2",
        "--snapshot-full-every",
        "4",
    ]);
    let vm = Proc::spawn(&snapvm_bin(), &args);
    assert_eq!(first_reply(&vm, port, &["PING"], T), "PONG");
    (vm, port)
}

#[test]
fn scheduled_snapshots_survive_sigkill_with_latest_restorable() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let dir = tmp.path().join("sched");
    let mut rng = 0x5eed_u64;
    let mut written = 0u64;
    let mut keys = 0u64;
    for round in 0..20 {
        let from_latest = dir.join("latest").exists();
        let (vm, port) = scheduled(&dir, from_latest);
        if !from_latest {
            assert_eq!(
                redis(port, &["DEBUG", "POPULATE", "20000", "bulk", "200"]).as_deref(),
                Some("OK")
            );
        } else {
            // Restarted from the newest complete snapshot: at least what
            // the previous one held.
            let n: u64 = redis(port, &["DBSIZE"]).unwrap().parse().unwrap();
            assert!(
                n >= keys && n >= 20_000,
                "round {round}: {n} keys, had {keys}"
            );
            keys = n;
        }
        // Keys keep coming while snapshots are taken; killed at a random
        // moment (snapshots copying, committing, rotating, or idle).
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let until = Instant::now() + Duration::from_millis(300 + rng % 900);
        while Instant::now() < until {
            written += 1;
            assert_eq!(
                redis(port, &["SET", &format!("n{written}"), "x"]).as_deref(),
                Some("OK")
            );
        }
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGKILL) }, 0);
        drop(vm);
        // Only what `--snapshot-keep 2` and their parents need is left
        // (plus, after a kill, what was being removed).
        let dirs = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("snap-")
            })
            .count();
        assert!(
            dirs <= 2 + 4 + 2,
            "round {round}: {dirs} snapshot directories"
        );
    }
    // The last one restores too.
    let (vm, port) = scheduled(&dir, true);
    let n: u64 = redis(port, &["DBSIZE"]).unwrap().parse().unwrap();
    assert!(n >= keys, "{n} keys, had {keys}");
    drop(vm);
}
