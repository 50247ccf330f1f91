//! One vCPU's state: capture and restore, in Firecracker's order.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::error::VmStateError;

/// MSR_IA32_TSC_DEADLINE: must be written after MSR_IA32_TSC (0x10), or the armed
/// deadline is judged against the old TSC and the timer can be lost.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// KVM_GET/SET_MSRS batch size.
const MSR_BATCH: usize = 256;

/// A vCPU's architectural state (what KVM keeps for it).
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// KVM_GET_TSC_KHZ (0 if the host could not tell).
    pub tsc_khz: u32,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// Legacy 4 KiB XSAVE area (covers x87/SSE/AVX; snapvm never enables
    /// KVM_CAP_XSAVE2, so guests cannot use larger dynamic features).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    /// None without an in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// Every MSR of KVM_GET_MSR_INDEX_LIST the vCPU let us read (includes
    /// the TSC and the KVM paravirtual MSRs).
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

impl VcpuState {
    /// The guest's TSC when the state was captured (IA32_TSC).
    pub fn tsc(&self) -> Option<u64> {
        self.msrs
            .iter()
            .find(|m| m.index == crate::msr::MSR_IA32_TSC)
            .map(|m| m.data)
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// Finishes an exit KVM still has pending (e.g. the `out` of the guest's
/// PORT_WAIT: RIP stays on the instruction until the next KVM_RUN
/// completes it): one KVM_RUN with `immediate_exit` set completes it and
/// returns EINTR without running guest code. Call only on a vCPU that has
/// run and whose thread is held.
pub fn complete_pending_exit(index: usize, fd: &mut VcpuFd) -> Result<(), VmStateError> {
    fd.set_kvm_immediate_exit(1);
    let res = match fd.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
        Err(source) => Err(VmStateError::VcpuKvm {
            index,
            what: "KVM_RUN with immediate_exit",
            source,
        }),
        Ok(exit) => Err(VmStateError::PendingExit {
            index,
            exit: format!("{exit:?}"),
        }),
    };
    fd.set_kvm_immediate_exit(0);
    res
}

/// Reads vCPU `index`'s state. Order as Firecracker: MP state first (its
/// GET processes pending LAPIC events), vCPU events last.
pub fn capture(
    index: usize,
    fd: &VcpuFd,
    msr_list: &[u32],
    lapic: bool,
) -> Result<VcpuState, VmStateError> {
    let e = |what| {
        move |source| VmStateError::VcpuKvm {
            index,
            what,
            source,
        }
    };
    let mp_state = fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(e("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
    let lapic = if lapic {
        Some(fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?)
    } else {
        None
    };
    let tsc_khz = fd.get_tsc_khz().unwrap_or_else(|err| {
        tracing::debug!("vCPU {index}: KVM_GET_TSC_KHZ failed: {err}");
        0
    });
    let msrs = read_msrs(index, fd, msr_list)?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(e("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let events = fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid,
        tsc_khz,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
    })
}

/// Writes `state` into a fresh (never run) vCPU. Order as Firecracker's
/// `restore_state`: CPUID, (TSC kHz), MP state, regs, sregs, XSAVE, XCRs,
/// debug regs, LAPIC, MSRs (TSC before TSC deadline), vCPU events last.
pub fn restore(index: usize, fd: &VcpuFd, state: &VcpuState) -> Result<(), VmStateError> {
    let e = |what| {
        move |source| VmStateError::VcpuKvm {
            index,
            what,
            source,
        }
    };
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(VmStateError::Fam)?;
    fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
    if state.tsc_khz != 0 {
        let current = fd.get_tsc_khz().unwrap_or(0);
        if current != state.tsc_khz {
            fd.set_tsc_khz(state.tsc_khz)
                .map_err(e("KVM_SET_TSC_KHZ (TSC scaling)"))?;
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(e("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(e("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(e("KVM_SET_SREGS"))?;
    // SAFETY: `state.xsave` is a whole kvm_xsave (4 KiB region). snapvm
    // never enables KVM_CAP_XSAVE2, so KVM_SET_XSAVE reads exactly
    // size_of::<kvm_xsave>() bytes, all inside the struct.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs).map_err(e("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(e("KVM_SET_DEBUGREGS"))?;
    if let Some(lapic) = &state.lapic {
        fd.set_lapic(lapic).map_err(e("KVM_SET_LAPIC"))?;
    }
    write_msrs(index, fd, &state.msrs)?;
    fd.set_vcpu_events(&state.events)
        .map_err(e("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Reads every MSR in `list` that KVM lets us read. KVM_GET_MSRS stops at
/// the first one it refuses, so skip that one and go on.
fn read_msrs(index: usize, fd: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VmStateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut i = 0;
    while i < list.len() {
        let chunk: Vec<kvm_msr_entry> = list[i..]
            .iter()
            .take(MSR_BATCH)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk).map_err(VmStateError::Fam)?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|source| VmStateError::VcpuKvm {
                index,
                what: "KVM_GET_MSRS",
                source,
            })?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        i += n;
        if n < chunk.len() {
            tracing::debug!("vCPU {index}: MSR {:#x} is not readable", list[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Writes `entries`, TSC deadline last (after the TSC). Every MSR we read
/// must be accepted: a refused one is an error naming it.
fn write_msrs(index: usize, fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), VmStateError> {
    let (mut ordered, deadline): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) = entries
        .iter()
        .partition(|m| m.index != MSR_IA32_TSC_DEADLINE);
    ordered.extend(deadline);
    for chunk in ordered.chunks(MSR_BATCH) {
        let msrs = Msrs::from_entries(chunk).map_err(VmStateError::Fam)?;
        let set = fd.set_msrs(&msrs).map_err(|source| VmStateError::VcpuKvm {
            index,
            what: "KVM_SET_MSRS",
            source,
        })?;
        if set != chunk.len() {
            return Err(VmStateError::Msrs {
                index,
                set,
                total: chunk.len(),
                refused: chunk[set].index,
            });
        }
    }
    Ok(())
}
