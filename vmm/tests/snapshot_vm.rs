//! `Snapshotter::take` on real VMs with the embedded guest: async-fork while
//! the guest runs, restore, bit-exactness, one-in-flight, rollback, the
//! staging budget. Needs
//! /dev/kvm and userfaultfd (root): where unusable the tests fail saying so.

mod common;

use common::{require_kvm, wait_for_heartbeats_above, Console};

use std::path::{Path, PathBuf};
use std::time::Duration;

use snapvm_snapshot::{FaultInjection, Strategy};
use snapvm_vmm::loader::{BootConfig, KernelImage};
use snapvm_vmm::snapshotting::{
    restore_cli, snapshot_checksums, SnapshotError, SnapshotRequest, SnapshotState, Snapshotter,
    METRICS_FILE,
};
use snapvm_vmm::{PageBacking, Vm, VmConfig, VmExit};

fn boot(cmdline: &str, vcpus: usize, memory: u64) -> Vm {
    boot_with(cmdline, vcpus, memory, PageBacking::Huge)
}

fn boot_with(cmdline: &str, vcpus: usize, memory: u64, backing: PageBacking) -> Vm {
    require_kvm();
    let config = VmConfig {
        boot: BootConfig {
            kernel: KernelImage::embedded(),
            initrd: None,
            cmdline: Some(cmdline.to_string()),
        },
        memory_size: memory,
        vcpus,
        serial_out: Box::new(Console::default()),
        serial_in: false,
        backing,
    };
    let mut vm = snapvm_vmm::builder::boot(config).expect("create VM");
    vm.start().expect("start VM");
    vm
}

/// A fresh, not yet existing directory path.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = std::env::temp_dir().join(format!(
            "snapvm-snapshot-vm-{}-{tag}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        TempDir(base)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn request(dir: &Path, mode: Strategy, workers: usize) -> SnapshotRequest {
    SnapshotRequest {
        mode,
        workers,
        ..SnapshotRequest::new(dir)
    }
}

fn restore(dir: &Path) -> Vm {
    let opts = restore_cli::RestoreOptions {
        verify: true,
        serial_out: Box::new(Console::default()),
        serial_in: false,
        kv_listener: None,
        backing: snapvm_vmm::PageBacking::Huge,
        cpus: None,
    };
    let mut vm = restore_cli::restore_from_dir(dir, opts).expect("restore");
    vm.start().expect("start restored VM");
    vm
}

#[test]
fn async_fork_snapshot_of_a_running_counter_restores_and_continues() {
    let vm = boot("mode=counter", 2, 256 << 20);
    wait_for_heartbeats_above(&vm, &[0, 0]);
    let tmp = TempDir::new("a");
    let dir = tmp.path("snap");
    let before = vm.heartbeats().unwrap();
    let snap = Snapshotter::new();
    let h = snap
        .take(&vm, request(&dir, Strategy::AsyncFork, 2))
        .expect("snapshot");
    // The guest runs again as soon as take() returns, during the copy.
    let after = wait_for_heartbeats_above(&vm, &vm.heartbeats().unwrap());
    let m = h.wait().expect("snapshot done");
    assert_eq!(h.state(), SnapshotState::Done);
    assert!(!snap.in_progress());
    wait_for_heartbeats_above(&vm, &after);
    let e = m.engine.as_ref().expect("engine metrics");
    assert_eq!(e.chunks_total, 128);
    assert_eq!(
        e.chunks_by_workers + e.chunks_by_fault_path + e.chunks_by_hook,
        128,
        "{e:?}"
    );
    assert!(m.sync.total < Duration::from_millis(500), "{m:?}");
    let json = std::fs::read_to_string(dir.join(METRICS_FILE)).unwrap();
    assert!(json.starts_with("{\"strategy\":\"async-fork\""), "{json}");

    let mut restored = restore(&dir);
    let first = restored.heartbeats().unwrap();
    let now = vm.heartbeats().unwrap();
    for ((f, b), n) in first.iter().zip(&before).zip(&now) {
        assert!(
            f >= b && f <= n,
            "fork heartbeats {first:?} not within {before:?}..{now:?}"
        );
    }
    wait_for_heartbeats_above(&restored, &first);
    // A restored VM is an ordinary VM: it snapshots, and that snapshot
    // restores and runs on from its own instant.
    let again = tmp.path("again");
    let before_again = restored.heartbeats().unwrap();
    let h2 = Snapshotter::new()
        .take(&restored, request(&again, Strategy::AsyncFork, 2))
        .expect("snapshot of the restored VM");
    h2.wait().expect("second snapshot done");
    wait_for_heartbeats_above(&restored, &restored.heartbeats().unwrap());
    let mut second = restore(&again);
    let first2 = second.heartbeats().unwrap();
    for (f, b) in first2.iter().zip(&before_again) {
        assert!(
            f >= b,
            "second fork heartbeats {first2:?} before {before_again:?}"
        );
    }
    wait_for_heartbeats_above(&second, &first2);
    assert_eq!(second.shutdown(), VmExit::Shutdown);
    assert_eq!(restored.shutdown(), VmExit::Shutdown);
    drop(vm);
}

