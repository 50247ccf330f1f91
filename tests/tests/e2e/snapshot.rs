//! Snapshots through the `snapvm` binary: `--snapshot-at`, SIGUSR1,
//! `--restore` (counter and KV guests), and refusals of damaged snapshots.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{free_port, run, Finished, Proc};

const T: Duration = Duration::from_secs(60);
const LISTENING: &str = "kv: listening on vsock port 6379";

/// A KV guest with `--snapshot-dir base` (SIGUSR1 snapshots into
/// `base-N`), listening on a free port.
fn start_kv_with_snapshot_dir(base: &Path) -> (Proc, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let dir = base.to_str().expect("utf-8 path");
    let mut vm = Proc::spawn(
        &snapvm_bin(),
        &[
            "run",
            "--memory",
            "512M",
            "--kv-listen",
            &listen,
            "--snapshot-dir",
            dir,
            "--log-level",
            "info",
        ],
    );
    vm.wait_for_stdout(LISTENING, T);
    (vm, port)
}

/// `snapvm run --restore dir` on a free port, its console in `serial`.
fn restore_kv(dir: &Path, serial: &Path, verify: bool) -> (Proc, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["run", "--restore", dir.to_str().expect("utf-8 path")];
    if verify {
        args.push("--verify");
    }
    args.extend([
        "--kv-listen",
        &listen,
        "--serial",
        serial.to_str().expect("utf-8 path"),
    ]);
    (Proc::spawn(&snapvm_bin(), &args), port)
}

