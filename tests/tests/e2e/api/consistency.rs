//! What a snapshot taken through the API holds, with clients writing
//! throughout: every key as at the fork under redis-benchmark, and every
//! write acknowledged before the request but none sent after the answer.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::run;

use super::harness::*;

#[test]
fn snapshot_under_redis_benchmark_restores_every_key_as_at_the_fork() {
    let tmp = tempfile::tempdir().unwrap();
    let (vm, sock, port) = start_kv(tmp.path(), &[]);
    let mut kv = redis_con(port);
    for i in 0..500 {
        set(&mut kv, &format!("fixed:{i}"), &format!("value-{i}"));
    }
    let mut bench = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-t", "set", "-n", "2000000"])
        .args(["-r", "50000", "-d", "200", "-c", "4", "-q"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run redis-benchmark");
    // A writer whose history is known: SET seq:(i % 100) = i, one at a time;
    // `acked` is the last i the guest acknowledged.
    const SLOTS: u64 = 100;
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut c = redis_con(port);
            let mut i = 1u64;
            while !stop.load(Ordering::SeqCst) {
                set(&mut c, &format!("seq:{}", i % SLOTS), &i.to_string());
                acked.store(i, Ordering::SeqCst);
                i += 1;
            }
        })
    };
    let start = Instant::now();
    while acked.load(Ordering::SeqCst) < 3 * SLOTS
        || redis::cmd("DBSIZE").query::<u64>(&mut kv).unwrap() < 2000
    {
        assert!(start.elapsed() < T, "the load does not write");
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir = tmp.path().join("under-load");
    // The benchmark only adds keys: the snapshot holds at least these.
    let keys_before: u64 = redis::cmd("DBSIZE").query(&mut kv).unwrap();
    let first_possible = acked.load(Ordering::SeqCst);
    let r = req(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&json!({"snapshot_path": dir, "workers": 2}).to_string()),
    );
    assert_eq!(r.status, 201, "{r:?}");
    // The answer comes after the pause: the fork instant is behind us (the
    // write in flight then may be in the snapshot).
    let last_possible = acked.load(Ordering::SeqCst) + 1;
    let keys_after: u64 = redis::cmd("DBSIZE").query(&mut kv).unwrap();
    let id = r.json()["id"].as_str().unwrap().to_string();
    let s = wait_snapshot(&vm, &sock, &id);
    assert_eq!(s["state"], "done", "{s}");
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let _ = bench.kill();
    let _ = bench.wait();
    let m = get(&sock, "/metrics").body;
    assert_eq!(metric(&m, "snapvm_snapshots_total{outcome=\"done\"}"), 1.0);
    shutdown(vm, &sock);

    let (restored, sock2, port2) = start_waiting(tmp.path(), "restored");
    let out = run(
        &snapvm_bin(),
        &[
            "restore",
            "--api-sock",
            sock2.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
            "--verify",
        ],
        T,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    let mut kv2 = redis_con(port2);
    for i in 0..500 {
        assert_eq!(
            get_key(&mut kv2, &format!("fixed:{i}")),
            Some(format!("value-{i}"))
        );
    }
    let seq: Vec<u64> = (0..SLOTS)
        .map(|j| {
            get_key(&mut kv2, &format!("seq:{j}"))
                .unwrap_or_else(|| panic!("seq:{j} missing"))
                .parse()
                .unwrap()
        })
        .collect();
    // The fork instant is the last write in the snapshot: every slot must
    // hold exactly the last value written to it up to that write.
    let fork = *seq.iter().max().unwrap();
    assert!(
        (first_possible..=last_possible).contains(&fork),
        "fork at write {fork}, outside {first_possible}..={last_possible}"
    );
    for (j, &v) in seq.iter().enumerate() {
        let expected = fork - (fork + SLOTS - j as u64) % SLOTS;
        assert_eq!(
            v, expected,
            "seq:{j} is {v}, expected {expected} (fork at {fork})"
        );
    }
    // The benchmark's keys are there too, and the store works on.
    let n: u64 = redis::cmd("DBSIZE").query(&mut kv2).unwrap();
    assert!(
        (keys_before..=keys_after).contains(&n),
        "restored {n} keys, not within {keys_before}..={keys_after}"
    );
    set(&mut kv2, "after-restore", "ok");
    assert_eq!(get_key(&mut kv2, "after-restore").as_deref(), Some("ok"));
    shutdown(restored, &sock2);
}

/// The snapshot's instant is its pause, which the request starts and the
/// answer follows: with writers running throughout, every write a client
/// saw acknowledged before it sent the request is in the restored guest,
/// and none it sent after the answer is — not even a FLUSHALL.
#[test]
fn point_in_time_every_write_acked_before_the_request_is_in_and_none_after_the_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let (vm, sock, port) = start_kv(tmp.path(), &[]);
    let mut kv = redis_con(port);
    // Some bulk, so the memory takes a while to write after the answer.
    redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(100_000)
        .arg("bulk")
        .arg(1000)
        .query::<()>(&mut kv)
        .unwrap();
    // Writers of numbered keys: `acked[w]` is the last i writer w saw
    // acknowledged (keys w:0 ..= w:acked exist once acked).
    const WRITERS: usize = 3;
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (acked, stop) = (acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut c = redis_con(port);
                let mut i = 1u64;
                while !stop.load(Ordering::SeqCst) {
                    set(&mut c, &format!("w{w}:{i}"), &i.to_string());
                    acked[w].store(i, Ordering::SeqCst);
                    i += 1;
                }
            })
        })
        .collect();
    let start = Instant::now();
    while acked.iter().any(|a| a.load(Ordering::SeqCst) < 500) {
        assert!(start.elapsed() < T, "the writers do not write");
        std::thread::sleep(Duration::from_millis(5));
    }
    let dir = tmp.path().join("instant");
    let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    let r = put(&sock, "/snapshot/create", json!({"snapshot_path": dir}));
    // The write each writer had in flight at the answer may or may not be
    // in; the next ones may not.
    let after: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst) + 1).collect();
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.json()["id"].as_str().unwrap().to_string();
    // What a user does next with the data the snapshot was taken to keep.
    redis::cmd("FLUSHALL").query::<()>(&mut kv).unwrap();
    set(&mut kv, "after-answer", "1");
    let s = wait_snapshot(&vm, &sock, &id);
    assert_eq!(s["state"], "done", "{s}");
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    shutdown(vm, &sock);

    let (restored, sock2, port2) = start_waiting(tmp.path(), "restored");
    let mut kv2 = load_resumed(&sock2, port2, &dir, false);
    assert_eq!(get_key(&mut kv2, "after-answer"), None);
    for w in 0..WRITERS {
        // Every key acknowledged before the request.
        for i in 1..=before[w] {
            assert_eq!(
                get_key(&mut kv2, &format!("w{w}:{i}")),
                Some(i.to_string()),
                "w{w}:{i} was acknowledged before the request"
            );
        }
        // None written after the answer.
        for i in after[w] + 1..after[w] + 200 {
            assert_eq!(
                get_key(&mut kv2, &format!("w{w}:{i}")),
                None,
                "w{w}:{i} was written after the answer"
            );
        }
    }
    let bulk: u64 = redis::cmd("DBSIZE").query(&mut kv2).unwrap();
    assert!(bulk >= 100_000, "the bulk keys: {bulk}");
    shutdown(restored, &sock2);
}
