//! The same guest ELF boots under QEMU's microvm with KVM and prints the
//! same banner: the guest is a standard PVH kernel, not tied to snapvm.

use crate::guest_boot::BANNER;
use snapvm_tests::qemu;
use std::time::Duration;

#[test]
fn bundled_guest_boots_under_qemu_microvm() {
    let out = qemu::run_bundled_guest("256M", "mode=poweroff status=5", Duration::from_secs(60));
    assert_eq!(out.code(), Some(qemu::exit_code_for(5)), "{out:?}");
    let banner_line = out
        .stdout
        .lines()
        .find(|l| l.contains(BANNER))
        .unwrap_or_else(|| panic!("no banner: {out:?}"));
    assert_eq!(banner_line.trim_end(), BANNER);
    assert!(out.stdout.contains("poweroff status=5"), "{out:?}");
}
