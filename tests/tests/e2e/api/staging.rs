//! A snapshot whose staging pool cannot be allocated still completes and
//! restores; the next snapshot gets its pool.

use serde_json::json;

use super::harness::*;

/// The staging pool cannot be allocated (ENOMEM injected): the snapshot is
/// taken all the same, write faults writing their chunk themselves, and it
/// restores; the next snapshot gets its pool.
#[test]
fn a_snapshot_without_its_staging_pool_still_completes_and_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let (vm, sock, port) = start_kv(tmp.path(), &[("SNAPVM_INJECT", "fail_staging")]);
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
    let r = put(
        &sock2,
        "/snapshot/load",
        json!({"snapshot_path": dir, "resume_vm": true, "verify": true}),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let mut kv2 = redis_con(port2);
    assert_eq!(get_key(&mut kv2, "k").as_deref(), Some("v"));
    shutdown(restored, &sock2);
}