fn bit_exact(cmdline: &str, workers: usize) {
    bit_exact_on(cmdline, workers, PageBacking::Huge)
}

fn bit_exact_on(cmdline: &str, workers: usize, backing: PageBacking) {
    let vm = boot_with(cmdline, 2, 256 << 20, backing);
    wait_for_heartbeats_above(&vm, &[0, 0]);
    let tmp = TempDir::new("b");
    let snap = Snapshotter::new();
    for mode in [
        Strategy::AsyncFork,
        Strategy::SyncWp,
        Strategy::StopTheWorld,
        Strategy::Fork,
    ] {
        let dir = tmp.path(mode.name());
        let h = snap
            .take(
                &vm,
                SnapshotRequest {
                    capture_checksums: true,
                    ..request(&dir, mode, workers)
                },
            )
            .expect("snapshot");
        let hb = vm.heartbeats().unwrap();
        let m = h.wait().expect("snapshot done");
        let want = h.sync_checksums().unwrap().to_vec();
        let got = snapshot_checksums(&dir).unwrap();
        assert_eq!(want.len(), got.len());
        let bad: Vec<usize> = (0..want.len()).filter(|&i| want[i] != got[i]).collect();
        assert!(
            bad.is_empty(),
            "{cmdline} {mode} x{workers}: {} of {} chunks differ: {bad:?} ({})",
            bad.len(),
            want.len(),
            m.summary()
        );
        if cmdline.contains("scribble") && matches!(mode, Strategy::AsyncFork | Strategy::SyncWp) {
            let e = m.engine.as_ref().unwrap();
            assert!(e.faults() > 0, "no write met the snapshot: {}", m.summary());
        }
        // The guest kept writing meanwhile.
        wait_for_heartbeats_above(&vm, &hb);
    }
}

#[test]
fn counter_snapshot_is_bit_exact() {
    bit_exact("mode=counter", 2);
}

// `scribble`: every vCPU writes every page of ~190 MiB at full speed, so
// the fault path races the workers on most chunks.
#[test]
fn scribble_snapshot_is_bit_exact_with_1_worker() {
    bit_exact("mode=scribble", 1);
}

#[test]
fn scribble_snapshot_is_bit_exact_with_2_workers() {
    bit_exact("mode=scribble", 2);
}

#[test]
fn scribble_snapshot_is_bit_exact_with_4_workers() {
    bit_exact("mode=scribble", 4);
}

// `--hugepages off`: guest RAM on 4 KiB pages boots, and every mode still
// snapshots bit for bit while the guest writes.
#[test]
fn scribble_snapshot_is_bit_exact_on_4k_pages() {
    bit_exact_on("mode=scribble", 2, PageBacking::Small);
}

#[test]
fn one_snapshot_in_flight_and_cancel_rolls_back() {
    let vm = boot("mode=counter", 2, 128 << 20);
    wait_for_heartbeats_above(&vm, &[0, 0]);
    let tmp = TempDir::new("c");
    let snap = Snapshotter::new();
    // Workers held until the fault path copied more chunks than exist: the
    // snapshot stays in flight until cancelled.
    let held = FaultInjection {
        hold_workers_until_fault_copies: Some(u64::MAX),
        ..FaultInjection::default()
    };
    let h = snap
        .take(
            &vm,
            SnapshotRequest {
                injection: held,
                ..request(&tmp.path("first"), Strategy::AsyncFork, 2)
            },
        )
        .expect("first snapshot");
    let err = snap
        .take(&vm, request(&tmp.path("second"), Strategy::AsyncFork, 2))
        .unwrap_err();
    assert!(matches!(err, SnapshotError::InProgress));
    assert_eq!(err.to_string(), "snapshot in progress");
    // The guest runs while the snapshot is in flight.
    let hb = wait_for_heartbeats_above(&vm, &vm.heartbeats().unwrap());
    h.cancel().unwrap();
    let why = h.wait().unwrap_err().to_string();
    assert!(why.contains("cancelled"), "{why}");
    assert!(!tmp.path("first").exists());
    let hb = wait_for_heartbeats_above(&vm, &hb);
    let h = snap
        .take(&vm, request(&tmp.path("third"), Strategy::AsyncFork, 2))
        .expect("snapshot after cancel");
    h.wait().expect("third snapshot");
    wait_for_heartbeats_above(&vm, &hb);
}

