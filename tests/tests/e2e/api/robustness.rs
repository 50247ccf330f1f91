//! Hostile and careless API clients: malformed requests of every kind
//! never stop the server or touch the VM, and a client that hangs up
//! mid-request changes nothing but its own answer (issue #7).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::json;

use super::harness::*;

/// Deterministic noise (xorshift*), so a failure replays.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn malformed_requests_never_stop_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let (vm, sock, port) = start_kv(tmp.path(), &[]);
    let alive = |why: &str| {
        let r = get(&sock, "/");
        assert_eq!(r.status, 200, "after {why}: {r:?}");
        assert_eq!(r.json()["state"], "Running", "after {why}");
    };
    let send = |raw: &[u8]| exchange(&sock, raw);

    // Random bytes, and random bytes after a valid request line.
    let mut noise = Noise(0x5eed_1234_abcd_0001);
    for i in 0..200 {
        let n = (noise.next() % 4096) as usize + 1;
        let mut raw = if i % 2 == 0 {
            Vec::new()
        } else {
            b"PUT /snapshot/create HTTP/1.1\r\n".to_vec()
        };
        raw.extend(noise.bytes(n));
        if let Some(r) = send(&raw) {
            assert!(r.status >= 400, "{r:?}");
        }
    }
    alive("random bytes");

    // Truncated requests: the client hangs up mid-way.
    let full = "PATCH /vm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 19\r\n\r\n{\"state\": \"Paused\"}";
    for cut in (1..full.len()).step_by(7) {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(&full.as_bytes()[..cut]).unwrap();
        drop(s);
    }
    alive("truncated requests");
    assert_eq!(
        get(&sock, "/").json()["state"],
        "Running",
        "a truncated PATCH took effect"
    );

    // A body shorter than its Content-Length, then the write side closed.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"PUT /actions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"action_type\"")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    alive("short body");

    // Huge head: one 1 MiB header, and 10 000 small ones.
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(1 << 20)
    );
    if let Some(r) = send(huge.as_bytes()) {
        assert_eq!(r.status, 431, "{r:?}");
    }
    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..10_000 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("Connection: close\r\n\r\n");
    if let Some(r) = send(many.as_bytes()) {
        assert!(r.status == 431 || r.status == 400, "{r:?}");
    }
    alive("huge heads");

    // Huge bodies: declared and sent, declared only, chunked.
    let body = "x".repeat(1 << 20);
    let r = send(format!("PUT /actions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
    if let Some(r) = r {
        r.assert_fault(413, "request body larger than 65536 bytes");
    }
    let r = send(b"PUT /actions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 99999999999\r\n\r\n{}");
    if let Some(r) = r {
        assert!(r.status == 413 || r.status == 400, "{r:?}");
    }
    let mut chunked = String::from("PUT /snapshot/load HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..100 {
        chunked.push_str(&format!("400\r\n{}\r\n", "y".repeat(0x400)));
    }
    chunked.push_str("0\r\n\r\n");
    send(chunked.as_bytes())
        .unwrap()
        .assert_fault(413, "request body larger than 65536 bytes");
    send(b"PUT /actions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnonsense\r\n");
    alive("huge bodies");

    // Wrong content types and bodies that are not the JSON asked for.
    for ctype in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "\u{1}",
    ] {
        let raw = format!("PUT /actions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {ctype}\r\nContent-Length: 27\r\n\r\n{{\"action_type\": \"Shutdown\"}}");
        let r = send(raw.as_bytes()).unwrap();
        assert_eq!(r.status, 400, "{ctype}: {r:?}");
    }
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for body in [
        "null",
        "[]",
        "\"Shutdown\"",
        "{\"action_type\": 7}",
        "\u{fffd}\u{fffd}",
        "{\"action_type\": \"Shutdown\"} trailing",
        &deep[..60_000],
    ] {
        let r = req(&sock, "PUT", "/actions", Some(body));
        assert_eq!(r.status, 400, "{body:.40}: {r:?}");
    }
    let mut raw =
        b"PATCH /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 6\r\n\r\n".to_vec();
    raw.extend([0xff, 0xfe, b'{', 0x80, b'}', 0x00]);
    assert_eq!(send(&raw).unwrap().status, 400);
    alive("wrong bodies");

    // Odd but valid HTTP: 1.0, keep-alive with pipelining, absolute URIs.
    let r = send(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(r.status, 200);
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /snapshots HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert_eq!(out.matches("HTTP/1.1 404 Not Found").count(), 1, "{out}");
    assert_eq!(get(&sock, "http://localhost/vm/config").status, 200);

    // Many idle connections do not block the others.
    let idle: Vec<UnixStream> = (0..64)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.write_all(b"GET / HT").unwrap();
            s
        })
        .collect();
    alive("idle connections");
    drop(idle);

    // The VM was never touched by any of it.
    let mut kv = redis_con(port);
    set(&mut kv, "still", "here");
    assert_eq!(get_key(&mut kv, "still").as_deref(), Some("here"));
    let out = shutdown(vm, &sock);
    assert!(!out.stderr.contains("ERROR"), "{}", out.stderr);
}

