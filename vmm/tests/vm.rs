//! Boots the embedded guest through the library API. Needs /dev/kvm: where
//! it is unusable the tests fail saying so (they never skip).

mod common;

use common::{require_kvm, Console};

use std::time::{Duration, Instant};

use snapvm_vmm::loader::{BootConfig, KernelImage};
use snapvm_vmm::{PauseError, Vm, VmConfig, VmExit};

fn vm(mode: &str, vcpus: usize) -> (Vm, Console) {
    let console = Console::default();
    let config = VmConfig {
        boot: BootConfig {
            kernel: KernelImage::embedded(),
            initrd: None,
            cmdline: Some(format!("mode={mode}")),
        },
        memory_size: 128 << 20,
        vcpus,
        serial_out: Box::new(console.clone()),
        serial_in: false,
        backing: snapvm_vmm::PageBacking::default(),
    };
    let mut vm = snapvm_vmm::builder::boot(config).expect("create VM");
    vm.start().expect("start VM");
    (vm, console)
}

fn wait_for_heartbeats(vm: &Vm, vcpus: usize) -> Vec<u64> {
    let start = Instant::now();
    loop {
        if let Ok(hb) = vm.heartbeats() {
            if hb.len() == vcpus && hb.iter().all(|h| *h > 0) {
                return hb;
            }
        }
        assert!(
            vm.exit_reason().is_none(),
            "guest stopped: {:?}",
            vm.exit_reason()
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "guest never counted"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn poweroff_reports_status_and_banner() {
    require_kvm();
    let (mut vm, console) = vm("poweroff", 1);
    assert_eq!(vm.wait(), VmExit::Poweroff(0));
    assert!(
        console.text().contains("snapvm-guest 0.1.0 booted"),
        "{}",
        console.text()
    );
    // Pausing a stopped VM fails instead of hanging.
    assert!(vm.pause().is_err());
}

#[test]
fn fault_is_a_guest_crash() {
    require_kvm();
    let (mut vm, _console) = vm("fault", 1);
    let exit = vm.wait();
    assert!(matches!(exit, VmExit::GuestCrash(_)), "{exit:?}");
    assert_eq!(exit.exit_status(), 3);
}

#[test]
fn pause_holds_every_vcpu_and_state_is_readable() {
    require_kvm();
    let (mut vm, _console) = vm("counter", 2);
    wait_for_heartbeats(&vm, 2);
    for _ in 0..50 {
        vm.pause().unwrap();
        let a = vm.heartbeats().unwrap();
        std::thread::sleep(Duration::from_millis(1));
        let b = vm.heartbeats().unwrap();
        assert_eq!(a, b, "heartbeats moved while paused");
        vm.resume().unwrap();
    }
    vm.pause().unwrap();
    let states = vm.vcpu_states().unwrap();
    assert_eq!(states.len(), 2);
    // The counter loop runs in ring 3.
    for s in &states {
        assert_eq!(s.sregs.cs.dpl, 3, "{:?}", s.sregs.cs);
        assert!(!s.msrs.is_empty());
    }
    assert_eq!(vm.pause(), Err(PauseError::AlreadyPaused));
    vm.resume().unwrap();
    assert!(
        vm.vcpu_states().is_err(),
        "state must only be readable while paused"
    );
    assert_eq!(vm.shutdown(), VmExit::Shutdown);
    assert!(vm.pause().is_err());
}

#[test]
fn idle_vcpus_count_as_held() {
    require_kvm();
    let (mut vm, _console) = vm("idle", 2);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..20 {
        vm.pause().unwrap();
        vm.resume().unwrap();
    }
    assert_eq!(vm.shutdown(), VmExit::Shutdown);
}
