//! One builder for a VM (as Firecracker's `builder.rs`), with two entry
//! points: [`boot`] assembles a VM that enters a kernel, [`restore`] one
//! that continues a saved VM. Both create the same parts the same way —
//! the KVM VM over guest RAM, vCPUs with snapvm's CPUID, COM1 with its
//! interrupt, the PV ports, the vCPU control — and differ only where they
//! must: a boot loads the kernel and sets vCPU 0's entry registers; a
//! restore writes each component's saved state (`component::Persist`) in
//! Firecracker's order — VM-wide state after the vCPUs are created and
//! before their own state, devices last.

use std::io::Write;
use std::sync::{Arc, OnceLock};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::ApStartup;
use crate::component::Persist;
use crate::devices::pv_ports::PvPorts;
use crate::devices::serial::{SerialArgs, SerialDevice, COM1_IRQ};
use crate::devices::virtio::vsock::{HostListener, VsockArgs, VsockDevice};
use crate::devices::IoBus;
use crate::kvm_device;
use crate::kvm_vm::{Irqchip, KvmVm};
use crate::loader::{self, KernelFormat, LoadedKernel};
use crate::memory::GuestRam;
use crate::vcpu;
use crate::vcpu_control::{self, VcpuControl};
use crate::vcpu_set::VcpuSet;
use crate::vm::{Vm, VmConfig, VmError, VmParts};
use crate::vmstate::{VmState, VmStateError};

/// What a restored VM gets besides its state and memory.
pub struct RestoreConfig {
    /// Where COM1 output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Feed host stdin to COM1.
    pub serial_in: bool,
    /// Where the restored vsock device takes host connections from (bound
    /// by the caller, like for [`Vm::attach_vsock`]). Only used if the
    /// saved VM had the device; without it the device is restored but no
    /// host connection can reach the guest.
    pub kv_listener: Option<HostListener>,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// The vCPU kick handler and /dev/kvm: what every VM needs first.
fn open_kvm() -> Result<Kvm, VmError> {
    vcpu_control::install_kick_handler().map_err(|e| VmError::Io {
        what: "cannot install the vCPU kick signal handler",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    Ok(kvm_device::open_kvm()?)
}

/// `count` vCPUs with snapvm's CPUID (Linux's ring-0 quirks for a
/// bzImage: see `cpuid::configure`), and what a snapshot of them reads.
fn create_vcpus(
    kvm: &Kvm,
    vm: &KvmVm,
    count: usize,
    ring0_quirks: bool,
) -> Result<(Vec<VcpuFd>, Vec<u32>), VmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("cannot read supported CPUID"))?;
    let fds = (0..count)
        .map(|index| vcpu::create_vcpu(&vm.fd, &supported, index, count, vm.irqchip, ring0_quirks))
        .collect::<Result<Vec<_>, _>>()?;
    let msr_list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("cannot list MSRs"))?
        .as_slice()
        .to_vec();
    Ok((fds, msr_list))
}

/// COM1's interrupt: an eventfd, wired to IRQ 4 when there is an irqchip.
fn serial_irq(vm: &KvmVm) -> Result<EventFd, VmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Io {
        what: "cannot create the serial interrupt eventfd",
        source,
    })?;
    if vm.irqchip {
        vm.fd
            .register_irqfd(&irq, COM1_IRQ)
            .map_err(kvm_err("cannot register the serial irqfd"))?;
    }
    Ok(irq)
}