/// The first answer of a restored KV guest to `args`, retried until it
/// listens (within `T`).
fn first_reply(restored: &Proc, port: u16, args: &[&str]) -> String {
    let start = Instant::now();
    loop {
        if let Some(v) = redis(port, args) {
            return v;
        }
        assert!(
            start.elapsed() < T,
            "restored KV never answered\nstderr:\n{}",
            restored.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `dir/metrics.json` exists: the snapshot is persisted.
fn wait_for_snapshot(proc: &Proc, dir: &Path) -> String {
    let start = Instant::now();
    loop {
        if let Ok(json) = std::fs::read_to_string(dir.join("metrics.json")) {
            return json;
        }
        assert!(
            start.elapsed() < T,
            "no snapshot in {dir:?}\nstderr:\n{}",
            proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One error line, prefixed, no panic, exit status 1.
fn assert_one_error_line(out: &Finished, expected: &[&str]) {
    assert_eq!(out.code(), Some(1), "{out:?}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected exactly one stderr line: {out:?}");
    assert!(lines[0].starts_with("snapvm: error: "), "{}", lines[0]);
    for part in expected {
        assert!(lines[0].contains(part), "{:?} lacks {part:?}", lines[0]);
    }
}

/// A counter guest snapshotted by `--snapshot-at`; returns the directory.
fn counter_snapshot(tmp: &Path, memory: &str) -> std::path::PathBuf {
    let dir = tmp.join("snap");
    let serial = tmp.join("serial.txt");
    let proc = Proc::spawn(
        &snapvm_bin(),
        &[
            "run",
            "--cmdline",
            "mode=counter",
            "--vcpus",
            "2",
            "--memory",
            memory,
            "--snapshot-at",
            "0.5",
            "--snapshot-dir",
            dir.to_str().unwrap(),
            "--serial",
            serial.to_str().unwrap(),
            "--log-level",
            "info",
        ],
    );
    let json = wait_for_snapshot(&proc, &dir);
    assert!(json.contains("\"strategy\":\"async-fork\""), "{json}");
    // metrics.json is written just before the "done" line is logged.
    let start = Instant::now();
    while !proc.stderr().contains("done: async-fork") {
        assert!(start.elapsed() < T, "{}", proc.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(proc);
    dir
}

#[test]
fn snapshot_at_then_restore_runs_the_guest_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = counter_snapshot(tmp.path(), "256M");
    let serial = tmp.path().join("serial-restored.txt");
    let restored = Proc::spawn(
        &snapvm_bin(),
        &[
            "run",
            "--restore",
            dir.to_str().unwrap(),
            "--verify",
            "--serial",
            serial.to_str().unwrap(),
            "--log-level",
            "info",
        ],
    );
    let start = Instant::now();
    while !restored.stderr().contains("and resumed the guest") {
        assert!(
            start.elapsed() < T,
            "restore did not finish\nstderr:\n{}",
            restored.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The counter guest spins on both vCPUs: a running restored guest
    // keeps burning CPU time; a stopped one does not.
    let before = restored.cpu_time();
    while restored.cpu_time() < before + Duration::from_millis(500) {
        assert!(
            start.elapsed() < T,
            "restored guest does not run\nstderr:\n{}",
            restored.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The restored VM continues the serial log where it was: no new boot.
    std::thread::sleep(Duration::from_millis(200));
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        !out.contains("booted"),
        "the restored guest rebooted: {out}"
    );
}

fn redis(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("run redis-cli");
    (out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("Could not connect"))
        .then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

#[test]
fn kv_snapshot_by_sigusr1_restores_the_data_as_of_the_fork() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("kv");
    let (vm, port) = start_kv_with_snapshot_dir(&base);
    assert_eq!(redis(port, &["SET", "a", "1"]).as_deref(), Some("OK"));
    assert_eq!(redis(port, &["SET", "b", "2"]).as_deref(), Some("OK"));
    // SAFETY: kill(2) on our own child's pid has no memory-safety concerns.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGUSR1) }, 0);
    let dir = base.with_file_name("kv-1");
    wait_for_snapshot(&vm, &dir);
    // The running VM goes on and changes everything.
    assert_eq!(redis(port, &["SET", "a", "changed"]).as_deref(), Some("OK"));
    assert_eq!(redis(port, &["SET", "c", "3"]).as_deref(), Some("OK"));
    assert_eq!(redis(port, &["GET", "a"]).as_deref(), Some("changed"));
    assert_eq!(redis(port, &["FLUSHALL"]).as_deref(), Some("OK"));
    assert_eq!(redis(port, &["DBSIZE"]).as_deref(), Some("0"));

    let (restored, port2) = restore_kv(&dir, &tmp.path().join("serial-restored.txt"), false);
    let a = first_reply(&restored, port2, &["GET", "a"]);
    assert_eq!(a, "1");
    assert_eq!(redis(port2, &["GET", "b"]).as_deref(), Some("2"));
    assert_eq!(redis(port2, &["EXISTS", "c"]).as_deref(), Some("0"));
    assert_eq!(redis(port2, &["DBSIZE"]).as_deref(), Some("2"));
    // The original is untouched by the restore.
    assert_eq!(redis(port, &["DBSIZE"]).as_deref(), Some("0"));
}

#[test]
fn damaged_snapshots_are_refused_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = counter_snapshot(tmp.path(), "128M");
    let copy = |name: &str| {
        let to = tmp.path().join(name);
        std::fs::create_dir(&to).unwrap();
        for f in ["state.bin", "memory.img"] {
            std::fs::copy(dir.join(f), to.join(f)).unwrap();
        }
        to
    };
    let restore = |d: &Path, verify: bool| {
        let mut args = vec!["run", "--restore", d.to_str().unwrap()];
        if verify {
            args.push("--verify");
        }
        run(&snapvm_bin(), &args, T)
    };

    let flipped = copy("flipped");
    let mut state = std::fs::read(flipped.join("state.bin")).unwrap();
    let at = state.len() / 2;
    state[at] ^= 0x40;
    std::fs::write(flipped.join("state.bin"), state).unwrap();
    assert_one_error_line(
        &restore(&flipped, false),
        &["state.bin", "checksum mismatch"],
    );

    let truncated = copy("truncated");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("memory.img"))
        .unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    assert_one_error_line(
        &restore(&truncated, false),
        &["memory image is 67108864 bytes"],
    );

    // A damaged memory chunk is caught by --verify.
    let chunk = copy("chunk");
    let mut img = std::fs::read(chunk.join("memory.img")).unwrap();
    img[(1 << 20) + 4096] ^= 0x01;
    std::fs::write(chunk.join("memory.img"), img).unwrap();
    assert_one_error_line(&restore(&chunk, true), &["chunk 0", "memory image"]);

    assert_one_error_line(
        &restore(&tmp.path().join("missing"), false),
        &["missing", "state.bin"],
    );
}

#[test]
fn snapshot_flag_errors() {
    let out = run(
        &snapvm_bin(),
        &[
            "run",
            "--snapshot-dir",
            "/tmp/x",
            "--snapshot-mode",
            "bogus",
        ],
        T,
    );
    assert_one_error_line(&out, &["unknown snapshot mode 'bogus'"]);
    let out = run(&snapvm_bin(), &["run", "--snapshot-at", "1"], T);
    assert_one_error_line(&out, &["--snapshot-at needs --snapshot-dir"]);
    let out = run(&snapvm_bin(), &["run", "--verify"], T);
    assert_one_error_line(&out, &["--verify needs --restore"]);
    let out = run(
        &snapvm_bin(),
        &["run", "--restore", "/tmp/x", "--cmdline", "mode=idle"],
        T,
    );
    assert_one_error_line(&out, &["--cmdline"]);
}

#[test]
fn kv_snapshot_under_load_restores_a_consistent_store() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("load");
    let (vm, port) = start_kv_with_snapshot_dir(&base);
    let mut bench = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-t", "set", "-n", "100000"])
        .args(["-r", "50000", "-d", "200", "-c", "4", "-q"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run redis-benchmark");
    // Snapshot while the keyspace grows.
    let start = Instant::now();
    while redis(port, &["DBSIZE"])
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0)
        < 1000
    {
        assert!(start.elapsed() < T, "the benchmark does not write");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before: u64 = redis(port, &["DBSIZE"]).unwrap().parse().unwrap();
    // SAFETY: kill(2) on our own child's pid has no memory-safety concerns.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGUSR1) }, 0);
    let dir = base.with_file_name("load-1");
    wait_for_snapshot(&vm, &dir);
    let after: u64 = redis(port, &["DBSIZE"]).unwrap().parse().unwrap();
    assert!(bench.wait().expect("redis-benchmark").success());

    let (restored, port2) = restore_kv(&dir, &tmp.path().join("serial-restored.txt"), true);
    let n: u64 = first_reply(&restored, port2, &["DBSIZE"]).parse().unwrap();
    assert!(
        before <= n && n <= after,
        "restored {n} keys, not within {before}..={after}"
    );
    assert_eq!(redis(port2, &["SET", "x", "y"]).as_deref(), Some("OK"));
    assert_eq!(redis(port2, &["GET", "x"]).as_deref(), Some("y"));
}
