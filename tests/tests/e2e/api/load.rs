//! `PUT /snapshot/load` on a waiting snapvm (refusals until loaded, then
//! loaded paused and resumed), with the snapshot taken and the VM driven
//! through the CLI client (`snapvm snapshot ...`, `snapvm vm ...`).

use std::process::Command;

use serde_json::{json, Value};
use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::run;

use super::harness::*;

#[test]
fn waiting_instance_refuses_until_loaded_then_loads_paused_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    // A snapshot to load, from a KV guest driven by the CLI client.
    let (vm, sock, port) = start_kv(tmp.path(), &[]);
    let mut kv = redis_con(port);
    set(&mut kv, "k", "at-the-fork");
    let dir = tmp.path().join("snap");
    let cli = |args: &[&str]| run(&snapvm_bin(), args, T);
    let s = sock.to_str().unwrap();
    let out = cli(&[
        "snapshot",
        "create",
        "--api-sock",
        s,
        "--dir",
        dir.to_str().unwrap(),
        "--wait",
    ]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let done: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (done["id"].as_str(), done["state"].as_str()),
        (Some("1"), Some("done"))
    );
    assert_eq!(out.stderr, "", "no progress bar without a terminal");
    assert_eq!(
        done["metrics"]["memory_budget"],
        256 << 20,
        "the default budget: {done}"
    );
    // On a terminal (script(1) gives it a pty) the progress bar is drawn;
    // `--memory-budget` reaches the server.
    let tty_dir = tmp.path().join("snap-tty");
    let line = format!(
        "{} snapshot create --api-sock {s} --dir {} --memory-budget 8M --wait",
        snapvm_bin().display(),
        tty_dir.display()
    );
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .output()
        .expect("run script(1)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("done ["), "no progress bar: {text:?}");
    assert!(text.contains("\"state\": \"done\""), "{text:?}");
    assert!(text.contains("\"memory_budget\": 8388608"), "{text:?}");
    set(&mut kv, "k", "after");
    let out = cli(&["snapshot", "list", "--api-sock", s]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let list: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(list["snapshots"][0]["id"], "1");
    let out = cli(&["snapshot", "status", "--api-sock", s, "1"]);
    let one: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(one["state"], "done");
    let out = cli(&["snapshot", "status", "--api-sock", s, "9"]);
    assert_eq!(out.code(), Some(1));
    assert_eq!(
        out.stderr,
        "snapvm: error: unknown snapshot id '9' (HTTP 404)\n"
    );
    let out = cli(&["snapshot", "cancel", "--api-sock", s, "1"]);
    assert_eq!(out.code(), Some(1));
    assert_eq!(
        out.stderr,
        "snapvm: error: snapshot 1 is done: nothing to cancel (HTTP 409)\n"
    );
    let out = cli(&["vm", "pause", "--api-sock", s]);
    assert_eq!((out.code(), out.stdout.as_str()), (Some(0), ""), "{out:?}");
    let out = cli(&["vm", "status", "--api-sock", s]);
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap()["state"],
        "Paused"
    );
    let out = cli(&["vm", "resume", "--api-sock", s]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    shutdown(vm, &sock);
    let out = cli(&["vm", "status", "--api-sock", s]);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr
            .starts_with(&format!("snapvm: error: cannot connect to {s}: ")),
        "{out:?}"
    );

    let (waiting, sock2, port2) = start_waiting(tmp.path(), "waiting");
    let s2 = sock2.to_str().unwrap();
    let info = get(&sock2, "/").json();
    assert_eq!(info["state"], "Not started");
    get(&sock2, "/vm/config").assert_fault(409, "no VM yet: load one with PUT /snapshot/load");
    req(&sock2, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#))
        .assert_fault(409, "no VM yet: load one with PUT /snapshot/load");
    let d = dir.to_str().unwrap();
    req(
        &sock2,
        "PUT",
        "/snapshot/create",
        Some(&json!({"snapshot_path": tmp.path().join("x")}).to_string()),
    )
    .assert_fault(409, "no VM yet: load one with PUT /snapshot/load");
    let load = |body: Value| req(&sock2, "PUT", "/snapshot/load", Some(&body.to_string()));
    load(json!({"snapshot_path": d, "resume_vm": "yes"})).assert_fault(
        400,
        "invalid JSON body: invalid type: string \"yes\", expected a boolean at line 1 column 18",
    );
    load(json!({"snapshot_path": d, "mem_file_path": "/elsewhere/mem"})).assert_fault(
        400,
        &format!("mem_file_path '/elsewhere/mem' must be absent or {d}/memory.img: snapvm keeps the memory image inside the snapshot directory"),
    );
    let missing = tmp.path().join("missing");
    let r = load(json!({"snapshot_path": missing}));
    assert_eq!(r.status, 400, "{r:?}");
    let msg = r.json()["fault_message"].as_str().unwrap().to_string();
    assert!(
        msg.starts_with(&format!("cannot restore {}: ", missing.display()))
            && msg.contains("state.bin"),
        "{msg}"
    );
    assert_eq!(get(&sock2, "/").json()["state"], "Not started");

    // Load paused (the failed attempt above must not have lost the KV
    // listener), then resume.
    let r = load(
        json!({"snapshot_path": d, "mem_file_path": format!("{d}/memory.img"), "resume_vm": false}),
    );
    assert_eq!((r.status, r.body.as_str()), (204, ""), "{r:?}");
    assert_eq!(get(&sock2, "/").json()["state"], "Paused");
    assert_eq!(
        get(&sock2, "/vm/config").json(),
        json!({"machine_config": {"mem_size_mib": 512, "vcpu_count": 1,
                                  "huge_pages": true, "page_backing": "thp"},
               "snapshot": {"snapshot_path": d}})
    );
    load(json!({"snapshot_path": d})).assert_fault(
        409,
        "a VM is already running: PUT /snapshot/load needs a snapvm started with --no-boot",
    );
    let out = cli(&["vm", "resume", "--api-sock", s2]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(get(&sock2, "/").json()["state"], "Running");
    let mut kv2 = redis_con(port2);
    assert_eq!(get_key(&mut kv2, "k").as_deref(), Some("at-the-fork"));
    // A loaded VM is an ordinary VM: it snapshots (even while its memory
    // may still be loading; only async-fork until the load is done).
    let again = tmp.path().join("again");
    let r = req(
        &sock2,
        "PUT",
        "/snapshot/create?wait=true",
        Some(&json!({"snapshot_path": again}).to_string()),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["state"], "done", "{r:?}");
    assert!(again.join("state.bin").exists());
    let info = get(&sock2, "/").json();
    assert_eq!(info["memory_load"]["snapshot_path"], d, "{info}");
    let l = &info["memory_load"];
    assert!(
        l["chunks_copied_in"].as_u64().unwrap() <= l["chunks_loaded"].as_u64().unwrap(),
        "{info}"
    );
    assert!(l["moves_retried"].is_u64(), "{info}");
    shutdown(waiting, &sock2);
}