/// Builds a VM that boots `config.boot`: KVM VM, RAM, kernel, devices and
/// vCPUs. Nothing runs yet ([`Vm::start`]).
pub fn boot(config: VmConfig) -> Result<Vm, VmError> {
    let kvm = open_kvm()?;
    let ram = GuestRam::with_backing(config.memory_size, config.backing)?;
    tracing::info!(
        "guest RAM: {} MiB in {} pages",
        ram.size() >> 20,
        ram.backing().label()
    );
    let vm = KvmVm::create(&kvm, &ram, Irqchip::IfAvailable)?;
    let loaded = loader::load(&ram, &config.boot)?;
    tracing::info!(
        "loaded {} as {:?}, entry {:?}",
        config.boot.kernel.name,
        loaded.format,
        loaded.entry
    );
    let (fds, msr_list) = create_vcpus(
        &kvm,
        &vm,
        config.vcpus,
        loaded.format == KernelFormat::BzImage,
    )?;
    vcpu::set_entry_state(&fds[0], 0, &loaded.entry)?;
    let tsc_khz = fds[0].get_tsc_khz().unwrap_or_else(|e| {
        tracing::debug!("KVM_GET_TSC_KHZ failed: {e}");
        0
    });
    let serial = SerialDevice::new(serial_irq(&vm)?, config.serial_out);
    let bus = Arc::new(IoBus {
        serial: Arc::new(serial),
        pv: PvPorts::new(config.vcpus as u32, tsc_khz),
        vsock: OnceLock::new(),
    });
    let control = Arc::new(VcpuControl::new(
        config.vcpus,
        loaded.ap_startup == ApStartup::Paravirtual,
    ));
    let lapic = vm.irqchip;
    Ok(Vm::assemble(VmParts {
        kvm,
        vm,
        ram,
        vcpus: VcpuSet::new(fds, control, lapic, msr_list),
        bus,
        loaded,
        serial_in: config.serial_in,
    }))
}

/// Builds a VM from `state` over `ram` (which must have the saved memory
/// layout). The VM is ready to [`Vm::start`]: vCPUs that had started
/// resume where they were; APs that had not wait for START_APS.
pub fn restore(config: RestoreConfig, ram: GuestRam, state: &VmState) -> Result<Vm, VmStateError> {
    state.validate()?;
    crate::vmstate::ram::check_layout(&ram, &state.memory_layout)?;
    let kvm = open_kvm()?;
    let irqchip = match &state.kvm.irqchip {
        Some(_) => Irqchip::Required {
            pit: state.kvm.pit.is_some(),
        },
        None => Irqchip::None,
    };
    let vm = KvmVm::create(&kvm, &ram, irqchip)?;
    let Ok(loaded) = LoadedKernel::restore((), &state.boot);
    let count = state.vcpus.vcpus.len();
    let (fds, msr_list) = create_vcpus(&kvm, &vm, count, state.boot.bz_image)?;

    // VM-wide state before the vCPUs' (their LAPICs route through it).
    let vm = KvmVm::restore(vm, &state.kvm)?;
    let control = Arc::new(VcpuControl::new(
        count,
        loaded.ap_startup == ApStartup::Paravirtual,
    ));
    let fresh = VcpuSet::new(fds, control.clone(), vm.irqchip, msr_list);
    let vcpus = VcpuSet::restore(fresh, &state.vcpus)?;

    let serial = SerialDevice::restore(
        SerialArgs {
            irq: serial_irq(&vm)?,
            out: config.serial_out,
        },
        &state.serial,
    )
    .map_err(|e| VmStateError::Serial(e.to_string()))?;
    let pv = PvPorts::restore((), &state.pv).map_err(VmStateError::Invalid)?;
    let bus = Arc::new(IoBus {
        serial: Arc::new(serial),
        pv,
        vsock: OnceLock::new(),
    });
    match (&state.vsock, config.kv_listener) {
        (Some(vs), listener) => {
            let wake = control.clone();
            let device = VsockDevice::restore(
                VsockArgs {
                    base: crate::devices::virtio::VSOCK_MMIO_BASE,
                    vm_fd: vm.fd.clone(),
                    mem: ram.memory().clone(),
                    listener,
                    wake: Box::new(move || wake.wake_waiters()),
                },
                vs,
            )?;
            // The bus is new: nothing else can have set the device.
            if bus.vsock.set(Arc::new(device)).is_err() {
                return Err(VmError::VsockAttached.into());
            }
        }
        (None, Some(_)) => {
            tracing::warn!("the saved VM had no vsock device; ignoring the KV listener")
        }
        (None, None) => {}
    }
    Ok(Vm::assemble(VmParts {
        kvm,
        vm,
        ram,
        vcpus,
        bus,
        loaded,
        serial_in: config.serial_in,
    }))
}
