//! Every endpoint of a running VM (`GET /`, `/vm/config`, `PATCH /vm`,
//! `PUT /snapshot/create`, `GET /snapshot/{id}`, `/snapshots`,
//! `DELETE /snapshot/{id}`, `PUT /snapshot/load`, `PUT /actions`,
//! `GET /metrics`) with its exact statuses and bodies, refusals included.

use serde_json::{json, Value};

use super::harness::*;

#[test]
fn every_endpoint_answers_with_exact_statuses_and_bodies() {
    let tmp = tempfile::tempdir().unwrap();
    let (vm, sock, port) = start_kv(tmp.path(), &[]);
    let mut kv = redis_con(port);
    set(&mut kv, "greeting", "hello");

    // GET /
    let r = get(&sock, "/");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let info = r.json();
    assert_eq!(
        info,
        json!({"id": format!("snapvm-{}", vm.pid()), "state": "Running",
               "vmm_version": "0.1.0", "app_name": "snapvm"})
    );

    // GET /vm/config
    let r = get(&sock, "/vm/config");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"boot_source": {"boot_args": "mode=kv", "kernel_image_path": "bundled"},
               "machine_config": {"huge_pages": true, "mem_size_mib": 512, "vcpu_count": 1,
                                  "page_backing": "thp"}})
    );

    // PATCH /vm: pause (twice: idempotent), resume (twice).
    for _ in 0..2 {
        let r = req(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
        assert_eq!((r.status, r.body.as_str()), (204, ""), "{r:?}");
        assert_eq!(get(&sock, "/").json()["state"], "Paused");
    }
    let m = get(&sock, "/metrics").body;
    assert_eq!(metric(&m, "snapvm_vm_state{state=\"paused\"}"), 1.0);
    for _ in 0..2 {
        let r = req(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
        assert_eq!((r.status, r.body.as_str()), (204, ""), "{r:?}");
        assert_eq!(get(&sock, "/").json()["state"], "Running");
    }
    assert_eq!(get_key(&mut kv, "greeting").as_deref(), Some("hello"));
    req(&sock, "PATCH", "/vm", Some(r#"{"state": "Sleeping"}"#)).assert_fault(
        400,
        "invalid JSON body: unknown variant `Sleeping`, expected `Paused` or `Resumed` at line 1 column 20",
    );
    req(
        &sock,
        "PATCH",
        "/vm",
        Some(r#"{"state": "Paused", "x": 1}"#),
    )
    .assert_fault(
        400,
        "invalid JSON body: unknown field `x`, expected `state` at line 1 column 23",
    );
    req(&sock, "PATCH", "/vm", Some("")).assert_fault(400, "missing JSON body");
    req(&sock, "PATCH", "/vm", Some(r#"{"state":"#)).assert_fault(
        400,
        "invalid JSON body: EOF while parsing a value at line 1 column 9",
    );
    let raw = "PATCH /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 19\r\n\r\n{\"state\": \"Paused\"}";
    exchange(&sock, raw.as_bytes()).unwrap().assert_fault(
        400,
        "unsupported Content-Type 'text/plain': expected application/json",
    );
    assert_eq!(get(&sock, "/").json()["state"], "Running");

    // PUT /snapshot/create: refusals.
    let dir = tmp.path().join("snap1");
    let d = dir.to_str().unwrap();
    let create = |body: Value| req(&sock, "PUT", "/snapshot/create", Some(&body.to_string()));
    create(json!({"snapshot_path": d, "bogus": 1})).assert_fault(
        400,
        "invalid JSON body: unknown field `bogus`, expected one of `snapshot_path`, `mem_file_path`, `snapshot_type`, `mode`, `workers`, `overwrite`, `memory_budget` at line 1 column 8",
    );
    create(json!({"snapshot_path": d, "mode": "lazy"})).assert_fault(
        400,
        "unknown mode 'lazy': expected async-fork, stop-the-world, fork or sync-wp",
    );
    create(json!({"snapshot_path": d, "workers": 0}))
        .assert_fault(400, "workers 0: expected 1..=64");
    create(json!({"memory_budget": "lots", "snapshot_path": d})).assert_fault(
        400,
        "invalid JSON body: invalid type: string \"lots\", expected u64 at line 1 column 23",
    );
    create(json!({"snapshot_path": d, "snapshot_type": "Delta"}))
        .assert_fault(400, "unknown snapshot_type 'Delta': expected Full or Diff");
    create(json!({"snapshot_path": "relative/dir"}))
        .assert_fault(400, "snapshot_path 'relative/dir' must be an absolute path");
    create(json!({"snapshot_path": d, "mem_file_path": "/tmp/mem"})).assert_fault(
        400,
        &format!("mem_file_path '/tmp/mem' must be absent or {d}/memory.img: snapvm keeps the memory image inside the snapshot directory"),
    );
    let orphan = tmp.path().join("no/such/dir");
    create(json!({"snapshot_path": orphan})).assert_fault(
        400,
        &format!(
            "snapshot_path {}: the parent directory does not exist",
            orphan.display()
        ),
    );
    let existing = tmp.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    create(json!({"snapshot_path": existing})).assert_fault(
        400,
        &format!(
            "snapshot_path {} exists: pass \"overwrite\": true to replace it",
            existing.display()
        ),
    );
    req(
        &sock,
        "PUT",
        "/snapshot/create?wait=maybe",
        Some(&json!({"snapshot_path": d}).to_string()),
    )
    .assert_fault(
        400,
        "invalid value 'maybe' for wait: expected true or false",
    );
    req(
        &sock,
        "PUT",
        "/snapshot/create?now=1",
        Some(&json!({"snapshot_path": d}).to_string()),
    )
    .assert_fault(
        400,
        "unknown query parameter 'now=1': expected wait=true|false",
    );

    // PUT /snapshot/create: success, answered with id 1 once the pause is
    // over (the snapshot's instant has passed; its memory is written in the
    // background).
    let r = create(
        json!({"snapshot_path": d, "mem_file_path": format!("{d}/memory.img"),
                          "snapshot_type": "Full", "mode": "async-fork", "workers": 2,
                          "memory_budget": 64 << 20}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let s = r.json();
    assert_eq!(s["id"], "1");
    assert_eq!(s["snapshot_path"], d);
    assert_eq!(s["mode"], "async-fork");
    assert_eq!(s["workers"], 2);
    assert!(
        s["state"] == "copying" || s["state"] == "persisting" || s["state"] == "done",
        "{s}"
    );
    assert!(
        s["metrics"]["sync_us"]["total"].as_f64().unwrap() > 0.0,
        "paused before the answer: {s}"
    );
    assert_eq!(s["metrics"]["memory_budget"], 64 << 20, "{s}");
    let s = wait_snapshot(&vm, &sock, "1");
    assert_eq!(s["state"], "done", "{s}");
    assert!(s.get("reason").is_none(), "{s}");
    let p = &s["progress"];
    assert_eq!(p["chunks_done"], p["chunks_total"]);
    let written = p["bytes_written"].as_u64().unwrap();
    assert!(written >= 2 << 20, "the guest's data was written: {s}");
    assert_eq!(s["metrics"]["engine"]["bytes_written"], written, "{s}");
    assert!(
        s["metrics"]["engine"]["staging_bytes"].as_u64().unwrap() <= 64 << 20,
        "at most the budget asked for (the pool fills meanwhile): {s}"
    );
    assert_eq!(p["image_len"], s["metrics"]["persist"]["image_len"], "{s}");
    assert_eq!(s["metrics"]["strategy"], "async-fork");
    for f in ["state.bin", "memory.img", "metrics.json"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }

    // ?wait=true answers when it is written; overwrite replaces.
    let r = req(
        &sock,
        "PUT",
        "/snapshot/create?wait=true",
        Some(&json!({"snapshot_path": d, "overwrite": true, "mode": "stop-the-world"}).to_string()),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let s = r.json();
    assert_eq!(
        (s["id"].as_str(), s["state"].as_str()),
        (Some("2"), Some("done"))
    );
    assert_eq!(s["metrics"]["strategy"], "stop-the-world");
    assert!(s["metrics"]["persist"]["image_len"].as_u64().unwrap() > 0);

    // GET /snapshot/{id}, GET /snapshots.
    assert_eq!(get(&sock, "/snapshot/2").json(), s);
    get(&sock, "/snapshot/99").assert_fault(404, "unknown snapshot id '99'");
    get(&sock, "/snapshot/abc").assert_fault(404, "unknown snapshot id 'abc'");
    let list = get(&sock, "/snapshots");
    assert_eq!(list.status, 200);
    let ids: Vec<Value> = list.json()["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].clone())
        .collect();
    assert_eq!(ids, vec![json!("1"), json!("2")]);

    // DELETE /snapshot/{id} of an ended or unknown snapshot.
    req(&sock, "DELETE", "/snapshot/1", None)
        .assert_fault(409, "snapshot 1 is done: nothing to cancel");
    req(&sock, "DELETE", "/snapshot/7", None).assert_fault(404, "unknown snapshot id '7'");

    // PUT /snapshot/load on a snapvm that runs a VM.
    req(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(&json!({"snapshot_path": d}).to_string()),
    )
    .assert_fault(
        409,
        "a VM is already running: PUT /snapshot/load needs a snapvm started with --no-boot",
    );

    // PUT /actions refusals; unknown routes; too large a body.
    req(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "Reboot"}"#),
    )
    .assert_fault(400, "unsupported action_type 'Reboot': expected Shutdown");
    get(&sock, "/nope").assert_fault(404, "no route for GET /nope");
    req(&sock, "POST", "/", None).assert_fault(404, "no route for POST /");
    get(&sock, "/snapshot/create").assert_fault(404, "no route for GET /snapshot/create");
    req(&sock, "DELETE", "/snapshots", None).assert_fault(404, "no route for DELETE /snapshots");
    let big = format!("{{\"state\": \"{}\"}}", "x".repeat(70 * 1024));
    req(&sock, "PATCH", "/vm", Some(&big))
        .assert_fault(413, "request body larger than 65536 bytes");

    // GET /metrics: Prometheus text.
    let r = get(&sock, "/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let m = &r.body;
    assert!(m.contains("# TYPE snapvm_snapshots_total counter\n"), "{m}");
    assert_eq!(metric(m, "snapvm_vm_state{state=\"running\"}"), 1.0);
    assert_eq!(metric(m, "snapvm_vm_state{state=\"paused\"}"), 0.0);
    assert_eq!(metric(m, "snapvm_snapshots_total{outcome=\"done\"}"), 2.0);
    assert_eq!(metric(m, "snapvm_snapshots_total{outcome=\"failed\"}"), 0.0);
    assert_eq!(
        metric(m, "snapvm_snapshots_total{outcome=\"cancelled\"}"),
        0.0
    );
    assert_eq!(metric(m, "snapvm_snapshots_in_flight"), 0.0);
    assert!(metric(m, "snapvm_last_snapshot_pause_seconds") > 0.0, "{m}");
    assert!(
        metric(m, "snapvm_snapshot_bytes_written_total") > 0.0,
        "{m}"
    );
    assert_eq!(
        wait_metric(&sock, "snapvm_snapshot_staging_bytes", (64u64 << 20) as f64),
        (64u64 << 20) as f64,
        "the pool of the last budget asked for, once filled"
    );
    metric(m, "snapvm_snapshot_faults_total{kind=\"write_protect\"}");
    metric(m, "snapvm_snapshot_faults_total{kind=\"missing\"}");

    // The guest ran on through all of it.
    assert_eq!(get_key(&mut kv, "greeting").as_deref(), Some("hello"));
    shutdown(vm, &sock);
}
