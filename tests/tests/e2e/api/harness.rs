//! What the API tests share: raw HTTP/1.1 over the API socket ([`Resp`],
//! [`req`], [`exchange`]), starting snapvm (with a KV guest, or waiting for
//! a snapshot to load) and shutting it down through the API, a Redis client
//! for the guest, and polling snapshot states and Prometheus metrics.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{free_port, Finished, Proc};

pub(crate) const T: Duration = Duration::from_secs(60);
pub(crate) const LISTENING: &str = "kv: listening on vsock port 6379";
pub(crate) const HOLD_ENV: &str = "SNAPVM_TEST_HOLD_SNAPSHOT_COPY";

/// One HTTP exchange: status, headers (lower-cased names) and body.
#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Resp {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts status and the exact fault body.
    pub(crate) fn assert_fault(&self, status: u16, message: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert_eq!(self.json(), json!({ "fault_message": message }), "{self:?}");
    }
}

/// Sends `raw` on a fresh connection and reads the reply to EOF (the
/// request says `Connection: close`). None when the server closed without
/// a reply.
pub(crate) fn exchange(sock: &Path, raw: &[u8]) -> Option<Resp> {
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
pub(crate) fn req(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Resp {
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

pub(crate) fn get(sock: &Path, path: &str) -> Resp {
    req(sock, "GET", path, None)
}

/// Waits until the API answers `GET /`.
pub(crate) fn wait_for_api(proc: &Proc, sock: &Path) {
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
pub(crate) fn start_kv(tmp: &Path, env: &[(&str, &str)]) -> (Proc, PathBuf, u16) {
    start_kv_args(tmp, env, &[])
}

/// `start_kv` with extra `snapvm run` arguments.
pub(crate) fn start_kv_args(
    tmp: &Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> (Proc, PathBuf, u16) {
    let sock = tmp.join("api.sock");
    let port = free_port();
    let mut cmd = Command::new(snapvm_bin());
    cmd.args(["run", "--api-sock"])
        .arg(&sock)
        .args(["--cmdline", "mode=kv", "--memory", "512M", "--kv-listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--log-level", "info"])
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut vm = Proc::spawn_cmd(&mut cmd);
    vm.wait_for_stdout(LISTENING, T);
    wait_for_api(&vm, &sock);
    (vm, sock, port)
}

/// `snapvm run --no-boot --api-sock`: waits for `PUT /snapshot/load`; a loaded
/// KV guest listens on the returned port.
pub(crate) fn start_waiting(tmp: &Path, name: &str) -> (Proc, PathBuf, u16) {
    let sock = tmp.join(format!("{name}.sock"));
    let port = free_port();
    let vm = Proc::spawn_cmd(
        Command::new(snapvm_bin())
            .args(["run", "--no-boot", "--api-sock"])
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

/// `PUT /snapshot/load` of `dir` into a waiting snapvm, resumed (checking
/// every chunk with `verify`): 204, and a client of the restored KV guest.
pub(crate) fn load_resumed(sock: &Path, port: u16, dir: &Path, verify: bool) -> redis::Connection {
    let r = put(
        sock,
        "/snapshot/load",
        json!({"snapshot_path": dir, "resume_vm": true, "verify": verify}),
    );
    assert_eq!(r.status, 204, "{r:?}");
    redis_con(port)
}

/// Shuts snapvm down through the API: 204, exit status 0, socket gone.
pub(crate) fn shutdown(vm: Proc, sock: &Path) -> Finished {
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

pub(crate) fn redis_con(port: u16) -> redis::Connection {
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

pub(crate) fn set(c: &mut redis::Connection, k: &str, v: &str) {
    redis::cmd("SET").arg(k).arg(v).query::<()>(c).unwrap();
}

pub(crate) fn get_key(c: &mut redis::Connection, k: &str) -> Option<String> {
    redis::cmd("GET").arg(k).query(c).unwrap()
}

/// Polls `GET /snapshot/{id}` until it ends; returns the last status.
pub(crate) fn wait_snapshot(vm: &Proc, sock: &Path, id: &str) -> Value {
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

pub(crate) fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
        .parse()
        .unwrap()
}

/// Polls `GET /metrics` until `name` reads `want` (at most T); returns the
/// last value read.
pub(crate) fn wait_metric(sock: &Path, name: &str, want: f64) -> f64 {
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
pub(crate) fn put(sock: &Path, path: &str, body: Value) -> Resp {
    req(sock, "PUT", path, Some(&body.to_string()))
}
