//! VM state capture and restore with the embedded guest. Needs /dev/kvm:
//! where it is unusable the tests fail saying so (they never skip).

mod common;

use common::{require_kvm, wait_for_heartbeats_above, Console};

use std::time::{Duration, Instant};

use snapvm_vmm::builder::{self, RestoreConfig};
use snapvm_vmm::loader::{BootConfig, KernelImage};
use snapvm_vmm::vmstate::{ram_from_copies, ram_from_mapped, VmState, VmStateError};
use snapvm_vmm::{Vm, VmConfig, VmExit};

fn boot(mode: &str, vcpus: usize) -> Vm {
    let config = VmConfig {
        boot: BootConfig {
            kernel: KernelImage::embedded(),
            initrd: None,
            cmdline: Some(format!("mode={mode}")),
        },
        memory_size: 128 << 20,
        vcpus,
        serial_out: Box::new(Console::default()),
        serial_in: false,
        backing: snapvm_vmm::PageBacking::default(),
    };
    let mut vm = builder::boot(config).expect("create VM");
    vm.start().expect("start VM");
    vm
}

/// Pauses, captures state and a copy of every RAM region, shuts down.
fn capture(mut vm: Vm) -> (VmState, Vec<Vec<u8>>, Vec<u64>) {
    vm.pause().unwrap();
    let hb = vm.heartbeats().unwrap();
    let state = vm.save_state().unwrap();
    let copies = vm
        .memory()
        .regions()
        .iter()
        .map(|r| {
            // SAFETY: the region is live guest RAM of `len` bytes and every
            // vCPU is paused, so nothing writes it while we copy.
            unsafe { std::slice::from_raw_parts(r.host_addr as *const u8, r.len) }.to_vec()
        })
        .collect();
    assert_eq!(vm.shutdown(), VmExit::Shutdown);
    (state, copies, hb)
}

fn restore(state: &VmState, ram: snapvm_vmm::GuestRam) -> Vm {
    let config = RestoreConfig {
        serial_out: Box::new(Console::default()),
        serial_in: false,
        kv_listener: None,
    };
    let mut vm = builder::restore(config, ram, state).expect("restore VM");
    vm.start().expect("start restored VM");
    vm
}

fn check_continues(vm: &Vm, captured: &[u64]) {
    let first = vm.heartbeats().unwrap();
    assert_eq!(first.len(), captured.len());
    for (f, c) in first.iter().zip(captured) {
        assert!(f >= c, "heartbeat went back: {first:?} < {captured:?}");
    }
    let later = wait_for_heartbeats_above(vm, &first);
    let again = wait_for_heartbeats_above(vm, &later);
    assert!(again.iter().zip(&later).all(|(a, l)| a > l));
}

#[test]
fn blob_round_trip_and_refusals() {
    require_kvm();
    let vm = boot("counter", 2);
    wait_for_heartbeats_above(&vm, &[0, 0]);
    assert!(matches!(vm.save_state(), Err(VmStateError::NotPaused)));
    vm.pause().unwrap();
    let state = vm.save_state().unwrap();
    vm.resume().unwrap();
    assert_eq!(state.vcpus.vcpus.len(), 2);
    assert_eq!(state.vcpus.started, vec![true, true]);
    assert!(state.kvm.irqchip.is_some());
    assert_ne!(state.pv.probe_addr, 0);
    assert!(state.vcpus.vcpus.iter().all(|v| !v.msrs.is_empty()));

    let blob = state.encode().unwrap();
    let back = VmState::decode(&blob).unwrap();
    assert_eq!(back.encode().unwrap(), blob, "re-encoding differs");
    assert_eq!(back.vcpus.vcpus[1].regs.rip, state.vcpus.vcpus[1].regs.rip);
    assert_eq!(back.pv, state.pv);
    assert_eq!(back.memory_layout, state.memory_layout);

    for len in [0, 5, 12, 100, blob.len() / 2, blob.len() - 1] {
        let err = VmState::decode(&blob[..len]).unwrap_err();
        assert!(
            matches!(
                err,
                VmStateError::Truncated { .. } | VmStateError::Decode(_)
            ),
            "len {len}: {err}"
        );
    }
    let mut long = blob.clone();
    long.push(0);
    assert!(matches!(
        VmState::decode(&long),
        Err(VmStateError::Decode(_))
    ));
    let mut magic = blob.clone();
    magic[0] ^= 0xff;
    assert!(matches!(
        VmState::decode(&magic),
        Err(VmStateError::BadMagic(_))
    ));
    let mut version = blob.clone();
    version[8] = 99;
    let err = VmState::decode(&version).unwrap_err();
    assert!(
        matches!(err, VmStateError::Version { found: 99, .. }),
        "{err}"
    );
    let garbage: Vec<u8> = blob[..12]
        .iter()
        .copied()
        .chain((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8))
        .collect();
    assert!(VmState::decode(&garbage).is_err());
}

