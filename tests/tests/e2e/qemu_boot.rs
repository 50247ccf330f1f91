//! The same guest ELF boots under QEMU's microvm with KVM and prints the
//! same banner: the guest is a standard PVH kernel, not tied to snapvm.
//! (`-cpu host` is left out on purpose: QEMU 7.2 aborts with it on this
//! nested host, failing to set MSR 0x10a.)

use crate::guest_boot::BANNER;
use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{run, Proc};
use std::process::Command;
use std::time::Duration;

#[test]
fn bundled_guest_boots_under_qemu_microvm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let elf = dir.path().join("snapvm-guest.elf");
    let elf_arg = elf.to_str().expect("utf-8 path");
    let out = run(
        &snapvm_bin(),
        &["guest-elf", elf_arg],
        Duration::from_secs(10),
    );
    assert_eq!(out.code(), Some(0), "{out:?}");

    let vm = Proc::spawn_cmd(Command::new("qemu-system-x86_64").args([
        "-M",
        "microvm",
        "-accel",
        "kvm",
        "-m",
        "256M",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
        elf_arg,
        "-append",
        "mode=poweroff status=5",
    ]));
    let out = vm.wait(Duration::from_secs(60));
    // isa-debug-exit makes QEMU exit with (status << 1) | 1.
    assert_eq!(out.code(), Some((5 << 1) | 1), "{out:?}");
    let banner_line = out
        .stdout
        .lines()
        .find(|l| l.contains(BANNER))
        .unwrap_or_else(|| panic!("no banner: {out:?}"));
    assert_eq!(banner_line.trim_end(), BANNER);
    assert!(out.stdout.contains("poweroff status=5"), "{out:?}");
}
