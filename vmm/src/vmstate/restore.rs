//! Capture ([`Vm::save_state`]) and restore ([`Vm::restore`]).
//!
//! Restore builds a new KVM VM whose memslots point at the host memory it
//! is given: a private copy ([`ram_from_copies`]) or a snapshot's lazily
//! mapped memory image ([`ram_from_mapped`]). Order, as Firecracker's
//! snapshot restore: VM, memslots, irqchip + PIT, vCPUs (created with
//! snapvm's CPUID/boot set-up), then VM-wide state (PIT, kvmclock, PIC
//! master/slave, IOAPIC), then each vCPU's state (see [`super::vcpu`]),
//! then devices (COM1, PV ports) and the vCPU start bookkeeping.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use snapshot::persist::MappedRegion;
use vm_memory::{Bytes, GuestAddress};
use vm_superio::serial::SerialState;
use vmm_sys_util::eventfd::EventFd;

use super::devices::{PvPortsState, SerialSnapshot};
use super::vcpu::{self as vstate, complete_pending_exit};
use super::VMSTATE_VERSION;
use super::{BootEntry, BootState, IrqchipState, MemoryRegionState, VmState, VmStateError};
use crate::boot::{ApStartup, EntryState};
use crate::devices::serial::{SerialDevice, COM1_IRQ};
use crate::devices::virtio::vsock::{HostListener, VsockDevice};
use crate::devices::IoBus;
use crate::kvm_device;
use crate::loader::{KernelFormat, LoadedKernel};
use crate::memory::GuestRam;
use crate::vcpu::{self, lock_vcpu, SharedVcpuFd};
use crate::vcpu_control::{self, VcpuControl, VcpuStatus};
use crate::vm::{Vm, VmError};

/// Same as vm.rs: identity-map/TSS pages KVM needs on Intel, in the MMIO hole.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

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

/// The live parts of a restored VM, handed to [`Vm::from_parts`].
pub(crate) struct VmParts {
    pub kvm: Kvm,
    pub vm_fd: Arc<VmFd>,
    pub ram: GuestRam,
    pub vcpu_fds: Vec<SharedVcpuFd>,
    pub control: Arc<VcpuControl>,
    pub bus: Arc<IoBus>,
    pub loaded: LoadedKernel,
    pub irqchip: bool,
    pub serial_in: bool,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Kvm { what, source }
}

/// Guest RAM holding copies of a saved VM's regions (one `Vec` per region
/// of `layout`, e.g. read out of `Vm::memory()` while paused). The memory
/// is fresh anonymous memory, THP-advised like a booted VM's.
pub fn ram_from_copies(
    layout: &[MemoryRegionState],
    copies: &[Vec<u8>],
) -> Result<GuestRam, VmStateError> {
    if layout.len() != copies.len() {
        return Err(VmStateError::Layout(format!(
            "{} regions in the layout, {} copies",
            layout.len(),
            copies.len()
        )));
    }
    let total: u64 = layout.iter().map(|r| r.len).sum();
    let ram = GuestRam::new(total)?;
    check_layout(&ram, layout)?;
    for (r, copy) in layout.iter().zip(copies) {
        if copy.len() as u64 != r.len {
            return Err(VmStateError::Layout(format!(
                "region at {:#x}: {} bytes saved, {} copied",
                r.guest_addr,
                r.len,
                copy.len()
            )));
        }
        ram.memory()
            .write_slice(copy, GuestAddress(r.guest_addr))
            .map_err(|e| VmStateError::Layout(format!("region at {:#x}: {e}", r.guest_addr)))?;
    }
    Ok(ram)
}

/// Guest RAM directly over a snapshot's mapped memory image (lazy,
/// copy-on-write `MAP_PRIVATE`): pages load on first touch. The mappings
/// live as long as the returned GuestRam. (Such memory is file-backed, so
/// the async-fork engine, which needs anonymous memory, cannot snapshot
/// the restored VM.)
pub fn ram_from_mapped(regions: Vec<MappedRegion>) -> Result<GuestRam, VmStateError> {
    let list: Vec<(u64, *mut u8, usize)> = regions
        .iter()
        .map(|r| (r.guest_addr, r.as_ptr(), r.len()))
        .collect();
    // SAFETY: each MappedRegion is a live read-write MAP_PRIVATE mapping of
    // `len` bytes from mmap (so page aligned), regions are distinct
    // mappings, and they stay mapped until `owner` (which holds them all)
    // is dropped with the last clone of the GuestRam.
    let ram = unsafe { GuestRam::from_host_regions(&list, Arc::new(regions)) }?;
    Ok(ram)
}

