//! A real Debian cloud kernel (bzImage) under snapvm: snapshotted while it
//! boots, before it printed its banner, then restored — the restored VM
//! goes on booting and prints `Linux version` on COM1. This checks the
//! state capture (vCPUs in ring 0, LAPIC, irqchip, clock, serial) on a
//! real kernel. Ring 0 is emulated on these machines, so the banner takes
//! about two minutes from boot; five are allowed.

use std::time::{Duration, Instant};

use snapvm_tests::paths::{required_env_path, snapvm_bin};
use snapvm_tests::process::Proc;

const BANNER: &str = "Linux version";

#[test]
fn debian_cloud_kernel_snapshotted_while_booting_restores_and_prints_linux_version() {
    let kernel = required_env_path("SNAPVM_LINUX_KERNEL", "scripts/fetch-linux-kernel");
    let kernel = kernel.to_str().expect("utf-8 path");
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let snap = tmp.path().join("linux");
    let serial = tmp.path().join("booting.txt");
    let vm = Proc::spawn(
        &snapvm_bin(),
        &[
            "run",
            "--kernel",
            kernel,
            "--memory",
            "512M",
            "--serial",
            serial.to_str().expect("utf-8 path"),
            "--snapshot-dir",
            snap.to_str().expect("utf-8 path"),
            "--snapshot-at",
            "20",
        ],
    );
    let start = Instant::now();
    while !snap.join("metrics.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no snapshot of the booting kernel\n{}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(vm);
    let before = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        !before.contains(BANNER),
        "the kernel printed its banner before the snapshot; take it earlier"
    );
    let mut restored = Proc::spawn(
        &snapvm_bin(),
        &["run", "--restore", snap.to_str().expect("utf-8 path")],
    );
    restored.wait_for_stdout(BANNER, Duration::from_secs(300));
    // Proc's Drop kills the VM: the rest of Linux's boot is not under test.
}
