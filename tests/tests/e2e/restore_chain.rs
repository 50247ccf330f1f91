//! A restored VM is an ordinary VM (issue #19): it serves at once while its
//! memory loads from the snapshot, snapshots again (during the load and
//! after), needs its snapshot directory only until the load is done, and a
//! corrupt chunk stops it with a message naming the snapshot, the chunk and
//! the checksums.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{free_port, Proc};
use snapvm_tests::redis_cli::{first_reply, redis};
use snapvm_tests::snapvm::restore_kv;

const T: Duration = Duration::from_secs(120);
const LISTENING: &str = "kv: listening on vsock port 6379";
/// Enough data that loading it takes a while (hundreds of chunks).
const MEMORY: &str = "1G";
const KEYS: &str = "400000";
const VALUE: &str = "1000";

/// A KV VM with `--snapshot-dir base` (SIGUSR1 snapshots into base-N).
struct Kv {
    vm: Proc,
    port: u16,
    base: PathBuf,
    taken: usize,
}

impl Kv {
    fn boot(base: PathBuf) -> Kv {
        let port = free_port();
        let mut vm = Proc::spawn(
            &snapvm_bin(),
            &[
                "run",
                "--memory",
                MEMORY,
                "--kv-listen",
                &format!("127.0.0.1:{port}"),
                "--snapshot-dir",
                base.to_str().expect("utf-8"),
                "--log-level",
                "info",
            ],
        );
        vm.wait_for_stdout(LISTENING, T);
        Kv {
            vm,
            port,
            base,
            taken: 0,
        }
    }

    /// `snapvm run --restore dir` with the same snapshot flags.
    fn restore(dir: &Path, base: PathBuf, serial: &Path) -> Kv {
        let (vm, port) = restore_kv(
            dir,
            serial,
            &[
                "--snapshot-dir",
                base.to_str().expect("utf-8"),
                "--log-level",
                "info",
            ],
        );
        let pong = first_reply(&vm, port, &["PING"], T);
        assert_eq!(pong, "PONG");
        Kv {
            vm,
            port,
            base,
            taken: 0,
        }
    }

    fn set(&self, k: &str, v: &str) {
        assert_eq!(redis(self.port, &["SET", k, v]).as_deref(), Some("OK"));
    }

    fn get(&self, k: &str) -> Option<String> {
        redis(self.port, &["GET", k])
    }

    fn exists(&self, k: &str) -> bool {
        redis(self.port, &["EXISTS", k]).as_deref() == Some("1")
    }

