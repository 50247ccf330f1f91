//! The KVM VM itself as a component: created with its memslots, TSS and
//! (where KVM offers them) the in-kernel irqchip and PIT; its VM-wide
//! state — PIC master and slave, IOAPIC, PIT, KVM clock — saved and
//! restored as one.
//!
//! Restore order (Firecracker's): the VM-wide state is written after the
//! vCPUs are created and before their own state (their LAPICs route
//! through it).

use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_CLOCK_TSC_STABLE,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::component::Persist;
use crate::error::VmError;
use crate::error::VmStateError;
use crate::memory::GuestRam;

/// Identity-map and TSS pages KVM needs on Intel; inside the MMIO hole so
/// they never shadow RAM.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// What interrupt hardware to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Irqchip {
    /// Try the irqchip and PIT; go on without them if KVM refuses (a boot).
    IfAvailable,
    /// The irqchip (and the PIT if `pit`) must be created (a restore of a
    /// VM that had them).
    Required { pit: bool },
    /// None (a restore of a VM that had none).
    None,
}

/// The in-kernel irqchip: KVM_GET_IRQCHIP of PIC master, PIC slave, IOAPIC.
#[derive(Clone, Serialize, Deserialize)]
pub struct IrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

impl std::fmt::Debug for IrqchipState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqchipState").finish_non_exhaustive()
    }
}

/// The VM-wide state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    /// None without an in-kernel irqchip.
    pub irqchip: Option<IrqchipState>,
    /// None without an in-kernel PIT.
    pub pit: Option<kvm_pit_state2>,
    pub clock: kvm_clock_data,
}

/// A KVM VM.
#[derive(Debug, Clone)]
pub struct KvmVm {
    pub fd: Arc<VmFd>,
    /// It has the in-kernel irqchip (and so LAPICs, and the PIT if that
    /// could be created).
    pub irqchip: bool,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

impl KvmVm {
    /// Creates the VM, registers `ram` as its memslots, sets the TSS and
    /// creates the interrupt hardware `irqchip` asks for.
    pub fn create(kvm: &Kvm, ram: &GuestRam, irqchip: Irqchip) -> Result<KvmVm, VmError> {
        let fd = kvm.create_vm().map_err(kvm_err("cannot create a KVM VM"))?;
        ram.register(&fd)?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("cannot set the TSS address"))?;
        let pit_config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        let has_irqchip = match irqchip {
            Irqchip::IfAvailable => match fd.create_irq_chip() {
                Ok(()) => {
                    if let Err(e) = fd.create_pit2(pit_config) {
                        tracing::warn!("no in-kernel PIT: {e}");
                    }
                    true
                }
                Err(e) => {
                    tracing::warn!("no in-kernel irqchip ({e}); guest interrupts are unavailable");
                    false
                }
            },
            Irqchip::Required { pit } => {
                fd.create_irq_chip()
                    .map_err(kvm_err("cannot create the in-kernel irqchip"))?;
                if pit {
                    fd.create_pit2(pit_config)
                        .map_err(kvm_err("cannot create the in-kernel PIT"))?;
                }
                true
            }
            Irqchip::None => false,
        };
        Ok(KvmVm {
            fd: Arc::new(fd),
            irqchip: has_irqchip,
        })
    }

    fn get_irqchip(&self, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, VmStateError> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(|source| VmStateError::Kvm { what, source })?;
        Ok(chip)
    }
}

impl Persist for KvmVm {
    type State = KvmVmState;
    /// The VM freshly created for the restore (with its vCPUs, not run).
    type ConstructorArgs = KvmVm;
    type Error = VmStateError;

    fn save(&self) -> Result<KvmVmState, VmStateError> {
        let kvm = |what| move |source| VmStateError::Kvm { what, source };
        let irqchip = if self.irqchip {
            Some(IrqchipState {
                pic_master: self
                    .get_irqchip(KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
                pic_slave: self
                    .get_irqchip(KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
                ioapic: self.get_irqchip(KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
            })
        } else {
            None
        };
        // No PIT (its creation may have failed at boot) reads as an error.
        let pit = self
            .fd
            .get_pit2()
            .map_err(|e| tracing::debug!("no PIT state: {e}"))
            .ok();
        let mut clock = self.fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        // KVM_SET_CLOCK refuses this flag (as in Firecracker).
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        Ok(KvmVmState {
            irqchip,
            pit,
            clock,
        })
    }

    fn restore(vm: KvmVm, state: &KvmVmState) -> Result<KvmVm, VmStateError> {
        let kvm = |what| move |source| VmStateError::Kvm { what, source };
        if let Some(pit) = &state.pit {
            vm.fd.set_pit2(pit).map_err(kvm("KVM_SET_PIT2"))?;
        }
        vm.fd
            .set_clock(&state.clock)
            .map_err(kvm("KVM_SET_CLOCK"))?;
        if let Some(chips) = &state.irqchip {
            vm.fd
                .set_irqchip(&chips.pic_master)
                .map_err(kvm("KVM_SET_IRQCHIP (PIC master)"))?;
            vm.fd
                .set_irqchip(&chips.pic_slave)
                .map_err(kvm("KVM_SET_IRQCHIP (PIC slave)"))?;
            vm.fd
                .set_irqchip(&chips.ioapic)
                .map_err(kvm("KVM_SET_IRQCHIP (IOAPIC)"))?;
        }
        Ok(vm)
    }
}
