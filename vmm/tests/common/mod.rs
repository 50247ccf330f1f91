//! Helpers shared by the KVM integration tests: a console that captures
//! the guest's serial output, the /dev/kvm precondition, and waiting for
//! the guest's probe heartbeats.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snapvm_vmm::Vm;

/// COM1 output captured in memory.
#[derive(Clone, Default)]
pub struct Console(pub Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// These tests are real KVM tests: without a usable /dev/kvm they fail.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests need a usable /dev/kvm: {e}");
    }
}

/// Waits until every vCPU's heartbeat is above `floor` (30 s at most).
pub fn wait_for_heartbeats_above(vm: &Vm, floor: &[u64]) -> Vec<u64> {
    let start = Instant::now();
    loop {
        if let Ok(hb) = vm.heartbeats() {
            if hb.len() == floor.len() && hb.iter().zip(floor).all(|(h, f)| h > f) {
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
            "heartbeats never passed {floor:?}: {:?}",
            vm.heartbeats()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