    /// A snapshot by SIGUSR1; returns its directory once it is done and
    /// its metrics.
    fn snapshot(&mut self) -> (PathBuf, Value) {
        self.taken += 1;
        let dir = PathBuf::from(format!("{}-{}", self.base.display(), self.taken));
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(
            unsafe { libc::kill(self.vm.pid() as i32, libc::SIGUSR1) },
            0
        );
        let start = Instant::now();
        loop {
            if let Ok(json) = std::fs::read_to_string(dir.join("metrics.json")) {
                let m: Value = serde_json::from_str(&json).expect("metrics.json");
                return (dir, m);
            }
            assert!(
                start.elapsed() < T,
                "no snapshot in {dir:?}\nstderr:\n{}",
                self.vm.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the restore's log says its memory is all in.
    fn wait_loaded(&mut self) {
        self.vm.wait_for_stderr("memory loaded", T);
    }
}

#[test]
fn chains_of_restores_and_snapshots_keep_every_key_bit_exact() {
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let mut kv = Kv::boot(tmp.path().join("r0"));
    assert_eq!(
        redis(kv.port, &["DEBUG", "POPULATE", KEYS, "bulk", VALUE]).as_deref(),
        Some("OK")
    );
    kv.set("phase-0", "written before snapshot 0");
    let (mut parent, _) = kv.snapshot();
    drop(kv);
    let mut phases = vec!["phase-0".to_string()];
    let mut during_load = 0;
    for round in 1..=3 {
        let serial = tmp.path().join(format!("serial-{round}.txt"));
        let mut kv = Kv::restore(&parent, tmp.path().join(format!("r{round}")), &serial);
        // At once, while the memory still loads: everything so far.
        for p in &phases {
            assert!(kv.exists(p), "round {round}: {p} missing");
        }
        let key = format!("phase-{round}");
        kv.set(&key, &format!("written in round {round}"));
        phases.push(key);
        // A snapshot while the load runs...
        let (during, m) = kv.snapshot();
        let from_parent = m["engine"]["chunks_from_parent"].as_u64().unwrap_or(0);
        // ...and one after it.
        kv.wait_loaded();
        kv.set(&format!("after-{round}"), "not in the first");
        let (after, m2) = kv.snapshot();
        assert_eq!(m2["engine"]["chunks_from_parent"].as_u64(), Some(0), "{m2}");
        // The parent may go now: nothing needs it.
        std::fs::remove_dir_all(&parent).expect("delete the parent");
        assert_eq!(kv.get("bulk:1").map(|v| v.len()), Some(1000));
        drop(kv);
        // Both children restore with every phase, bit-exact values.
        for (dir, has_after) in [(&during, false), (&after, true)] {
            let s = tmp.path().join(format!("check-{round}-{has_after}.txt"));
            let check = Kv::restore(dir, tmp.path().join("unused"), &s);
            for (i, p) in phases.iter().enumerate() {
                let want = if i == 0 {
                    "written before snapshot 0".to_string()
                } else {
                    format!("written in round {i}")
                };
                assert_eq!(
                    check.get(p).as_deref(),
                    Some(want.as_str()),
                    "round {round} {dir:?}"
                );
            }
            assert_eq!(
                check.exists(&format!("after-{round}")),
                has_after,
                "round {round} {dir:?}"
            );
            check_bulk(&check);
        }
        eprintln!("round {round}: {from_parent} chunks of the first snapshot came from its parent");
        during_load += from_parent;
        std::fs::remove_dir_all(&during).expect("delete");
        parent = after;
    }
    assert!(
        during_load > 0,
        "no snapshot was taken while its VM's memory was still loading"
    );
}

/// The populated keys, sampled: exact values, and all of them there.
fn check_bulk(kv: &Kv) {
    assert_eq!(
        redis(kv.port, &["DBSIZE"])
            .and_then(|n| n.parse::<u64>().ok())
            .map(|n| n >= 400_000),
        Some(true)
    );
    for i in (0..400_000).step_by(9973) {
        let mut want = format!("value:{i}").into_bytes();
        want.resize(1000, 0);
        assert_eq!(
            kv.get(&format!("bulk:{i}")).map(String::into_bytes),
            Some(want),
            "bulk:{i}"
        );
    }
}

#[test]
fn a_corrupt_chunk_stops_the_restored_vm_naming_snapshot_chunk_and_checksums() {
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let mut kv = Kv::boot(tmp.path().join("c"));
    assert_eq!(
        redis(kv.port, &["DEBUG", "POPULATE", "100000", "k", "100"]).as_deref(),
        Some("OK")
    );
    let (dir, _) = kv.snapshot();
    drop(kv);
    // Flip a byte in the last data chunk of the image.
    let img = dir.join("memory.img");
    let bytes = std::fs::read(&img).expect("read image");
    let chunk = 2 << 20;
    let last = (0..bytes.len() / chunk)
        .rev()
        .find(|c| bytes[c * chunk..(c + 1) * chunk].iter().any(|&b| b != 0))
        .expect("a data chunk");
    let mut bad = bytes;
    bad[last * chunk + 4096] ^= 0x5a;
    std::fs::write(&img, &bad).expect("write image");
    let out = restore_kv(&dir, &tmp.path().join("serial.txt"), &[])
        .0
        .wait(T);
    assert_eq!(out.code(), Some(1), "{out:?}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("snapvm: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", out.stderr);
    let want = format!(
        "snapvm: error: snapshot {}: memory chunk {last} (guest {:#x}) is corrupt: checksum 0x",
        dir.display(),
        last * chunk
    );
    assert!(lines[0].starts_with(&want), "{}\nwanted {want}", lines[0]);
    assert!(lines[0].contains(", expected 0x"), "{}", lines[0]);
    assert!(lines[0].ends_with("; the VM was stopped"), "{}", lines[0]);
}

#[test]
fn deleting_or_replacing_the_snapshot_directory_mid_load_changes_nothing() {
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let mut kv = Kv::boot(tmp.path().join("d"));
    assert_eq!(
        redis(kv.port, &["DEBUG", "POPULATE", KEYS, "bulk", VALUE]).as_deref(),
        Some("OK")
    );
    let (dir, _) = kv.snapshot();
    drop(kv);
    let copy = tmp.path().join("copy");
    let status = std::process::Command::new("cp")
        .args(["-a", dir.to_str().unwrap(), copy.to_str().unwrap()])
        .status()
        .expect("cp");
    assert!(status.success());
    for replace in [false, true] {
        let source = if replace { &copy } else { &dir };
        let serial = tmp.path().join(format!("serial-{replace}.txt"));
        let kv = Kv::restore(source, tmp.path().join("unused"), &serial);
        std::fs::remove_dir_all(source).expect("delete mid-load");
        if replace {
            // Another directory of the same name, with garbage in it.
            std::fs::create_dir(source).unwrap();
            std::fs::write(source.join("memory.img"), vec![0xa5u8; 64 << 20]).unwrap();
            std::fs::write(source.join("state.bin"), b"not a snapshot").unwrap();
        }
        check_bulk(&kv);
        let info = kv.vm.stderr();
        assert!(!info.contains("ERROR"), "{info}");
    }
}
