//! The default guest's KV server reached through virtio-vsock by real
//! Redis clients (redis-cli, redis-benchmark, raw TCP, the `redis` crate).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{free_port, Proc};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const LISTENING: &str = "kv: listening on vsock port 6379";

/// A running snapvm with its KV port; killed on drop.
struct Server {
    _proc: Proc,
    port: u16,
}

fn start(memory: &str) -> Server {
    start_with(memory, &[])
}

/// `start` with extra `snapvm run` arguments.
fn start_with(memory: &str, extra: &[&str]) -> Server {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["run", "--memory", memory, "--kv-listen", &listen];
    args.extend_from_slice(extra);
    let mut proc = Proc::spawn(&snapvm_bin(), &args);
    proc.wait_for_stdout(LISTENING, BOOT_TIMEOUT);
    Server { _proc: proc, port }
}

/// Runs redis-cli with `args`, returns its stdout.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("run redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

#[test]
fn ping_is_the_default_mode() {
    let s = start("256M");
    assert_eq!(cli(s.port, &["PING"]), "PONG");
}

#[test]
fn string_and_key_commands_through_redis_cli() {
    let s = start("256M");
    let p = s.port;
    assert_eq!(cli(p, &["SET", "k1", "hello"]), "OK");
    assert_eq!(cli(p, &["GET", "k1"]), "hello");
    assert_eq!(cli(p, &["APPEND", "k1", " world"]), "11");
    assert_eq!(cli(p, &["STRLEN", "k1"]), "11");
    assert_eq!(cli(p, &["INCR", "n"]), "1");
    assert_eq!(cli(p, &["INCR", "n"]), "2");
    assert_eq!(cli(p, &["MSET", "a", "1", "b", "2"]), "OK");
    assert_eq!(cli(p, &["MGET", "a", "b", "nope"]), "1\n2"); // nil prints as an empty last line
    assert_eq!(cli(p, &["EXISTS", "a", "b", "nope"]), "2");
    assert_eq!(cli(p, &["DBSIZE"]), "4");
    let mut keys: Vec<String> = cli(p, &["KEYS", "*"]).lines().map(String::from).collect();
    keys.sort();
    assert_eq!(keys, ["a", "b", "k1", "n"]);
    let scan = cli(p, &["SCAN", "0", "COUNT", "100"]);
    let mut lines: Vec<&str> = scan.lines().collect();
    assert_eq!(lines.remove(0), "0", "{scan}");
    lines.sort();
    assert_eq!(lines, ["a", "b", "k1", "n"]);
    assert_eq!(cli(p, &["DEL", "a", "nope"]), "1");
    assert_eq!(cli(p, &["GET", "a"]), "");
    assert_eq!(cli(p, &["DBSIZE"]), "3");
}

#[test]
fn redis_benchmark_with_200_connections() {
    let s = start("256M");
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &s.port.to_string(),
            "-c",
            "200",
            "-n",
            "20000",
            "-t",
            "set,get",
            "-q",
        ])
        .output()
        .expect("run redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for t in ["SET:", "GET:"] {
        let line = text
            .rsplit(['\r', '\n'])
            .find(|l| l.trim_start().starts_with(t) && l.contains("requests per second"));
        assert!(line.is_some(), "no {t} result in {text}");
    }
    assert_eq!(cli(s.port, &["PING"]), "PONG");
}

#[test]
fn populate_a_million_keys() {
    let s = start("1G");
    assert_eq!(cli(s.port, &["DEBUG", "POPULATE", "1000000"]), "OK");
    assert_eq!(cli(s.port, &["DBSIZE"]), "1000000");
}