fn check_layout(ram: &GuestRam, layout: &[MemoryRegionState]) -> Result<(), VmStateError> {
    let have: Vec<MemoryRegionState> = ram
        .regions()
        .iter()
        .map(|r| MemoryRegionState {
            guest_addr: r.guest_addr,
            len: r.len as u64,
        })
        .collect();
    if have != layout {
        return Err(VmStateError::Layout(format!(
            "saved {layout:x?}, given {have:x?}"
        )));
    }
    Ok(())
}

fn get_irqchip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm(what))?;
    Ok(chip)
}

impl Vm {
    /// Captures vCPU, in-kernel irqchip/PIT/clock and device state. The VM
    /// must be paused ([`Vm::pause`]), and with a vsock device attached its
    /// thread too ([`Vm::pause_devices`]); pending I/O exits are completed first
    /// (one KVM_RUN with immediate_exit per started vCPU), so saved RIPs are
    /// past the instruction. Guest memory is not part of it.
    pub fn save_state(&self) -> Result<VmState, VmStateError> {
        if !self.is_paused() {
            return Err(VmStateError::NotPaused);
        }
        let (bus, control, irqchip) = self.state_parts();
        // First: it is the check most likely to fail (devices not paused).
        let vsock = match bus.vsock.get() {
            Some(d) => Some(d.save_state()?),
            None => None,
        };
        let statuses = control.statuses();
        let msr_list = self
            .kvm_sys()
            .get_msr_index_list()
            .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
        let mut vcpus = Vec::with_capacity(self.vcpu_count());
        let mut started = Vec::with_capacity(self.vcpu_count());
        for (index, fd) in self.vcpu_fds().iter().enumerate() {
            let mut fd = lock_vcpu(fd);
            let has_run = statuses.get(index) != Some(&VcpuStatus::NotStarted);
            if has_run {
                complete_pending_exit(index, &mut fd)?;
            }
            started.push(has_run);
            vcpus.push(vstate::capture(index, &fd, msr_list.as_slice(), irqchip)?);
        }
        let vm = self.vm_fd();
        let irqchip = if irqchip {
            Some(IrqchipState {
                pic_master: get_irqchip(
                    vm,
                    KVM_IRQCHIP_PIC_MASTER,
                    "KVM_GET_IRQCHIP (PIC master)",
                )?,
                pic_slave: get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
                ioapic: get_irqchip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
            })
        } else {
            None
        };
        // No PIT (its creation may have failed at boot) reads as an error.
        let pit = vm
            .get_pit2()
            .map_err(|e| tracing::debug!("no PIT state: {e}"))
            .ok();
        let mut clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        // KVM_SET_CLOCK refuses this flag (as in Firecracker).
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        let loaded = self.loaded_kernel();
        let entry = match loaded.entry {
            EntryState::Pvh32 { entry, start_info } => BootEntry::Pvh32 { entry, start_info },
            EntryState::Linux64 {
                entry,
                boot_params,
                cr3,
            } => BootEntry::Linux64 {
                entry,
                boot_params,
                cr3,
            },
        };
        Ok(VmState {
            version: VMSTATE_VERSION,
            boot: BootState {
                bz_image: loaded.format == KernelFormat::BzImage,
                paravirtual_aps: loaded.ap_startup == ApStartup::Paravirtual,
                entry,
            },
            memory_layout: self
                .memory()
                .regions()
                .iter()
                .map(|r| MemoryRegionState {
                    guest_addr: r.guest_addr,
                    len: r.len as u64,
                })
                .collect(),
            vcpus,
            vcpu_started: started,
            ap_entry: control.ap_entry(),
            irqchip,
            pit,
            clock,
            serial: SerialSnapshot::from(&self.serial_state()),
            pv: PvPortsState::save(&bus.pv),
            vsock,
        })
    }

