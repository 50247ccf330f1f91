//! The HTTP API on a Unix socket (`snapvm run --api-sock`), its CLI client,
//! and docs/API.md's examples, against the real binary and guest.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{free_port, run, Finished, Proc};

const T: Duration = Duration::from_secs(60);
const LISTENING: &str = "kv: listening on vsock port 6379";
const HOLD_ENV: &str = "SNAPVM_TEST_HOLD_SNAPSHOT_COPY";

/// One HTTP exchange: status, headers (lower-cased names) and body.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts status and the exact fault body.
    fn assert_fault(&self, status: u16, message: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert_eq!(self.json(), json!({ "fault_message": message }), "{self:?}");
    }
}

/// Sends `raw` on a fresh connection and reads the reply to EOF (the
/// request says `Connection: close`). None when the server closed without
/// a reply.
fn exchange(sock: &Path, raw: &[u8]) -> Option<Resp> {
    let mut s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {sock:?}: {e}"));
    s.set_read_timeout(Some(T)).unwrap();
    // The server may close early (e.g. on a huge head): ignore write errors.
    let _ = s.write_all(raw);
    // Half-close: a request cut short ends here instead of waiting for the
    // server's header timeout.
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_response(&out)
}

fn parse_response(out: &[u8]) -> Option<Resp> {
    let text = String::from_utf8_lossy(out);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Resp {
        status,
        headers,
        body: body.to_string(),
    })
}