fn read_until(stream: &mut TcpStream, buf: &mut Vec<u8>, done: impl Fn(&[u8]) -> bool) {
    let mut chunk = [0u8; 65536];
    while !done(buf) {
        let n = stream.read(&mut chunk).expect("read reply");
        assert!(n > 0, "connection closed after {} bytes", buf.len());
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn ten_thousand_pipelined_sets_then_gets() {
    let s = start("256M");
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    const N: usize = 10_000;
    let mut req = Vec::new();
    for i in 0..N {
        let (k, v) = (format!("key:{i}"), format!("value-{i}"));
        req.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
                k.len(),
                v.len()
            )
            .as_bytes(),
        );
    }
    c.write_all(&req).expect("write SETs");
    let mut buf = Vec::new();
    read_until(&mut c, &mut buf, |b| b.len() >= 5 * N);
    assert_eq!(buf, b"+OK\r\n".repeat(N));

    let mut req = Vec::new();
    let mut want = Vec::new();
    for i in 0..N {
        let (k, v) = (format!("key:{i}"), format!("value-{i}"));
        req.extend_from_slice(format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len()).as_bytes());
        want.extend_from_slice(format!("${}\r\n{v}\r\n", v.len()).as_bytes());
    }
    c.write_all(&req).expect("write GETs");
    let mut buf = Vec::new();
    read_until(&mut c, &mut buf, |b| b.len() >= want.len());
    assert_eq!(buf, want);
}

#[test]
fn protocol_error_closes_only_that_connection() {
    let s = start("256M");
    let mut other = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    other
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut bad = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    bad.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    bad.write_all(b"*1\r\n$abc\r\n").expect("write");
    let mut reply = Vec::new();
    bad.read_to_end(&mut reply).expect("read until close");
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("-ERR Protocol error"), "{reply}");
    other.write_all(b"PING\r\n").expect("write");
    let mut buf = Vec::new();
    read_until(&mut other, &mut buf, |b| b.ends_with(b"\r\n"));
    assert_eq!(buf, b"+PONG\r\n");
}

#[test]
fn out_of_memory_refuses_writes_but_keeps_serving() {
    let s = start("128M");
    let big = "x".repeat(100_000);
    let mut round = 0;
    let mut refused = None;
    // Fill until -OOM. The store may then finish an incremental rehash
    // while idle, which frees the old table: a write can fit again. So
    // fill again until even after an idle spell a 100 kB SET is refused.
    for _attempt in 0..10 {
        let mut oom = false;
        while round < 100 {
            let out = cli(
                s.port,
                &["DEBUG", "POPULATE", "200000", &format!("r{round}"), "64"],
            );
            round += 1;
            if out.contains("OOM") {
                oom = true;
                break;
            }
        }
        assert!(oom, "never ran out of memory");
        std::thread::sleep(Duration::from_millis(300));
        let set = cli(s.port, &["SET", "big", &big]);
        if set.contains("OOM") {
            refused = Some(set);
            break;
        }
        assert_eq!(set, "OK");
        assert_eq!(cli(s.port, &["DEL", "big"]), "1");
    }
    let set = refused.expect("a 100 kB SET was never refused");
    assert!(set.starts_with("OOM"), "{set}");
    assert_eq!(cli(s.port, &["STRLEN", "r0:0"]), "64");
    assert_eq!(cli(s.port, &["EXISTS", "r0:199999"]), "1");
    assert!(cli(s.port, &["INFO", "memory"]).contains("used_memory:"));
    assert_eq!(cli(s.port, &["PING"]), "PONG");
}

/// One populate far beyond the guest's RAM: it stops at `maxmemory` with
/// -OOM, and the heap keeps enough in reserve that replies which allocate
/// (INFO, KEYS) still work. (The store once counted only its own estimate,
/// ran the real heap dry and the guest died on the next INFO.)
#[test]
fn one_huge_populate_stops_at_oom_and_the_guest_survives() {
    let s = start("128M");
    let out = cli(s.port, &["DEBUG", "POPULATE", "5000000", "big", "100"]);
    assert!(out.contains("OOM"), "{out}");
    let info = cli(s.port, &["INFO", "memory"]);
    assert!(info.contains("used_memory:"), "{info}");
    let dbsize: u64 = cli(s.port, &["DBSIZE"])
        .parse()
        .expect("DBSIZE is a number");
    assert!(dbsize > 10_000, "{dbsize}");
    assert_eq!(cli(s.port, &["STRLEN", "big:0"]), "100");
    assert_eq!(cli(s.port, &["PING"]), "PONG");
}