#[test]
fn engine_failures_roll_back_and_the_vm_keeps_running() {
    let vm = boot("mode=counter", 2, 128 << 20);
    let mut hb = wait_for_heartbeats_above(&vm, &[0, 0]);
    let tmp = TempDir::new("d");
    let snap = Snapshotter::new();
    let cases = [
        (
            "worker",
            FaultInjection {
                fail_worker_copy_at: Some(0),
                ..FaultInjection::default()
            },
        ),
        (
            "fault-path",
            FaultInjection {
                fail_fault_path_at: Some(0),
                hold_workers_until_fault_copies: Some(1),
                ..FaultInjection::default()
            },
        ),
    ];
    for (name, injection) in cases {
        let dir = tmp.path(name);
        let h = snap
            .take(
                &vm,
                SnapshotRequest {
                    injection,
                    ..request(&dir, Strategy::AsyncFork, 2)
                },
            )
            .expect("snapshot begins");
        let err = h.wait().unwrap_err().to_string();
        assert!(err.contains("injected"), "{name}: {err}");
        assert!(matches!(h.state(), SnapshotState::Failed(_)));
        assert!(!dir.exists(), "{name}: a failed snapshot left {dir:?}");
        hb = wait_for_heartbeats_above(&vm, &hb);
        hb = wait_for_heartbeats_above(&vm, &hb);
    }
    // Sync-phase failure: refused at once, the VM resumed.
    let err = snap
        .take(
            &vm,
            SnapshotRequest {
                injection: FaultInjection {
                    fail_sync: true,
                    ..FaultInjection::default()
                },
                ..request(&tmp.path("sync"), Strategy::AsyncFork, 2)
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert!(!vm.is_paused());
    hb = wait_for_heartbeats_above(&vm, &hb);
    // And the next snapshot succeeds.
    let h = snap
        .take(&vm, request(&tmp.path("ok"), Strategy::AsyncFork, 2))
        .expect("snapshot after failures");
    h.wait().expect("snapshot after failures");
    wait_for_heartbeats_above(&vm, &hb);
}

#[test]
fn refusals() {
    let vm = boot("mode=idle", 1, 64 << 20);
    let tmp = TempDir::new("r");
    let snap = Snapshotter::new();
    // An existing target is refused up front, before any pause; the VM runs
    // on and nothing is in flight.
    std::fs::create_dir_all(tmp.path("exists")).unwrap();
    let err = snap
        .take(&vm, request(&tmp.path("exists"), Strategy::AsyncFork, 1))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot create the snapshot directory: {} already exists (pass overwrite to replace it)",
            tmp.path("exists").display()
        )
    );
    assert!(!snap.in_progress());
    assert_eq!(vm.exit_reason(), None);
    // ... unless overwrite is asked for.
    let h = snap
        .take(
            &vm,
            SnapshotRequest {
                overwrite: true,
                ..request(&tmp.path("exists"), Strategy::AsyncFork, 1)
            },
        )
        .unwrap();
    h.wait().expect("overwrite");
    // A parent that does not exist.
    let err = snap
        .take(
            &vm,
            request(&tmp.path("no/such/dir"), Strategy::AsyncFork, 1),
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot create the snapshot directory: create directory "),
        "{err}"
    );
    assert!(matches!(
        snap.take(&vm, request(&tmp.path("w0"), Strategy::AsyncFork, 0)),
        Err(SnapshotError::Invalid(_))
    ));
}