/// A request with a JSON body (if any) and `Connection: close`.
fn req(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Resp {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        raw.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    raw.push_str("\r\n");
    if let Some(b) = body {
        raw.push_str(b);
    }
    exchange(sock, raw.as_bytes()).unwrap_or_else(|| panic!("no reply to {method} {path}"))
}

fn get(sock: &Path, path: &str) -> Resp {
    req(sock, "GET", path, None)
}

/// Waits until the API answers `GET /`.
fn wait_for_api(proc: &Proc, sock: &Path) {
    let start = Instant::now();
    while UnixStream::connect(sock).is_err() {
        assert!(
            start.elapsed() < T,
            "API socket {sock:?} never appeared\nstderr:\n{}",
            proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(sock, "/").status, 200);
}

/// A KV guest served by the API (`--cmdline mode=kv` boots it), on a free
/// port; `env` is extra environment.
fn start_kv(tmp: &Path, env: &[(&str, &str)]) -> (Proc, PathBuf, u16) {
    let sock = tmp.join("api.sock");
    let port = free_port();
    let mut cmd = Command::new(snapvm_bin());
    cmd.args(["run", "--api-sock"])
        .arg(&sock)
        .args(["--cmdline", "mode=kv", "--memory", "512M", "--kv-listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--log-level", "info"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut vm = Proc::spawn_cmd(&mut cmd);
    vm.wait_for_stdout(LISTENING, T);
    wait_for_api(&vm, &sock);
    (vm, sock, port)
}

/// `snapvm run --api-sock` alone: waits for `PUT /snapshot/load`; a loaded
/// KV guest listens on the returned port.
fn start_waiting(tmp: &Path, name: &str) -> (Proc, PathBuf, u16) {
    let sock = tmp.join(format!("{name}.sock"));
    let port = free_port();
    let vm = Proc::spawn_cmd(
        Command::new(snapvm_bin())
            .args(["run", "--api-sock"])
            .arg(&sock)
            .arg("--kv-listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--serial")
            .arg(tmp.join(format!("{name}-serial.txt")))
            .args(["--log-level", "info"]),
    );
    wait_for_api(&vm, &sock);
    (vm, sock, port)
}

/// Shuts snapvm down through the API: 204, exit status 0, socket gone.
fn shutdown(vm: Proc, sock: &Path) -> Finished {
    let r = req(
        sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "Shutdown"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.body, "");
    let out = vm.wait(T);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(!sock.exists(), "the socket outlived snapvm");
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    out
}

fn redis_con(port: u16) -> redis::Connection {
    let start = Instant::now();
    loop {
        match redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .and_then(|c| c.get_connection())
        {
            Ok(mut c) => {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return c;
                }
            }
            Err(_) if start.elapsed() < T => {}
            Err(e) => panic!("KV on {port} never answered: {e}"),
        }
        assert!(start.elapsed() < T, "KV on {port} never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn set(c: &mut redis::Connection, k: &str, v: &str) {
    redis::cmd("SET").arg(k).arg(v).query::<()>(c).unwrap();
}

fn get_key(c: &mut redis::Connection, k: &str) -> Option<String> {
    redis::cmd("GET").arg(k).query(c).unwrap()
}

/// Polls `GET /snapshot/{id}` until it ends; returns the last status.
fn wait_snapshot(vm: &Proc, sock: &Path, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let s = get(sock, &format!("/snapshot/{id}"));
        assert_eq!(s.status, 200, "{s:?}");
        let v = s.json();
        if v["state"] == "done" || v["state"] == "failed" {
            return v;
        }
        assert!(
            start.elapsed() < T,
            "snapshot {id} did not end: {v}\nstderr:\n{}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
        .parse()
        .unwrap()
}

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
               "machine_config": {"huge_pages": true, "mem_size_mib": 512, "vcpu_count": 1}})
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
    create(json!({"snapshot_path": d, "snapshot_type": "Diff"}))
        .assert_fault(400, "unsupported snapshot_type 'Diff': only Full");
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
        "a VM is already running: PUT /snapshot/load needs a snapvm started with only --api-sock",
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

#[test]
fn socket_is_private_refuses_live_and_non_sockets_and_replaces_stale_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let one_line = |out: &Finished, part: &str| {
        assert_eq!(out.code(), Some(1), "{out:?}");
        let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 1, "{out:?}");
        assert!(
            lines[0].starts_with("snapvm: error: --api-sock "),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains(part), "{:?} lacks {part:?}", lines[0]);
    };
    let file = tmp.path().join("file.sock");
    std::fs::write(&file, b"precious").unwrap();
    let out = run(
        &snapvm_bin(),
        &["run", "--api-sock", file.to_str().unwrap()],
        T,
    );
    one_line(&out, "exists and is not a socket; refusing to replace it");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");

    let live = tmp.path().join("live.sock");
    let listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let out = run(
        &snapvm_bin(),
        &["run", "--api-sock", live.to_str().unwrap()],
        T,
    );
    one_line(&out, "another process is serving this socket");
    assert!(live.exists());
    drop(listener);

    // `live.sock` is stale now (nobody accepts): replaced.
    let (vm, sock, _) = {
        let vm = Proc::spawn(
            &snapvm_bin(),
            &[
                "run",
                "--api-sock",
                live.to_str().unwrap(),
                "--log-level",
                "info",
            ],
        );
        wait_for_api(&vm, &live);
        (vm, live.clone(), 0)
    };
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    assert_eq!(get(&sock, "/").json()["state"], "Not started");
    // SIGTERM stops it cleanly too: exit 0, socket removed.
    // SAFETY: kill(2) on our own child's pid has no memory-safety concerns.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) }, 0);
    let out = vm.wait(T);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(!sock.exists());

    // Flags that shape a booted VM make no sense when nothing boots.
    let out = run(
        &snapvm_bin(),
        &[
            "run",
            "--api-sock",
            sock.to_str().unwrap(),
            "--memory",
            "1G",
        ],
        T,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .starts_with("snapvm: error: --memory has no effect"),
        "{out:?}"
    );
    assert!(!sock.exists(), "a refused start left its socket");
}

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
        json!({"machine_config": {"mem_size_mib": 512, "vcpu_count": 1},
               "snapshot": {"snapshot_path": d}})
    );
    load(json!({"snapshot_path": d})).assert_fault(
        409,
        "a VM is already running: PUT /snapshot/load needs a snapvm started with only --api-sock",
    );
    req(
        &sock2,
        "PUT",
        "/snapshot/create",
        Some(&json!({"snapshot_path": tmp.path().join("again")}).to_string()),
    )
    .assert_fault(
        409,
        "a restored VM cannot be snapshotted yet (its memory is the mapped snapshot image)",
    );
    let out = cli(&["vm", "resume", "--api-sock", s2]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(get(&sock2, "/").json()["state"], "Running");
    let mut kv2 = redis_con(port2);
    assert_eq!(get_key(&mut kv2, "k").as_deref(), Some("at-the-fork"));
    shutdown(waiting, &sock2);
}

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

/// Polls `GET /metrics` until `name` reads `want` (at most T); returns the
/// last value read.
fn wait_metric(sock: &Path, name: &str, want: f64) -> f64 {
    let start = Instant::now();
    loop {
        let v = metric(&get(sock, "/metrics").body, name);
        if v == want || start.elapsed() > T {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `PUT path` with a JSON body.
fn put(sock: &Path, path: &str, body: Value) -> Resp {
    req(sock, "PUT", path, Some(&body.to_string()))
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
    let r = put(
        &sock2,
        "/snapshot/load",
        json!({"snapshot_path": dir, "resume_vm": true}),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let mut kv2 = redis_con(port2);
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