    /// Builds a VM from `state` over `ram` (which must have the saved
    /// memory layout). The VM is ready to [`Vm::start`]: vCPUs that had
    /// started resume where they were; APs that had not wait for START_APS.
    pub fn restore(
        config: RestoreConfig,
        ram: GuestRam,
        state: &VmState,
    ) -> Result<Vm, VmStateError> {
        state.validate()?;
        check_layout(&ram, &state.memory_layout)?;
        vcpu_control::install_kick_handler().map_err(|e| VmError::Io {
            what: "cannot install the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let kvm_sys = kvm_device::open_kvm().map_err(VmError::from)?;
        let vm_fd = kvm_sys.create_vm().map_err(kvm("cannot create a KVM VM"))?;
        ram.register(&vm_fd)?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm("cannot set the TSS address"))?;
        let irqchip = state.irqchip.is_some();
        if irqchip {
            vm_fd
                .create_irq_chip()
                .map_err(kvm("cannot create the in-kernel irqchip"))?;
            if state.pit.is_some() {
                let pit = kvm_pit_config {
                    flags: KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                };
                vm_fd
                    .create_pit2(pit)
                    .map_err(kvm("cannot create the in-kernel PIT"))?;
            }
        }

        let supported = kvm_sys
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("cannot read supported CPUID"))?;
        let count = state.vcpus.len();
        let mut fds = Vec::with_capacity(count);
        for index in 0..count {
            fds.push(vcpu::create_vcpu(
                &vm_fd,
                &supported,
                index,
                count,
                irqchip,
                state.boot.bz_image,
            )?);
        }

        // VM-wide state before the vCPUs' (their LAPICs route through it).
        if let Some(pit) = &state.pit {
            vm_fd.set_pit2(pit).map_err(kvm("KVM_SET_PIT2"))?;
        }
        vm_fd
            .set_clock(&state.clock)
            .map_err(kvm("KVM_SET_CLOCK"))?;
        if let Some(chips) = &state.irqchip {
            vm_fd
                .set_irqchip(&chips.pic_master)
                .map_err(kvm("KVM_SET_IRQCHIP (PIC master)"))?;
            vm_fd
                .set_irqchip(&chips.pic_slave)
                .map_err(kvm("KVM_SET_IRQCHIP (PIC slave)"))?;
            vm_fd
                .set_irqchip(&chips.ioapic)
                .map_err(kvm("KVM_SET_IRQCHIP (IOAPIC)"))?;
        }
        for (index, (fd, vs)) in fds.iter().zip(&state.vcpus).enumerate() {
            vstate::restore(index, fd, vs)?;
        }

        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Io {
            what: "cannot create the serial interrupt eventfd",
            source,
        })?;
        if irqchip {
            vm_fd
                .register_irqfd(&irq, COM1_IRQ)
                .map_err(kvm("cannot register the serial irqfd"))?;
        }
        let serial =
            SerialDevice::from_state(irq, config.serial_out, &SerialState::from(&state.serial))
                .map_err(|e| VmStateError::Serial(e.to_string()))?;
        let pv = state.pv.restore().map_err(VmStateError::Invalid)?;
        let bus = Arc::new(IoBus {
            serial: Arc::new(serial),
            pv,
            vsock: OnceLock::new(),
        });

        let ap_startup = if state.boot.paravirtual_aps {
            ApStartup::Paravirtual
        } else {
            ApStartup::InitSipi
        };
        let control = Arc::new(VcpuControl::new(count, state.boot.paravirtual_aps));
        if state.boot.paravirtual_aps {
            control.set_restored(&state.vcpu_started, state.ap_entry);
        }
        match (&state.vsock, config.kv_listener) {
            (Some(vs), listener) => {
                let wake = control.clone();
                let device = VsockDevice::restore(
                    crate::devices::virtio::VSOCK_MMIO_BASE,
                    &vm_fd,
                    ram.memory().clone(),
                    listener,
                    Box::new(move || wake.wake_waiters()),
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
        let entry = match state.boot.entry {
            BootEntry::Pvh32 { entry, start_info } => EntryState::Pvh32 { entry, start_info },
            BootEntry::Linux64 {
                entry,
                boot_params,
                cr3,
            } => EntryState::Linux64 {
                entry,
                boot_params,
                cr3,
            },
        };
        let loaded = LoadedKernel {
            format: if state.boot.bz_image {
                KernelFormat::BzImage
            } else {
                KernelFormat::Elf
            },
            entry,
            ap_startup,
        };
        Ok(Vm::from_parts(VmParts {
            kvm: kvm_sys,
            vm_fd: Arc::new(vm_fd),
            ram,
            vcpu_fds: fds.into_iter().map(|f| Arc::new(Mutex::new(f))).collect(),
            control,
            bus,
            loaded,
            irqchip,
            serial_in: config.serial_in,
        }))
    }
}
