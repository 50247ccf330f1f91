//! A real Debian cloud kernel (bzImage) boots under snapvm far enough to
//! print its banner on COM1. Ring 0 is emulated on these machines, so this
//! takes about two minutes; five are allowed.

use snapvm_tests::paths::{required_env_path, snapvm_bin};
use snapvm_tests::process::Proc;
use std::time::Duration;

#[test]
fn debian_cloud_kernel_prints_linux_version() {
    let kernel = required_env_path("SNAPVM_LINUX_KERNEL", "scripts/fetch-linux-kernel");
    let kernel = kernel.to_str().expect("utf-8 path");
    let mut vm = Proc::spawn(
        &snapvm_bin(),
        &["run", "--kernel", kernel, "--memory", "512M"],
    );
    vm.wait_for_stdout("Linux version", Duration::from_secs(300));
    // Proc's Drop kills the VM: the rest of Linux's boot is not under test.
}