#[test]
fn redis_crate_client() {
    let s = start("256M");
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/", s.port)).expect("client");
    let mut con = client.get_connection().expect("connect");
    let () = redis::cmd("SET")
        .arg("lib")
        .arg(42)
        .query(&mut con)
        .expect("SET");
    let v: i64 = redis::cmd("INCR").arg("lib").query(&mut con).expect("INCR");
    assert_eq!(v, 43);
    let v: String = redis::cmd("GET").arg("lib").query(&mut con).expect("GET");
    assert_eq!(v, "43");
    let n: i64 = redis::cmd("DBSIZE").query(&mut con).expect("DBSIZE");
    assert_eq!(n, 1);
}

#[test]
fn port_in_use_is_one_error_line() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = snapvm_tests::process::run(
        Path::new(&snapvm_bin()),
        &["run", "--kv-listen", &addr],
        BOOT_TIMEOUT,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{out:?}");
    assert!(
        lines[0].starts_with("snapvm: error: cannot listen on"),
        "{out:?}"
    );
}

/// Reads one complete RESP2 value from `stream` and returns its bytes.
fn read_reply(stream: &mut TcpStream) -> Vec<u8> {
    fn complete(buf: &[u8], at: usize) -> Option<usize> {
        let line_end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
        let line = std::str::from_utf8(&buf[at + 1..line_end]).expect("RESP header is text");
        let next = line_end + 2;
        match buf[at] {
            b'+' | b'-' | b':' => Some(next),
            b'$' => {
                let len: i64 = line.parse().expect("bulk length");
                if len < 0 {
                    return Some(next);
                }
                let end = next + len as usize + 2;
                (buf.len() >= end).then_some(end)
            }
            b'*' => {
                let count: i64 = line.parse().expect("array length");
                let mut pos = next;
                for _ in 0..count.max(0) {
                    pos = complete(buf, pos)?;
                }
                Some(pos)
            }
            other => panic!(
                "not a RESP type byte: {other:#x} in {:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }
    let mut buf = Vec::new();
    loop {
        if !buf.is_empty() {
            if let Some(end) = complete(&buf, 0) {
                assert_eq!(
                    end,
                    buf.len(),
                    "more than one reply: {:?}",
                    String::from_utf8_lossy(&buf)
                );
                return buf;
            }
        }
        let mut chunk = [0u8; 65536];
        let n = stream.read(&mut chunk).expect("read reply");
        assert!(
            n > 0,
            "connection closed mid-reply: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Every command of the list, with the exact bytes Redis 7 replies.
#[test]
fn every_command_has_its_exact_reply() {
    let s = start("256M");
    let mut conn = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut exchange = |args: &[&str], expected: &[u8]| {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        conn.write_all(req.as_bytes()).expect("send");
        let reply = read_reply(&mut conn);
        assert_eq!(
            String::from_utf8_lossy(&reply),
            String::from_utf8_lossy(expected),
            "reply to {args:?}"
        );
    };
    exchange(&["PING"], b"+PONG\r\n");
    exchange(&["PING", "hi"], b"$2\r\nhi\r\n");
    exchange(&["ECHO", "a b"], b"$3\r\na b\r\n");
    exchange(&["SET", "k", "v", "NX"], b"+OK\r\n");
    exchange(&["SET", "k", "w", "NX"], b"$-1\r\n");
    exchange(&["SET", "k", "w", "XX"], b"+OK\r\n");
    exchange(&["SET", "missing", "1", "XX"], b"$-1\r\n");
    exchange(&["GET", "k"], b"$1\r\nw\r\n");
    exchange(&["GET", "missing"], b"$-1\r\n");
    exchange(&["INCR", "n"], b":1\r\n");
    exchange(&["INCRBY", "n", "10"], b":11\r\n");
    exchange(&["DECR", "n"], b":10\r\n");
    exchange(
        &["INCR", "k"],
        b"-ERR value is not an integer or out of range\r\n",
    );
    exchange(&["MSET", "a", "1", "b", "2"], b"+OK\r\n");
    exchange(
        &["MGET", "a", "b", "missing"],
        b"*3\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n",
    );
    exchange(&["APPEND", "a", "23"], b":3\r\n");
    exchange(&["STRLEN", "a"], b":3\r\n");
    exchange(&["EXISTS", "a", "b", "missing"], b":2\r\n");
    exchange(&["DEL", "b", "missing"], b":1\r\n");
    exchange(&["DBSIZE"], b":3\r\n");
    exchange(&["KEYS", "[ab]"], b"*1\r\n$1\r\na\r\n");
    exchange(
        &["SCAN", "0", "MATCH", "n", "COUNT", "100"],
        b"*2\r\n$1\r\n0\r\n*1\r\n$1\r\nn\r\n",
    );
    exchange(&["SELECT", "0"], b"+OK\r\n");
    exchange(&["SELECT", "1"], b"-ERR DB index is out of range\r\n");
    exchange(
        &["CONFIG", "GET", "appendonly"],
        b"*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n",
    );
    exchange(&["CONFIG", "GET", "no-such-parameter"], b"*0\r\n");
    exchange(&["DEBUG", "POPULATE", "3", "p", "4"], b"+OK\r\n");
    exchange(&["GET", "p:2"], b"$4\r\nvalu\r\n");
    exchange(&["DBSIZE"], b":6\r\n");
    exchange(&["FLUSHALL"], b"+OK\r\n");
    exchange(&["DBSIZE"], b":0\r\n");
    exchange(
        &["GET"],
        b"-ERR wrong number of arguments for 'get' command\r\n",
    );
    exchange(
        &["FOO", "bar"],
        b"-ERR unknown command 'FOO', with args beginning with: 'bar' \r\n",
    );
    exchange(&["PROBE", "RESET"], b"+OK\r\n");
    exchange(&["CONFIG", "RESETSTAT"], b"+OK\r\n");

    // Replies whose content varies: check their shape.
    for (args, must_contain) in [
        (&["INFO"][..], "# Server\r\n"),
        (&["INFO", "memory"][..], "used_memory:"),
        (&["INFO", "stats"][..], "total_commands_processed:"),
        (&["INFO", "latency"][..], "probe_max_loop_gap_us:"),
    ] {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        conn.write_all(req.as_bytes()).expect("send");
        let reply = String::from_utf8_lossy(&read_reply(&mut conn)).into_owned();
        assert!(
            reply.starts_with('$') && reply.contains(must_contain),
            "{args:?}: {reply}"
        );
    }
    conn.write_all(b"*1\r\n$7\r\nCOMMAND\r\n").expect("send");
    let reply = String::from_utf8_lossy(&read_reply(&mut conn)).into_owned();
    assert!(
        reply.starts_with('*') && reply.contains("\r\nget\r\n"),
        "COMMAND: {reply}"
    );
    conn.write_all(b"*2\r\n$7\r\nCOMMAND\r\n$4\r\nDOCS\r\n")
        .expect("send");
    let reply = String::from_utf8_lossy(&read_reply(&mut conn)).into_owned();
    assert!(
        reply.starts_with('*') || reply.starts_with('%'),
        "COMMAND DOCS: {reply}"
    );
}

/// The default guest idles through the paravirtual wait between requests:
/// with no client, the whole snapvm process must use a small part of a core
/// (once the staging pool, populated once at start, is ready).
#[test]
fn idle_kv_guest_does_not_burn_a_core() {
    let mut s = start_with("256M", &["--log-level", "info"]);
    s._proc
        .wait_for_stderr("snapshot staging pool ready: 256 MiB", BOOT_TIMEOUT);
    assert_eq!(cli(s.port, &["PING"]), "PONG");
    let before = s._proc.cpu_time();
    std::thread::sleep(Duration::from_secs(2));
    let used = s._proc.cpu_time() - before;
    assert!(
        used < Duration::from_millis(300),
        "idle KV guest used {used:?} of CPU in 2 s"
    );
}
