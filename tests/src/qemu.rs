//! The bundled guest ELF under QEMU's microvm, so both hypervisors can be
//! compared on the same kernel.

use std::process::Command;
use std::time::Duration;

use crate::paths::snapvm_bin;
use crate::process::{run, Finished, Proc};

/// Writes the bundled guest with `snapvm guest-elf`, boots it under
/// `qemu-system-x86_64 -M microvm -accel kvm` with `cmdline`, and waits for
/// QEMU to exit. The guest's poweroff status reaches QEMU's exit code through
/// `isa-debug-exit` as `(status << 1) | 1`. `-cpu host` is left out on
/// purpose: QEMU 7.2 aborts with it on this nested host (MSR 0x10a).
pub fn run_bundled_guest(memory: &str, cmdline: &str, timeout: Duration) -> Finished {
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
        memory,
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
        cmdline,
    ]));
    vm.wait(timeout)
}

/// QEMU's exit code for a guest that powered off with `status`.
pub fn exit_code_for(status: i32) -> i32 {
    (status << 1) | 1
}