/// Issue #7: an API client that goes away mid-request changes nothing but
/// its own answer — the snapshot it asked for still completes, the server
/// keeps answering, the guest keeps its data, and the next snapshot works.
#[test]
fn a_client_disconnecting_mid_request_leaves_server_snapshot_and_guest_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let (vm, sock, port) = start_kv(tmp.path(), &[]);
    let mut kv = redis_con(port);
    for i in 0..200 {
        set(&mut kv, &format!("k{i}"), &format!("v{i}"));
    }
    // 1. A waiting create whose client hangs up right after sending it.
    let first = tmp.path().join("abandoned");
    let body = json!({"snapshot_path": first, "workers": 2}).to_string();
    {
        let mut s = UnixStream::connect(&sock).unwrap();
        let raw = format!(
            "PUT /snapshot/create?wait=true HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(raw.as_bytes()).unwrap();
    } // dropped: the reply has nobody to go to
      // 2. A request cut off inside its body, then a hang-up.
    {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(
            b"PUT /vm HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"state\": \"Pau",
        )
        .unwrap();
    }
    // 3. A request head cut off in the middle of a header line.
    {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"GET /snapshots HTTP/1.1\r\nHost: loc")
            .unwrap();
    }
    // The abandoned snapshot still ran to completion.
    let start = Instant::now();
    let id = loop {
        let list = get(&sock, "/snapshots");
        assert_eq!(list.status, 200, "{list:?}");
        if let Some(s) = list.json()["snapshots"]
            .as_array()
            .and_then(|a| a.first().cloned())
        {
            break s["id"].as_str().unwrap().to_string();
        }
        assert!(start.elapsed() < T, "the abandoned create never registered");
        std::thread::sleep(Duration::from_millis(20));
    };
    let s = wait_snapshot(&vm, &sock, &id);
    assert_eq!(s["state"], "done", "{s}");
    assert!(first.join("state.bin").exists());
    // The cut-off PATCH did not pause the VM; the guest serves its keys.
    let st = get(&sock, "/");
    assert_eq!(st.json()["state"], "Running", "{st:?}");
    for i in (0..200).step_by(17) {
        assert_eq!(get_key(&mut kv, &format!("k{i}")), Some(format!("v{i}")));
    }
    // The next snapshot works, through an ordinary waiting request.
    let second = tmp.path().join("after");
    let r = req(
        &sock,
        "PUT",
        "/snapshot/create?wait=true",
        Some(&json!({"snapshot_path": second, "workers": 2}).to_string()),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["state"], "done", "{r:?}");
    let out = shutdown(vm, &sock);
    assert!(!out.stderr.contains("ERROR"), "{}", out.stderr);
}
