//! `DELETE /snapshot/{id}` mid-copy, and a shutdown with a snapshot in
//! flight: the guest runs on with all its data.

use serde_json::json;

use super::harness::*;

#[test]
fn cancel_mid_copy_leaves_the_guest_running_with_its_data() {
    let tmp = tempfile::tempdir().unwrap();
    // The copiers are held until cancelled: the snapshot is mid-copy for as
    // long as the test needs, whatever the machine's speed.
    let (vm, sock, port) = start_kv(tmp.path(), &[(HOLD_ENV, "1")]);
    let mut kv = redis_con(port);
    for i in 0..300 {
        set(&mut kv, &format!("before:{i}"), &format!("v{i}"));
    }
    let dir = tmp.path().join("cancelled");
    let body = json!({"snapshot_path": dir}).to_string();
    let r = req(&sock, "PUT", "/snapshot/create", Some(&body));
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.json()["state"], "copying");
    // The guest writes during the copy (the fault path copies what it
    // touches first).
    for i in 0..300 {
        set(&mut kv, &format!("during:{i}"), &format!("w{i}"));
    }
    let s = get(&sock, "/snapshot/1").json();
    assert_eq!(s["state"], "copying", "{s}");
    let p = &s["progress"];
    assert!(
        p["chunks_done"].as_u64().unwrap() < p["chunks_total"].as_u64().unwrap(),
        "{s}"
    );
    req(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&json!({"snapshot_path": tmp.path().join("second")}).to_string()),
    )
    .assert_fault(409, "snapshot in progress");
    assert_eq!(
        metric(&get(&sock, "/metrics").body, "snapvm_snapshots_in_flight"),
        1.0
    );

    let r = req(&sock, "DELETE", "/snapshot/1", None);
    assert_eq!(r.status, 200, "{r:?}");
    let s = r.json();
    assert_eq!(s["state"], "failed", "{s}");
    assert_eq!(s["reason"], "copy failed: snapshot cancelled", "{s}");
    assert!(!dir.exists(), "a cancelled snapshot left {dir:?}");
    req(&sock, "DELETE", "/snapshot/1", None)
        .assert_fault(409, "snapshot 1 has failed: nothing to cancel");

    // The guest runs on with everything it had and keeps taking writes.
    assert_eq!(get(&sock, "/").json()["state"], "Running");
    for i in 0..300 {
        assert_eq!(
            get_key(&mut kv, &format!("before:{i}")),
            Some(format!("v{i}"))
        );
        assert_eq!(
            get_key(&mut kv, &format!("during:{i}")),
            Some(format!("w{i}"))
        );
    }
    set(&mut kv, "after", "yes");
    assert_eq!(get_key(&mut kv, "after").as_deref(), Some("yes"));
    let n: u64 = redis::cmd("DBSIZE").query(&mut kv).unwrap();
    assert_eq!(n, 601);
    let m = get(&sock, "/metrics").body;
    assert_eq!(
        metric(&m, "snapvm_snapshots_total{outcome=\"cancelled\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "snapvm_snapshots_total{outcome=\"failed\"}"),
        0.0
    );
    assert_eq!(metric(&m, "snapvm_snapshots_in_flight"), 0.0);

    // A shutdown with a snapshot held mid-copy cancels it and exits 0.
    let r = req(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&json!({"snapshot_path": tmp.path().join("third")}).to_string()),
    );
    assert_eq!(r.status, 201, "{r:?}");
    shutdown(vm, &sock);
    assert!(!tmp.path().join("third").exists());
}
