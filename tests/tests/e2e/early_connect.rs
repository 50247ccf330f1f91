//! Clients that connect the moment `--kv-listen` opens (health checks,
//! `wait-for-it`, test harnesses) are served, never reset: after a boot,
//! a `--restore` and a `PUT /snapshot/load`. They wait in the listen
//! backlog until the guest's vsock device is up (issue #21).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{free_port, Proc};
use snapvm_tests::redis_cli::redis;
use snapvm_tests::snapvm::restore_kv;

const T: Duration = Duration::from_secs(60);
const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// Connects to `port` as soon as it accepts (trying every millisecond).
fn connect_the_moment_it_opens(vm: &Proc, port: u16) -> TcpStream {
    let start = Instant::now();
    loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            return s;
        }
        assert!(
            start.elapsed() < T,
            "port {port} never opened\nstderr:\n{}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends PING on `s` and returns the reply line (or what went wrong).
fn ping(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(T)).expect("read timeout");
    if let Err(e) = s.write_all(PING) {
        return format!("write failed: {e}");
    }
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n") {
        match s.read(&mut byte) {
            Ok(0) => return format!("closed after {:?}", String::from_utf8_lossy(&reply)),
            Ok(_) => reply.push(byte[0]),
            Err(e) => return format!("read failed: {e}"),
        }
    }
    String::from_utf8_lossy(&reply).into_owned()
}

fn spawn(args: &[&str]) -> Proc {
    Proc::spawn(&snapvm_bin(), args)
}

#[test]
fn twenty_boots_answer_a_ping_sent_the_moment_the_port_opens() {
    for round in 0..20 {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let vm = spawn(&["run", "--memory", "256M", "--kv-listen", &listen]);
        let mut s = connect_the_moment_it_opens(&vm, port);
        let reply = ping(&mut s);
        assert_eq!(
            reply,
            "+PONG\r\n",
            "boot {round}: early client not served\nstderr:\n{}",
            vm.stderr()
        );
    }
}

/// A KV guest snapshotted by SIGUSR1 into `base-1`, with one key.
fn kv_snapshot(base: &Path) -> std::path::PathBuf {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut vm = spawn(&[
        "run",
        "--memory",
        "256M",
        "--kv-listen",
        &listen,
        "--snapshot-dir",
        base.to_str().expect("utf-8 path"),
    ]);
    vm.wait_for_stdout("kv: listening on vsock port 6379", T);
    assert_eq!(redis(port, &["SET", "k", "v"]).as_deref(), Some("OK"));
    // SAFETY: kill(2) on our own child's pid has no memory-safety concerns.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGUSR1) }, 0);
    let dir = base.with_file_name(format!(
        "{}-1",
        base.file_name().and_then(|n| n.to_str()).expect("name")
    ));
    let start = Instant::now();
    while !dir.join("metrics.json").exists() {
        assert!(start.elapsed() < T, "no snapshot\n{}", vm.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    dir
}

#[test]
fn restored_and_loaded_vms_answer_a_ping_sent_the_moment_the_port_opens() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = kv_snapshot(&tmp.path().join("kv"));
    let d = dir.to_str().expect("utf-8 path");
    for round in 0..5 {
        let serial = tmp.path().join(format!("serial-{round}.txt"));
        let (vm, port) = restore_kv(&dir, &serial, &[]);
        let mut s = connect_the_moment_it_opens(&vm, port);
        let reply = ping(&mut s);
        assert_eq!(
            reply,
            "+PONG\r\n",
            "restore {round}: early client not served\nstderr:\n{}",
            vm.stderr()
        );
    }

    // Waiting for a load: a client that connects before the load is
    // served by the VM the load brings.
    let sock = tmp.path().join("api.sock");
    let port = free_port();
    let vm = Proc::spawn_cmd(
        Command::new(snapvm_bin())
            .args(["run", "--no-boot", "--api-sock"])
            .arg(&sock)
            .arg("--kv-listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--serial")
            .arg(tmp.path().join("serial-load.txt")),
    );
    let mut s = connect_the_moment_it_opens(&vm, port);
    s.write_all(PING).expect("send PING before the load");
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < T, "no API socket\n{}", vm.stderr());
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = Command::new(snapvm_bin())
        .args(["restore", "--api-sock"])
        .arg(&sock)
        .args(["--dir", d])
        .output()
        .expect("run snapvm restore");
    assert!(out.status.success(), "{out:?}");
    s.set_read_timeout(Some(T)).expect("read timeout");
    let mut reply = [0u8; 7];
    s.read_exact(&mut reply).expect("the PING's reply");
    assert_eq!(&reply, b"+PONG\r\n");
    assert_eq!(redis(port, &["GET", "k"]).as_deref(), Some("v"));
}
