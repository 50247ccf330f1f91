//! When the staging pool is allocated (at start by default, else at the
//! first snapshot), and a snapshot whose pool cannot be allocated still
//! completes and restores; the next snapshot gets its pool.

use serde_json::json;

use super::harness::*;

/// The staging pool cannot be allocated at the first snapshot (ENOMEM
/// injected): the snapshot is taken all the same, write faults writing
/// their chunk themselves, and it restores; the next snapshot gets its pool.
#[test]
fn a_snapshot_without_its_staging_pool_still_completes_and_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let (vm, sock, port) = start_kv_args(
        tmp.path(),
        &[("SNAPVM_INJECT", "fail_staging")],
        &["--snapshot-pool", "first-snapshot"],
    );
    let mut kv = redis_con(port);
    set(&mut kv, "k", "v");
    let dir = tmp.path().join("no-pool");
    let r = put(
        &sock,
        "/snapshot/create?wait=true",
        json!({"snapshot_path": dir}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let s = r.json();
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(s["metrics"]["engine"]["staging_bytes"], 0, "{s}");
    let m = get(&sock, "/metrics").body;
    assert_eq!(metric(&m, "snapvm_snapshot_staging_bytes"), 0.0, "{m}");
    let r = put(
        &sock,
        "/snapshot/create?wait=true",
        json!({"snapshot_path": tmp.path().join("with-pool")}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        wait_metric(
            &sock,
            "snapvm_snapshot_staging_bytes",
            (256u64 << 20) as f64
        ),
        (256u64 << 20) as f64,
        "the next snapshot gets its pool"
    );
    let out = shutdown(vm, &sock);
    assert!(
        out.stderr.contains("snapshot staging pool unavailable"),
        "{}",
        out.stderr
    );

    let (restored, sock2, port2) = start_waiting(tmp.path(), "restored");
    let mut kv2 = load_resumed(&sock2, port2, &dir, true);
    assert_eq!(get_key(&mut kv2, "k").as_deref(), Some("v"));
    shutdown(restored, &sock2);
}

/// `--snapshot-pool at-start` (the default) holds the whole pool before any
/// snapshot — a restored VM's once its memory is all in — so the first
/// snapshot finds it warm; `first-snapshot` holds nothing until a snapshot,
/// and a mode that never stages (fork) holds nothing either.
#[test]
fn the_staging_pool_is_held_from_the_start_unless_asked_otherwise() {
    const POOL: f64 = (32u64 << 20) as f64;
    let tmp = tempfile::tempdir().unwrap();
    let (vm, sock, port) = start_kv_args(tmp.path(), &[], &["--snapshot-memory-budget", "32M"]);
    assert_eq!(
        wait_metric(&sock, "snapvm_snapshot_staging_bytes", POOL),
        POOL,
        "populated at start"
    );
    let m = get(&sock, "/metrics").body;
    assert_eq!(
        metric(&m, "snapvm_snapshots_total{outcome=\"done\"}"),
        0.0,
        "{m}"
    );
    let mut kv = redis_con(port);
    set(&mut kv, "k", "v");
    let dir = tmp.path().join("snap");
    let r = put(
        &sock,
        "/snapshot/create?wait=true",
        json!({"snapshot_path": dir, "memory_budget": 32u64 << 20}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let s = r.json();
    assert_eq!(s["metrics"]["engine"]["staging_bytes"], 32u64 << 20, "{s}");
    shutdown(vm, &sock);

    // A restored VM: the pool once the load is over (default budget).
    let (restored, sock2, port2) = start_waiting(tmp.path(), "restored");
    let m = get(&sock2, "/metrics").body;
    assert_eq!(
        metric(&m, "snapvm_snapshot_staging_bytes"),
        0.0,
        "no VM yet: {m}"
    );
    let mut kv2 = load_resumed(&sock2, port2, &dir, false);
    assert_eq!(get_key(&mut kv2, "k").as_deref(), Some("v"));
    // The restored guest is 512 MiB: the default 256 MiB pool fits.
    let want = (256u64 << 20) as f64;
    assert_eq!(
        wait_metric(&sock2, "snapvm_snapshot_staging_bytes", want),
        want,
        "populated after the load"
    );
    shutdown(restored, &sock2);

    for args in [
        &["--snapshot-pool", "first-snapshot"][..],
        &["--snapshot-mode", "fork"][..],
    ] {
        let t = tempfile::tempdir().unwrap();
        let (vm, sock, port) = start_kv_args(t.path(), &[], args);
        let mut kv = redis_con(port);
        set(&mut kv, "k", "v");
        // Long enough for a pool to fill had one been started (32 MiB
        // above took well under this).
        std::thread::sleep(std::time::Duration::from_secs(2));
        let m = get(&sock, "/metrics").body;
        assert_eq!(
            metric(&m, "snapvm_snapshot_staging_bytes"),
            0.0,
            "{args:?}: {m}"
        );
        shutdown(vm, &sock);
    }
}

/// A budget too small for the writes a snapshot meets: the faults past the
/// pool write their chunk to disk themselves, the snapshot is complete, and
/// `GET /metrics` says so (how an operator sizes `--snapshot-memory-budget`).
/// The workers are held until four write faults were saved, so the one
/// staging slot (2 MiB) fills and is not drained meanwhile.
#[test]
fn faults_past_a_full_pool_write_to_disk_and_the_metrics_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    let (vm, sock, port) = start_kv_args(
        tmp.path(),
        &[("SNAPVM_INJECT", "hold_workers_until_fault_copies=4")],
        &["--snapshot-memory-budget", "2M"],
    );
    let two_mib = (2u64 << 20) as f64;
    assert_eq!(
        wait_metric(&sock, "snapvm_snapshot_staging_bytes", two_mib),
        two_mib
    );
    let mut kv = redis_con(port);
    let ok: String = redis::cmd("DEBUG")
        .arg(&["POPULATE", "200000", "pop", "100"])
        .query(&mut kv)
        .unwrap();
    assert_eq!(ok, "OK");
    let dir = tmp.path().join("snap");
    let r = put(&sock, "/snapshot/create", json!({"snapshot_path": dir}));
    assert_eq!(r.status, 201, "{r:?}");
    // Overwrite keys spread over the populated memory: each lands in a
    // chunk not saved yet (the workers wait).
    for i in 0..40u64 {
        set(&mut kv, &format!("pop:{}", i * 4999), "rewritten");
    }
    let s = wait_snapshot(&vm, &sock, "1");
    assert_eq!(s["state"], "done", "{s}");
    let e = &s["metrics"]["engine"];
    assert!(e["direct_fault_writes"].as_u64().unwrap() >= 3, "{s}");
    assert_eq!(e["staging_peak_bytes"], 2u64 << 20, "{s}");
    let m = get(&sock, "/metrics").body;
    assert_eq!(
        metric(&m, "snapvm_snapshot_fault_disk_writes_total"),
        e["direct_fault_writes"].as_u64().unwrap() as f64,
        "{m}"
    );
    assert_eq!(
        metric(&m, "snapvm_last_snapshot_staging_peak_bytes"),
        two_mib,
        "{m}"
    );
    shutdown(vm, &sock);

    // Restored, it holds the keys as they were at the request.
    let (restored, sock2, port2) = start_waiting(tmp.path(), "restored");
    let mut kv2 = load_resumed(&sock2, port2, &dir, true);
    for i in [0u64, 1, 39] {
        let v = get_key(&mut kv2, &format!("pop:{}", i * 4999)).unwrap();
        assert_ne!(v, "rewritten", "pop:{} is from after the request", i * 4999);
        assert!(v.starts_with("value:"), "{v}");
    }
    shutdown(restored, &sock2);
}
