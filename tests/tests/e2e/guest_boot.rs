//! The bundled guest kernel under snapvm: banner, poweroff status,
//! exceptions, panics and idling.

use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{run, Proc};
use std::time::Duration;

pub const BANNER: &str = "snapvm-guest 0.1.0 booted";
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn poweroff_exits_zero_after_the_banner() {
    let out = run(
        &snapvm_bin(),
        &["run", "--cmdline", "mode=poweroff"],
        BOOT_TIMEOUT,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains(BANNER), "{out:?}");
    assert!(out.stdout.contains("poweroff status=0"), "{out:?}");
    let banner_line = out
        .stdout
        .lines()
        .find(|l| l.contains(BANNER))
        .expect("banner line");
    assert_eq!(banner_line.trim_end(), BANNER);
}

#[test]
fn poweroff_status_becomes_the_exit_status() {
    let out = run(
        &snapvm_bin(),
        &[
            "run",
            "--cmdline",
            "mode=poweroff status=42",
            "--vcpus",
            "2",
        ],
        BOOT_TIMEOUT,
    );
    assert_eq!(out.code(), Some(42), "{out:?}");
    assert!(out.stdout.contains("poweroff status=42"), "{out:?}");
}

#[test]
fn info_line_reports_the_configuration() {
    let out = run(
        &snapvm_bin(),
        &[
            "run",
            "--cmdline",
            "mode=poweroff",
            "--memory",
            "256M",
            "--vcpus",
            "2",
        ],
        BOOT_TIMEOUT,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("hypervisor=snapvm"), "{out:?}");
    assert!(out.stdout.contains("cpus=2"), "{out:?}");
    assert!(out.stdout.contains("mem_mib="), "{out:?}");
}

#[test]
fn serial_output_can_go_to_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("serial.log");
    let log_arg = log.to_str().expect("utf-8 path");
    let out = run(
        &snapvm_bin(),
        &["run", "--cmdline", "mode=poweroff", "--serial", log_arg],
        BOOT_TIMEOUT,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    let serial = std::fs::read_to_string(&log).expect("serial log written");
    assert!(serial.contains(BANNER), "serial file: {serial:?}");
    assert!(
        !out.stdout.contains(BANNER),
        "banner went to stdout too: {out:?}"
    );
}

fn assert_dump(out: &snapvm_tests::process::Finished, vector_line: &str) {
    assert_eq!(
        out.code(),
        Some(3),
        "a guest exception must exit with status 3: {out:?}"
    );
    assert!(
        out.stderr.contains(vector_line),
        "missing {vector_line:?} in dump: {out:?}"
    );
    for reg in [
        "RIP", "RSP", "RFLAGS", "RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "R8", "R15",
        "CR2", "CR3",
    ] {
        assert!(out.stderr.contains(reg), "dump lacks {reg}: {out:?}");
    }
}

#[test]
fn page_fault_prints_a_register_dump_and_fails() {
    let out = run(
        &snapvm_bin(),
        &["run", "--cmdline", "mode=fault fault=pf"],
        BOOT_TIMEOUT,
    );
    assert_dump(&out, "vector 14 (#PF page fault)");
    assert!(out.stdout.contains(BANNER), "{out:?}");
}

#[test]
fn invalid_opcode_prints_a_register_dump_and_fails() {
    let out = run(
        &snapvm_bin(),
        &["run", "--cmdline", "mode=fault fault=ud"],
        BOOT_TIMEOUT,
    );
    assert_dump(&out, "vector 6 (#UD");
}

#[test]
fn divide_error_prints_a_register_dump_and_fails() {
    let out = run(
        &snapvm_bin(),
        &["run", "--cmdline", "mode=fault fault=de"],
        BOOT_TIMEOUT,
    );
    assert_dump(&out, "vector 0 (#DE");
}

#[test]
fn guest_panic_is_reported_with_its_message() {
    let out = run(
        &snapvm_bin(),
        &["run", "--cmdline", "mode=panic"],
        BOOT_TIMEOUT,
    );
    assert_eq!(out.code(), Some(4), "{out:?}");
    assert!(out.stdout.contains("requested by mode=panic"), "{out:?}");
}

#[test]
fn unknown_mode_powers_off_with_status_2() {
    let out = run(
        &snapvm_bin(),
        &["run", "--cmdline", "mode=frobnicate"],
        BOOT_TIMEOUT,
    );
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stdout.contains("unknown mode 'frobnicate'"), "{out:?}");
}

/// An idle guest waits through the paravirtual wait exit: over two seconds
/// the whole snapvm process must use far less than one core.
#[test]
fn idle_guest_does_not_burn_a_core() {
    let mut vm = Proc::spawn(&snapvm_bin(), &["run", "--cmdline", "mode=idle"]);
    vm.wait_for_stdout(BANNER, BOOT_TIMEOUT);
    let before = vm.cpu_time();
    std::thread::sleep(Duration::from_secs(2));
    let used = vm.cpu_time() - before;
    assert!(
        used < Duration::from_millis(600),
        "idle guest used {used:?} of CPU in 2 s"
    );
}

/// `snapvm run` with no arguments boots the bundled guest and keeps running.
#[test]
fn default_run_boots_the_bundled_guest() {
    let mut vm = Proc::spawn(&snapvm_bin(), &["run"]);
    vm.wait_for_stdout(BANNER, BOOT_TIMEOUT);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        vm.stderr().is_empty() || !vm.stderr().contains("error"),
        "stderr: {}",
        vm.stderr()
    );
}