/// Successive snapshots of a guest writing every page share one staging
/// pool, allocated at the first and kept, and each is bit-exact.
#[test]
fn the_staging_pool_is_kept_and_snapshots_stay_bit_exact() {
    let vm = boot("mode=scribble", 2, 256 << 20);
    wait_for_heartbeats_above(&vm, &[0, 0]);
    let tmp = TempDir::new("k");
    let snap = Snapshotter::new();
    assert_eq!(snap.staging_bytes(), 0, "allocated at the first snapshot");
    for i in 0..3 {
        let dir = tmp.path(&format!("s{i}"));
        let h = snap
            .take(
                &vm,
                SnapshotRequest {
                    capture_checksums: true,
                    memory_budget: 64 << 20,
                    ..request(&dir, Strategy::AsyncFork, 2)
                },
            )
            .expect("snapshot");
        let m = h.wait().expect("snapshot done");
        // The pool fills on its own thread, from the first snapshot on.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while snap.staging_bytes() < 64 << 20 {
            assert!(std::time::Instant::now() < deadline, "pool never filled");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(snap.staging_bytes(), 64 << 20, "kept after {i}");
        let e = m.engine.as_ref().unwrap();
        assert!(e.staging_bytes <= 64 << 20, "{}", m.summary());
        if i > 0 {
            assert_eq!(e.staging_bytes, 64 << 20, "{}", m.summary());
        }
        assert!(e.staging_peak_bytes <= 64 << 20, "{}", m.summary());
        if i > 0 {
            assert!(m.sync.engine.staging_alloc.is_zero(), "{}", m.summary());
        }
        let want = h.sync_checksums().unwrap().to_vec();
        let got = snapshot_checksums(&dir).unwrap();
        let bad = (0..want.len()).filter(|&c| want[c] != got[c]).count();
        assert_eq!(
            bad,
            0,
            "snapshot {i}: {bad} chunks differ ({})",
            m.summary()
        );
    }
}

/// A tiny budget (two chunks) under a guest writing every page at full
/// speed: most write faults find the pool full and write their chunk
/// themselves; the snapshot is still bit-exact.
#[test]
fn a_tiny_budget_under_full_speed_writes_stays_bit_exact() {
    let vm = boot("mode=scribble", 2, 256 << 20);
    wait_for_heartbeats_above(&vm, &[0, 0]);
    let tmp = TempDir::new("t");
    let snap = Snapshotter::new();
    let dir = tmp.path("tiny");
    let h = snap
        .take(
            &vm,
            SnapshotRequest {
                capture_checksums: true,
                memory_budget: 4 << 20,
                ..request(&dir, Strategy::AsyncFork, 2)
            },
        )
        .expect("snapshot");
    let m = h.wait().expect("snapshot done");
    let e = m.engine.as_ref().unwrap();
    assert!(e.staging_peak_bytes <= 4 << 20, "{}", m.summary());
    assert_eq!(
        e.chunks_staged + e.direct_fault_writes,
        e.chunks_by_fault_path + e.chunks_by_hook,
        "{}",
        m.summary()
    );
    assert_eq!(
        h.sync_checksums().unwrap().to_vec(),
        snapshot_checksums(&dir).unwrap()
    );
}

#[test]
fn fork_snapshot_restores_and_can_be_cancelled() {
    let vm = boot("mode=counter", 2, 128 << 20);
    wait_for_heartbeats_above(&vm, &[0, 0]);
    let tmp = TempDir::new("f");
    let snap = Snapshotter::new();
    let dir = tmp.path("fork");
    let before = vm.heartbeats().unwrap();
    let h = snap
        .take(&vm, request(&dir, Strategy::Fork, 1))
        .expect("fork");
    let m = h.wait().expect("fork snapshot");
    assert!(m.persist.is_some(), "{m:?}");
    let mut restored = restore(&dir);
    let first = restored.heartbeats().unwrap();
    assert!(first.iter().zip(&before).all(|(f, b)| f >= b));
    wait_for_heartbeats_above(&restored, &first);
    assert_eq!(restored.shutdown(), VmExit::Shutdown);
    // Killing the writer fails the snapshot and leaves no directory.
    let dir = tmp.path("killed");
    let h = snap
        .take(&vm, request(&dir, Strategy::Fork, 1))
        .expect("fork");
    h.cancel().unwrap();
    if h.wait().is_err() {
        assert!(!dir.exists());
        let left: Vec<_> = std::fs::read_dir(&tmp.0)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(
            !left
                .iter()
                .any(|n| n.to_string_lossy().contains(".incomplete-")),
            "{left:?}"
        );
    }
    let h = snap
        .take(&vm, request(&tmp.path("after"), Strategy::Fork, 1))
        .expect("fork after cancel");
    h.wait().expect("fork after cancel");
    wait_for_heartbeats_above(&vm, &vm.heartbeats().unwrap());
}