#[test]
fn counter_restores_and_keeps_counting_on_both_vcpus() {
    require_kvm();
    let vm = boot("counter", 2);
    wait_for_heartbeats_above(&vm, &[0, 0]);
    let (state, copies, hb) = capture(vm);
    // Through the blob, as a snapshot would store it.
    let state = VmState::decode(&state.encode().unwrap()).unwrap();
    let ram = ram_from_copies(&state.memory_layout, &copies).unwrap();
    let mut vm = restore(&state, ram);
    check_continues(&vm, &hb);
    // Pause/resume work on the restored VM, and it can be saved again.
    vm.pause().unwrap();
    vm.save_state().unwrap();
    vm.resume().unwrap();
    assert_eq!(vm.shutdown(), VmExit::Shutdown);
}

#[test]
fn idle_restores_and_shuts_down() {
    require_kvm();
    let vm = boot("idle", 2);
    // Idle registers no heartbeats: give it time to reach its wait loop.
    std::thread::sleep(Duration::from_millis(300));
    let (state, copies, _) = capture(vm);
    let ram = ram_from_copies(&state.memory_layout, &copies).unwrap();
    let mut vm = restore(&state, ram);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.exit_reason(), None, "restored idle guest stopped");
    for _ in 0..10 {
        vm.pause().unwrap();
        vm.resume().unwrap();
    }
    let t = Instant::now();
    assert_eq!(vm.shutdown(), VmExit::Shutdown);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn restore_refuses_a_mismatched_layout() {
    require_kvm();
    let vm = boot("counter", 1);
    wait_for_heartbeats_above(&vm, &[0]);
    let (state, copies, _) = capture(vm);
    let mut short = copies.clone();
    let len = short[0].len();
    short[0].truncate(len - 4096);
    assert!(matches!(
        ram_from_copies(&state.memory_layout, &short),
        Err(VmStateError::Layout(_))
    ));
    let other = snapvm_vmm::GuestRam::new(64 << 20).unwrap();
    let config = RestoreConfig {
        serial_out: Box::new(Console::default()),
        serial_in: false,
        kv_listener: None,
    };
    assert!(matches!(
        builder::restore(config, other, &state),
        Err(VmStateError::Layout(_))
    ));
}

#[test]
fn restore_from_a_persisted_snapshot_directory() {
    require_kvm();
    let mut vm = boot("counter", 2);
    wait_for_heartbeats_above(&vm, &[0, 0]);
    vm.pause().unwrap();
    let hb = vm.heartbeats().unwrap();
    let state = vm.save_state().unwrap();
    let regions: Vec<snapvm_snapshot::Region> = vm
        .memory()
        .regions()
        .iter()
        .map(|r| snapvm_snapshot::Region::new(r.guest_addr, r.host_addr as u64, r.len as u64))
        .collect();
    let engine = snapvm_snapshot::Engine::new(snapvm_snapshot::Config {
        workers: 1,
        strategy: snapvm_snapshot::Strategy::StopTheWorld,
        ..Default::default()
    })
    .expect("snapshot engine");
    let dir = std::env::temp_dir().join(format!("snapvm-vmstate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let writer = snapvm_snapshot::SnapshotWriter::create(
        &dir,
        &regions,
        &snapvm_snapshot::WriteOptions::default(),
    )
    .expect("snapshot directory");
    // SAFETY: the regions are the VM's anonymous private guest RAM, mapped
    // read-write for as long as `vm` lives, which is past `wait()`.
    unsafe { engine.begin(&regions, writer.image()) }.expect("begin");
    let snap = engine.wait().expect("snapshot");
    assert_eq!(vm.shutdown(), VmExit::Shutdown);
    let blob = state.encode().unwrap();
    writer.commit(&snap, &blob).expect("commit snapshot");

    let opened = snapvm_snapshot::SnapshotDir::open(&dir).expect("open snapshot");
    let state = VmState::decode(opened.vm_state()).unwrap();
    let ram = ram_from_mapped(opened.map_all().unwrap()).unwrap();
    let mut vm = restore(&state, ram);
    check_continues(&vm, &hb);
    assert_eq!(vm.shutdown(), VmExit::Shutdown);
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}
