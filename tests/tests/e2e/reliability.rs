//! Faults injected into a real snapvm's snapshots while a KV guest serves:
//! a full disk (a small tmpfs), EIO under a worker and under the fault
//! path, a panicking copier, a failing fault path, and SIGKILL while the
//! memory is being written. In every case the guest keeps serving its keys, no page of
//! snapvm is left write-protected (pagemap bit 57), snapvm's threads and
//! fds come back to where they were, nothing incomplete sits at the
//! snapshot's path or can be restored, and the next snapshot succeeds and
//! restores.
//!
//! Engine faults reach snapvm through `SNAPVM_INJECT` (the snapshot crate's
//! test hook, `snapvm_snapshot::inject::ENV`), which applies to the first snapshot
//! only.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{free_port, run, Proc};
use snapvm_tests::redis_cli::{first_reply, redis};
use snapvm_tests::snapvm::restore_kv;

const T: Duration = Duration::from_secs(120);
const LISTENING: &str = "kv: listening on vsock port 6379";
/// Keys written before any snapshot, checked in the running guest after
/// every fault and in every restored guest.
const FIXED: usize = 200;

fn fixed_value(i: usize) -> String {
    format!("value-{i}-{}", i * 7919)
}

/// Writes the fixed keys in one pipeline.
fn write_fixed(port: u16) {
    let mut args = vec!["MSET".to_string()];
    for i in 0..FIXED {
        args.push(format!("fixed:{i}"));
        args.push(fixed_value(i));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(redis(port, &args).as_deref(), Some("OK"));
}

/// Every fixed key holds its value.
fn assert_fixed(port: u16, who: &str) {
    let keys: Vec<String> = (0..FIXED).map(|i| format!("fixed:{i}")).collect();
    let mut args = vec!["MGET"];
    args.extend(keys.iter().map(String::as_str));
    let got = redis(port, &args).unwrap_or_else(|| panic!("{who}: MGET failed"));
    let want: Vec<String> = (0..FIXED).map(fixed_value).collect();
    assert_eq!(got.lines().collect::<Vec<_>>(), want, "{who}: fixed keys");
}

/// A KV guest snapshotting into `base-N` on SIGUSR1, with `env` set.
struct Vm {
    proc: Proc,
    port: u16,
    base: PathBuf,
}

impl Vm {
    fn start(base: &Path, memory: &str, env: &[(&str, &str)]) -> Vm {
        Vm::start_args(base, memory, env, &[])
    }

    /// `start` with extra `snapvm run` arguments.
    fn start_args(base: &Path, memory: &str, env: &[(&str, &str)], args: &[&str]) -> Vm {
        let port = free_port();
        let mut cmd = Command::new(snapvm_bin());
        cmd.args(["run", "--memory", memory, "--kv-listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--snapshot-dir")
            .arg(base)
            .args(["--log-level", "info"])
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = Proc::spawn_cmd(&mut cmd);
        proc.wait_for_stdout(LISTENING, T);
        write_fixed(port);
        Vm {
            proc,
            port,
            base: base.into(),
        }
    }

    fn pid(&self) -> i32 {
        self.proc.pid() as i32
    }

    /// Snapshot `n`'s directory.
    fn dir(&self, n: u32) -> PathBuf {
        let mut s = self.base.clone().into_os_string();
        s.push(format!("-{n}"));
        s.into()
    }

    fn sigusr1(&self) {
        // SAFETY: kill(2) on our own child's pid; no memory involved.
        assert_eq!(unsafe { libc::kill(self.pid(), libc::SIGUSR1) }, 0);
    }

    /// Waits for snapshot `n`'s outcome in the log: Ok(()) when done,
    /// Err(the failure line) when failed.
    fn outcome(&self, n: u32) -> Result<(), String> {
        let dir = self.dir(n);
        let done = format!("snapshot {} done", dir.display());
        let failed = format!("snapshot {} failed", dir.display());
        let start = Instant::now();
        loop {
            let log = self.proc.stderr();
            if log.contains(&done) {
                return Ok(());
            }
            if let Some(line) = log.lines().find(|l| l.contains(&failed)) {
                return Err(line.to_string());
            }
            assert!(
                start.elapsed() < T,
                "snapshot {n}: no outcome\nstderr:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (threads, fds) of snapvm.
    fn counts(&self) -> (usize, usize) {
        let n = |what: &str| {
            std::fs::read_dir(format!("/proc/{}/{what}", self.pid()))
                .expect("snapvm's /proc entry")
                .count()
        };
        (n("task"), n("fd"))
    }

    /// Waits (bounded) until snapvm's threads and fds are back to at most
    /// `base`: the snapshot thread exits and the sockets of earlier
    /// redis-cli clients close asynchronously (one may still be open when
    /// `base` was taken, so fewer is fine; more is a leak).
    fn assert_counts_back_to(&self, base: (usize, usize)) {
        let start = Instant::now();
        while {
            let now = self.counts();
            now.0 > base.0 || now.1 > base.1
        } {
            assert!(
                start.elapsed() < T,
                "(threads, fds) {:?}, were {base:?} before the snapshot",
                self.counts()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Pages of process `pid` still write-protected by userfaultfd (pagemap
/// bit 57), over every mapping (guest RAM included).
fn wp_pages(pid: i32) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let pagemap = File::open(format!("/proc/{pid}/pagemap")).expect("pagemap");
    let mut count = 0;
    let mut buf = vec![0u8; 8 * 4096];
    for line in maps.lines() {
        let range = line.split_whitespace().next().expect("range");
        let (a, b) = range.split_once('-').expect("a-b");
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut page = a / 4096;
        while page < b / 4096 {
            let n = ((b / 4096 - page) as usize).min(4096);
            // [vsyscall] and the like cannot be read: not guest memory.
            if pagemap.read_exact_at(&mut buf[..n * 8], page * 8).is_err() {
                break;
            }
            count += buf[..n * 8]
                .chunks_exact(8)
                .filter(|e| u64::from_ne_bytes((*e).try_into().unwrap()) & (1 << 57) != 0)
                .count();
            page += n as u64;
        }
    }
    count
}

/// Restores `dir` in a second snapvm and checks the fixed keys; returns
/// the restored DBSIZE.
fn restore_and_check(dir: &Path) -> u64 {
    let (restored, port) = restore_kv(dir, Path::new("/dev/null"), &[]);
    let n = first_reply(&restored, port, &["DBSIZE"], T);
    assert_fixed(port, "restored guest");
    n.parse().expect("DBSIZE")
}

/// Entries of `dir` whose name contains `part`.
fn entries_with(dir: &Path, part: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(part))
        .collect()
}

/// The common shape: snapshot 1 fails with `expected` in its log line
/// (while the guest keeps serving), everything is rolled back, and
/// snapshot 2 succeeds and restores.
fn first_snapshot_fails_then_next_restores(inject: &str, expected: &[&str]) {
    // The injected pool failure hits the pool's allocation at the first
    // snapshot; by default the pool would exist before it.
    let args: &[&str] = if inject.contains("fail_staging") {
        &["--snapshot-pool", "first-snapshot"]
    } else {
        &[]
    };
    let tmp = tempfile::tempdir().unwrap();
    let vm = Vm::start_args(
        &tmp.path().join("kv"),
        "256M",
        &[("SNAPVM_INJECT", inject)],
        args,
    );
    assert_eq!(
        redis(vm.port, &["DEBUG", "POPULATE", "20000", "pop", "100"]).as_deref(),
        Some("OK")
    );
    let before = vm.counts();
    vm.sigusr1();
    // The guest writes while the snapshot runs (the fault path sees them).
    for i in 0..20 {
        assert_eq!(
            redis(vm.port, &["SET", &format!("during:{i}"), "x"]).as_deref(),
            Some("OK")
        );
    }
    let line = vm.outcome(1).expect_err("the injected snapshot must fail");
    for part in expected {
        assert!(line.contains(part), "{line:?} lacks {part:?}");
    }
    assert!(line.contains("the VM keeps running"), "{line}");
    assert!(
        !vm.dir(1).exists(),
        "a failed snapshot left {:?}",
        vm.dir(1)
    );
    assert!(entries_with(tmp.path(), ".incomplete-").is_empty());
    assert_fixed(vm.port, "running guest after the fault");
    assert_eq!(redis(vm.port, &["DBSIZE"]).as_deref(), Some("20220"));
    assert_eq!(wp_pages(vm.pid()), 0, "write protection left behind");
    vm.assert_counts_back_to(before);

    vm.sigusr1();
    vm.outcome(2).expect("the next snapshot succeeds");
    // A successful snapshot leaves guest RAM protected where unwritten:
    // that is the dirty tracking for the next (incremental) one. Guest
    // writes go on (each lifts its chunk's protection) and the data is
    // intact.
    assert_eq!(
        redis(vm.port, &["SET", "after:tracking", "y"]).as_deref(),
        Some("OK")
    );
    assert_fixed(vm.port, "running guest under dirty tracking");
    assert_eq!(restore_and_check(&vm.dir(2)), 20220);
}

#[test]
fn worker_panic_is_caught_and_rolled_back() {
    first_snapshot_fails_then_next_restores(
        "panic_worker_copy_at=0",
        &[
            "copy failed: worker: panicked (copying unit",
            "injected worker panic at copy 0",
        ],
    );
}

#[test]
fn fault_path_panic_is_caught_and_rolled_back() {
    first_snapshot_fails_then_next_restores(
        "panic_fault_path_at=0,hold_workers_until_fault_copies=1",
        &[
            "copy failed: fault path: panicked",
            "injected fault-path panic at copy 0",
        ],
    );
}

/// No staging pool (its allocation fails), so the fault path writes the
/// chunk a guest write hits itself, and the disk fails under it.
#[test]
fn a_failing_disk_under_the_fault_path_rolls_back() {
    first_snapshot_fails_then_next_restores(
        "fail_staging,persist_fail_after=0:EIO,hold_workers_until_fault_copies=1",
        &[
            "copy failed: fault path: write ",
            "memory.img: Input/output error (os error 5)",
        ],
    );
}

#[test]
fn fault_path_failure_rolls_back() {
    first_snapshot_fails_then_next_restores(
        "fail_fault_path_at=0,hold_workers_until_fault_copies=1",
        &["copy failed: fault path: injected failure (fault-path failure at copy 0"],
    );
}

#[test]
fn eio_while_persisting_leaves_nothing_and_next_snapshot_restores() {
    first_snapshot_fails_then_next_restores(
        "persist_fail_after=1048576:EIO",
        // A worker's write, or a fault's that found no staging slot ready
        // (the first snapshot's pool fills while it runs).
        &[
            "copy failed: ",
            ": write ",
            "memory.img: Input/output error (os error 5)",
        ],
    );
}

/// A tmpfs mounted for one test, unmounted (lazily, so a straggler cannot
/// keep it) when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(out.status.success(), "mount tmpfs (needs root): {out:?}");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.path())
            .output()
            .expect("run mount");
        assert!(out.status.success(), "remount tmpfs: {out:?}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// A real full disk: the first snapshot goes to a 32 MiB tmpfs and fails
/// with ENOSPC, leaving nothing on it; the guest keeps serving; after the
/// tmpfs is grown the next snapshot succeeds and restores.
#[test]
fn full_disk_fails_the_snapshot_and_the_guest_keeps_serving() {
    let fs = Tmpfs::mount("32M");
    let vm = Vm::start(&fs.path().join("kv"), "512M", &[]);
    // ~100 MiB of values: far more than the tmpfs holds.
    assert_eq!(
        redis(vm.port, &["DEBUG", "POPULATE", "100000", "pop", "1000"]).as_deref(),
        Some("OK")
    );
    let before = vm.counts();
    vm.sigusr1();
    let line = vm.outcome(1).expect_err("the disk is full");
    assert!(
        line.contains("copy failed: ")
            && line.contains(": write ")
            && line.contains("memory.img: no space left on device"),
        "{line}"
    );
    assert_eq!(
        std::fs::read_dir(fs.path()).unwrap().count(),
        0,
        "nothing may be left on the full disk"
    );
    assert_fixed(vm.port, "running guest on a full disk");
    assert_eq!(
        redis(vm.port, &["GET", "pop:99999"]).map(|v| v.len()),
        Some(1000)
    );
    assert_eq!(wp_pages(vm.pid()), 0);
    vm.assert_counts_back_to(before);

    fs.resize("1G");
    vm.sigusr1();
    vm.outcome(2).expect("snapshot after the disk was grown");
    assert_eq!(restore_and_check(&vm.dir(2)), 100_000 + FIXED as u64);
}

/// SIGKILL while persisting a ~1 GiB guest: what is left is a clearly
/// named temp dir, not the snapshot; restoring the target or the leftover
/// is refused with one line; a new snapvm snapshotting into the same base
/// succeeds (and removes the dead writer's leftover).
#[test]
fn sigkill_during_persist_leaves_nothing_restorable() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("kv");
    // A slow disk (20 ms per 2 MiB chunk written) keeps the persist going
    // long enough to be caught in the act.
    let vm = Vm::start(
        &base,
        "1G",
        &[("SNAPVM_INJECT", "persist_chunk_delay_ms=20")],
    );
    assert_eq!(
        redis(vm.port, &["DEBUG", "POPULATE", "600000", "pop", "1000"]).as_deref(),
        Some("OK")
    );
    vm.sigusr1();
    let start = Instant::now();
    let leftover = loop {
        let found = entries_with(tmp.path(), "kv-1.incomplete-");
        if let Some(name) = found.first() {
            let p = tmp.path().join(name);
            if p.join("memory.img").exists() {
                break p;
            }
        }
        assert!(
            start.elapsed() < T,
            "persist never started\nstderr:\n{}",
            vm.proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(vm.pid(), libc::SIGKILL) }, 0);
    let pid = vm.pid();
    drop(vm);
    assert!(
        leftover
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(&format!("kv-1.incomplete-{pid}-")),
        "{leftover:?}"
    );
    assert!(
        !tmp.path().join("kv-1").exists(),
        "half a snapshot at the final path"
    );

    let target = tmp.path().join("kv-1");
    let out = run(
        &snapvm_bin(),
        &["run", "--restore", target.to_str().unwrap()],
        T,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert_eq!(
        out.stderr.trim_end(),
        format!(
            "snapvm: error: cannot restore {}: read {}/state.bin: No such file or directory (os error 2)",
            target.display(),
            target.display()
        )
    );
    let out = run(
        &snapvm_bin(),
        &["run", "--restore", leftover.to_str().unwrap()],
        T,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert_eq!(
        out.stderr.trim_end(),
        format!(
            "snapvm: error: cannot restore {}: {}: incomplete snapshot (memory.img without state.bin: its write was interrupted); it cannot be restored",
            leftover.display(),
            leftover.display()
        )
    );

    // A new snapvm, same base: its first snapshot is kv-1 again and works.
    let vm = Vm::start(&base, "256M", &[]);
    vm.sigusr1();
    vm.outcome(1)
        .expect("snapshot into the same base after the kill");
    assert!(
        entries_with(tmp.path(), ".incomplete-").is_empty(),
        "leftover not removed"
    );
    assert!(vm.proc.stderr().contains(&format!(
        "removed {}: an incomplete snapshot left by snapvm process {pid}, which is gone",
        leftover.display()
    )));
    assert_eq!(restore_and_check(&vm.dir(1)), FIXED as u64);
}
