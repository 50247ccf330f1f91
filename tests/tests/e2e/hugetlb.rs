//! `--hugepages hugetlbfs` (issue #21): guest RAM from the reserved 2 MiB
//! page pool, for hosts that run with THP off. A pool too small is refused
//! at start with the sysctl to set; a KV guest on it snapshots (async-fork)
//! and restores onto hugetlbfs again with its data.
//!
//! The test reserves pages through /proc/sys/vm/nr_hugepages (root, as the
//! suite runs) and puts the old value back when it ends.

use std::path::Path;
use std::time::{Duration, Instant};

use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{free_port, run, Proc};
use snapvm_tests::redis_cli::{first_reply, redis};
use snapvm_tests::snapvm::restore_kv;

const T: Duration = Duration::from_secs(60);
const NR: &str = "/proc/sys/vm/nr_hugepages";

/// Restores the pool size on drop.
struct Pool(String);

impl Pool {
    fn set(pages: u64) -> Pool {
        let old = std::fs::read_to_string(NR).expect("read nr_hugepages");
        std::fs::write(NR, pages.to_string()).expect("write nr_hugepages (root)");
        Pool(old.trim().to_string())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = std::fs::write(NR, &self.0);
    }
}

/// Huge pages neither in use nor reserved.
fn free_pages() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    field("HugePages_Free:") - field("HugePages_Rsvd:")
}

fn wait_for(path: &Path, vm: &Proc) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < T, "no {path:?}\n{}", vm.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn hugetlbfs_guest_ram_is_refused_without_pages_and_snapshots_and_restores_with_them() {
    {
        let _none = Pool::set(0);
        let out = run(
            &snapvm_bin(),
            &["run", "--memory", "256M", "--hugepages", "hugetlbfs"],
            T,
        );
        assert_eq!(out.code(), Some(1), "{out:?}");
        assert_eq!(
            out.stderr.trim_end(),
            "snapvm: error: --hugepages hugetlbfs needs 128 free 2 MiB huge pages for 268435456 bytes of guest RAM, and 0 are free: reserve them first (as root: sysctl vm.nr_hugepages=128)"
        );
    }

    // Two 256 MiB guests (the booted one and its restore) at once.
    let _pool = Pool::set(256);
    assert!(free_pages() >= 256, "could not reserve 256 huge pages");
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let base = tmp.path().join("ht");
    let port = free_port();
    let mut vm = Proc::spawn(
        &snapvm_bin(),
        &[
            "run",
            "--memory",
            "256M",
            "--hugepages",
            "hugetlbfs",
            "--kv-listen",
            &format!("127.0.0.1:{port}"),
            "--snapshot-dir",
            base.to_str().unwrap(),
            "--log-level",
            "info",
        ],
    );
    vm.wait_for_stdout("kv: listening on vsock port 6379", T);
    assert!(
        vm.stderr()
            .contains("guest RAM: 256 MiB in hugetlbfs pages"),
        "{}",
        vm.stderr()
    );
    assert_eq!(free_pages(), 128, "guest RAM reserved its pages at start");
    assert_eq!(
        redis(port, &["SET", "k", "on hugetlbfs"]).as_deref(),
        Some("OK")
    );
    assert_eq!(
        redis(port, &["DEBUG", "POPULATE", "20000", "p", "100"]).as_deref(),
        Some("OK")
    );
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGUSR1) }, 0);
    let dir = base.with_file_name("ht-1");
    wait_for(&dir.join("metrics.json"), &vm);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["page_backing"], "hugetlbfs", "{metrics}");
    assert_eq!(redis(port, &["SET", "k", "after"]).as_deref(), Some("OK"));

    let (restored, port2) = restore_kv(
        &dir,
        &tmp.path().join("serial.txt"),
        &["--hugepages", "hugetlbfs"],
    );
    assert_eq!(
        first_reply(&restored, port2, &["GET", "k"], T),
        "on hugetlbfs"
    );
    assert_eq!(redis(port2, &["DBSIZE"]).as_deref(), Some("20001"));
    assert_eq!(
        redis(port2, &["GET", "p:19999"]).map(|v| v.len()),
        Some(100)
    );
    assert_eq!(free_pages(), 0, "the restored VM's RAM is hugetlbfs too");
    // The original kept its own data.
    assert_eq!(redis(port, &["GET", "k"]).as_deref(), Some("after"));
}
