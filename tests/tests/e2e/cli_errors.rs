//! Bad input gets one clear line on stderr and a non-zero exit, never a panic.

use snapvm_tests::paths::snapvm_bin;
use snapvm_tests::process::{run, Finished};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// One error line, prefixed, no panic or backtrace, exit status 1.
fn assert_one_error_line(out: &Finished, expected: &[&str]) {
    assert_eq!(out.code(), Some(1), "{out:?}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected exactly one stderr line: {out:?}");
    let line = lines[0];
    assert!(line.starts_with("snapvm: error: "), "{line:?}");
    for part in expected {
        assert!(line.contains(part), "{line:?} lacks {part:?}");
    }
    assert!(!out.stderr.contains("panicked"), "{out:?}");
}

#[test]
fn missing_kernel_names_the_path() {
    let out = run(
        &snapvm_bin(),
        &["run", "--kernel", "/nonexistent/vmlinuz"],
        T,
    );
    assert_one_error_line(&out, &["/nonexistent/vmlinuz", "No such file or directory"]);
}

#[test]
fn unreadable_kernel_names_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8 path");
    let out = run(&snapvm_bin(), &["run", "--kernel", path], T);
    assert_one_error_line(&out, &[path, "Is a directory"]);
}

#[test]
fn file_that_is_not_a_kernel_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, b"this is not a kernel, just some text\n".repeat(100)).expect("write");
    let path = path.to_str().expect("utf-8 path");
    let out = run(&snapvm_bin(), &["run", "--kernel", path], T);
    assert_one_error_line(&out, &[path, "neither an ELF (PVH) kernel nor a bzImage"]);
}

#[test]
fn elf_without_pvh_note_is_refused() {
    // Any ordinary host executable is an ELF without a PVH entry note.
    let out = run(&snapvm_bin(), &["run", "--kernel", "/bin/true"], T);
    assert_one_error_line(&out, &["/bin/true", "PVH"]);
}

#[test]
fn unparsable_memory_size_is_refused() {
    let out = run(&snapvm_bin(), &["run", "--memory", "lots"], T);
    assert_one_error_line(&out, &["invalid memory size 'lots'"]);
}

#[test]
fn memory_beyond_host_ram_is_refused() {
    let out = run(&snapvm_bin(), &["run", "--memory", "100T"], T);
    assert_one_error_line(&out, &["100T", "host"]);
}

#[test]
fn zero_vcpus_is_refused() {
    let out = run(&snapvm_bin(), &["run", "--vcpus", "0"], T);
    assert_one_error_line(&out, &["--vcpus"]);
}

#[test]
fn missing_kvm_device_says_how_to_fix_it() {
    let out = snapvm_tests::process::Proc::spawn_cmd(
        Command::new(snapvm_bin())
            .args(["run"])
            .env("SNAPVM_KVM_DEVICE", "/nonexistent/kvm"),
    )
    .wait(T);
    assert_one_error_line(&out, &["/nonexistent/kvm does not exist", "modprobe kvm"]);
}

/// Root can open anything, so run snapvm as `nobody` against the real,
/// root-only /dev/kvm to see the permission error a user would.
#[test]
fn inaccessible_kvm_device_says_how_to_fix_it() {
    let out = snapvm_tests::process::Proc::spawn_cmd(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(snapvm_bin())
            .arg("run"),
    )
    .wait(T);
    assert_one_error_line(&out, &["permission denied opening /dev/kvm", "kvm"]);
}
