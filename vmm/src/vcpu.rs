//! vCPU creation, boot register state, and the vCPU thread's run loop.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_regs, kvm_sregs, CpuId, KVM_MP_STATE_RUNNABLE,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use snapvm_guest::abi::ExceptionFrame;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::gdt::{self, segment_from_gdt};
use crate::boot::{ApStartup, EntryState};
use crate::devices::{IoAction, IoBus};
use crate::exception_dump;
use crate::layout::{BOOT_GDT_ADDR, BOOT_IDT_ADDR, BOOT_STACK_POINTER};
use crate::memory::GuestRam;
use crate::vcpu_control::{self, Gate, VcpuControl, VmExit};
use crate::{cpuid, msr};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        index: usize,
        source: kvm_ioctls::Error,
    },
    #[error("cannot configure vCPU {index} ({what}): {source}")]
    Configure {
        index: usize,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM accepted only {set} of {total} boot MSRs")]
    Msrs {
        index: usize,
        set: usize,
        total: usize,
    },
    #[error("cannot build a KVM structure: {0:?}")]
    Fam(vmm_sys_util::fam::Error),
}

/// A vCPU fd shared between its thread (which runs it) and the VM owner
/// (which reads its state while the VM is paused).
pub type SharedVcpuFd = Arc<Mutex<VcpuFd>>;

/// Locks a shared vCPU fd. Poisoning only means a thread panicked while
/// running; the fd itself is still valid.
pub fn lock_vcpu(fd: &SharedVcpuFd) -> MutexGuard<'_, VcpuFd> {
    fd.lock().unwrap_or_else(|e| e.into_inner())
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Creates vCPU `index` of `count` and sets CPUID, boot MSRs, FPU and (with
/// an in-kernel irqchip) the LAPIC's LINT pins.
pub fn create_vcpu(
    vm: &VmFd,
    supported_cpuid: &CpuId,
    index: usize,
    count: usize,
    irqchip: bool,
    ring0_quirks: bool,
) -> Result<VcpuFd, VcpuError> {
    let cfg = |what| {
        move |source| VcpuError::Configure {
            index,
            what,
            source,
        }
    };
    let fd = vm
        .create_vcpu(index as u64)
        .map_err(|source| VcpuError::Create { index, source })?;
    let mut cpuid = supported_cpuid.clone();
    cpuid::configure(&mut cpuid, index as u8, count as u8, ring0_quirks);
    fd.set_cpuid2(&cpuid).map_err(cfg("CPUID"))?;
    let entries = msr::boot_msrs();
    let msrs = msr::to_msrs(&entries).map_err(VcpuError::Fam)?;
    let set = fd.set_msrs(&msrs).map_err(cfg("MSRs"))?;
    if set != entries.len() {
        return Err(VcpuError::Msrs {
            index,
            set,
            total: entries.len(),
        });
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(cfg("FPU"))?;
    if irqchip {
        let mut lapic = fd.get_lapic().map_err(cfg("LAPIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(cfg("LAPIC"))?;
    }
    Ok(fd)
}

fn set_lvt_mode(regs: &mut [libc::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(&regs[offset..offset + 4]) {
        *d = *s as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (d, s) in regs[offset..offset + 4].iter_mut().zip(v.to_le_bytes()) {
        *d = s as libc::c_char;
    }
}

/// Puts vCPU 0 in the kernel's entry state.
pub fn set_entry_state(fd: &VcpuFd, index: usize, entry: &EntryState) -> Result<(), VcpuError> {
    let cfg = |what| {
        move |source| VcpuError::Configure {
            index,
            what,
            source,
        }
    };
    let mut sregs = fd.get_sregs().map_err(cfg("sregs"))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match *entry {
        EntryState::Pvh32 { entry, start_info } => {
            pvh_sregs(&mut sregs);
            regs.rip = entry;
            regs.rbx = start_info;
        }
        EntryState::Linux64 {
            entry,
            boot_params,
            cr3,
        } => {
            long_mode_sregs(&mut sregs, cr3);
            regs.rip = entry;
            regs.rsi = boot_params;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    fd.set_sregs(&sregs).map_err(cfg("sregs"))?;
    fd.set_regs(&regs).map_err(cfg("regs"))?;
    Ok(())
}

/// Starts an AP on the paravirtual path: PVH 32-bit state at `entry`,
/// EBX = 0, ESI = its index.
pub fn set_ap_pvh_state(fd: &VcpuFd, index: usize, entry: u64) -> Result<(), VcpuError> {
    let cfg = |what| {
        move |source| VcpuError::Configure {
            index,
            what,
            source,
        }
    };
    // With the in-kernel LAPIC an AP waits for INIT/SIPI; we start it by hand.
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(cfg("MP state"))?;
    let mut sregs = fd.get_sregs().map_err(cfg("sregs"))?;
    pvh_sregs(&mut sregs);
    fd.set_sregs(&sregs).map_err(cfg("sregs"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rbx: 0,
        rsi: index as u64,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(cfg("regs"))?;
    Ok(())
}

fn set_gdt_tables(sregs: &mut kvm_sregs, table: &[u64]) {
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(table[1], 1);
    let data = segment_from_gdt(table[2], 2);
    let tss = segment_from_gdt(table[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
}

/// 32-bit protected mode, flat segments, paging off (the PVH entry state).
fn pvh_sregs(sregs: &mut kvm_sregs) {
    set_gdt_tables(sregs, &gdt::PVH_GDT);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// Long mode on identity tables at `cr3` (the Linux 64-bit entry state).
fn long_mode_sregs(sregs: &mut kvm_sregs, cr3: u64) {
    set_gdt_tables(sregs, &gdt::LINUX_GDT);
    sregs.cr3 = cr3;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// Everything a vCPU thread needs.
pub struct VcpuThread {
    pub index: usize,
    pub fd: SharedVcpuFd,
    pub control: Arc<VcpuControl>,
    pub bus: Arc<IoBus>,
    pub ram: GuestRam,
    pub ap_startup: ApStartup,
}

/// What the loop does after an exit.
enum Next {
    Run,
    Wait(Duration),
    Stop(VmExit),
}

impl VcpuThread {
    /// The thread body: runs until the VM stops.
    pub fn run(self) {
        let index = self.index;
        self.control.register_thread(index);
        {
            let mut fd = lock_vcpu(&self.fd);
            let run: *mut kvm_bindings::kvm_run = fd.get_kvm_run();
            vcpu_control::set_thread_kvm_run(run);
        }
        let exit = self.run_loop();
        if let Some(exit) = exit {
            self.control.request_stop(exit);
        }
        vcpu_control::set_thread_kvm_run(std::ptr::null_mut());
        self.control.mark_exited(index);
    }

    fn run_loop(&self) -> Option<VmExit> {
        let index = self.index;
        if index > 0
            && self.ap_startup == ApStartup::Paravirtual
            // A restored AP that had started runs on from its saved state.
            && self.control.is_not_started(index)
        {
            let entry = self.control.wait_for_start(index)?;
            let fd = lock_vcpu(&self.fd);
            if let Err(e) = set_ap_pvh_state(&fd, index, entry) {
                return Some(VmExit::Error(e.to_string()));
            }
            tracing::debug!("vCPU {index} started at {entry:#x}");
        }
        loop {
            let next = {
                let mut fd = lock_vcpu(&self.fd);
                // Clear first, then check the flag: see vcpu_control.rs.
                vcpu_control::clear_immediate_exit();
                if self.control.needs_attention() {
                    None
                } else {
                    Some(self.run_once(&mut fd))
                }
            };
            let gate = match next {
                None => self.control.hold(index),
                Some(Next::Run) => Gate::Run,
                Some(Next::Wait(d)) => self.control.idle_wait(index, d),
                Some(Next::Stop(exit)) => return Some(exit),
            };
            if gate == Gate::Stop {
                return None;
            }
        }
    }

    fn run_once(&self, fd: &mut VcpuFd) -> Next {
        let index = self.index;
        // Exits that need the fd again are decided in the match and acted
        // on after it, once the borrow of kvm_run has ended.
        enum After {
            Exception,
            Dump(&'static str, bool),
        }
        let after = match fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    self.bus.read(port, data);
                    return Next::Run;
                }
                VcpuExit::IoOut(port, data) => match self.bus.write(port, data) {
                    IoAction::None => return Next::Run,
                    IoAction::Poweroff(s) => return Next::Stop(VmExit::Poweroff(s)),
                    IoAction::Reboot => return Next::Stop(VmExit::Reboot),
                    IoAction::IdleWait(d) => return Next::Wait(d),
                    IoAction::StartAps(entry) => {
                        if !self.control.start_aps(entry) {
                            tracing::debug!("repeated START_APS ignored");
                        }
                        return Next::Run;
                    }
                    IoAction::Exception => After::Exception,
                },
                VcpuExit::MmioRead(addr, data) => {
                    self.bus.mmio_read(addr, data);
                    return Next::Run;
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.bus.mmio_write(addr, data);
                    return Next::Run;
                }
                // Only without an in-kernel irqchip: treat as an idle wait.
                VcpuExit::Hlt => return Next::Wait(crate::devices::pv_ports::DEFAULT_WAIT),
                VcpuExit::Shutdown => After::Dump("triple fault (shutdown exit)", true),
                VcpuExit::InternalError => After::Dump("KVM internal error", false),
                VcpuExit::FailEntry(reason, cpu) => {
                    tracing::error!("VM entry failed: reason {reason:#x} on host CPU {cpu}");
                    After::Dump("VM entry failure", false)
                }
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => return Next::Stop(VmExit::Poweroff(0)),
                    KVM_SYSTEM_EVENT_RESET => return Next::Stop(VmExit::Reboot),
                    other => {
                        tracing::warn!("unhandled system event {other}");
                        return Next::Run;
                    }
                },
                VcpuExit::IrqWindowOpen | VcpuExit::Intr => return Next::Run,
                other => {
                    let msg = format!("vCPU {index}: unhandled KVM exit {other:?}");
                    return Next::Stop(VmExit::Error(msg));
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Next::Run,
            Err(e) => {
                return Next::Stop(VmExit::Error(format!("vCPU {index}: KVM_RUN failed: {e}")))
            }
        };
        match after {
            After::Exception => self.guest_exception(fd),
            After::Dump(reason, guest_fault) => {
                let mut reason = reason.to_string();
                if !guest_fault {
                    let internal = fd.get_kvm_run();
                    // SAFETY: KVM filled the `internal` member for this exit
                    // reason (KVM_EXIT_INTERNAL_ERROR / FAIL_ENTRY read as
                    // plain integers either way).
                    let sub = unsafe { internal.__bindgen_anon_1.internal.suberror };
                    reason.push_str(&format!(" (suberror {sub})"));
                }
                let regs = fd.get_regs().ok();
                let sregs = fd.get_sregs().ok();
                let mut dump =
                    exception_dump::format_cpu_state(index, &reason, regs.as_ref(), sregs.as_ref());
                if let Some(code) = regs.and_then(|r| self.code_at(fd, r.rip)) {
                    dump.push_str(&format!("  code at RIP: {code:02x?}\n"));
                }
                eprint!("{dump}");
                if guest_fault {
                    Next::Stop(VmExit::GuestCrash(reason))
                } else {
                    Next::Stop(VmExit::Error(format!("vCPU {index}: {reason}")))
                }
            }
        }
    }

    /// Up to 16 instruction bytes at guest-virtual `rip`, for dumps.
    fn code_at(&self, fd: &VcpuFd, rip: u64) -> Option<Vec<u8>> {
        let t = fd.translate_gva(rip).ok()?;
        if t.valid == 0 {
            return None;
        }
        // Stay within the page: the next one may map elsewhere.
        let len = (0x1000 - (t.physical_address & 0xfff)).min(16) as usize;
        let mut code = vec![0u8; len];
        self.ram
            .memory()
            .read_slice(&mut code, GuestAddress(t.physical_address))
            .ok()?;
        Some(code)
    }

    /// The guest's exception stub reported a crash: read the frame at RSP
    /// (identity mapped, so the stack address is guest-physical) and dump.
    fn guest_exception(&self, fd: &VcpuFd) -> Next {
        let index = self.index;
        let regs = match fd.get_regs() {
            Ok(r) => r,
            Err(e) => {
                return Next::Stop(VmExit::GuestCrash(format!(
                    "exception on vCPU {index}; cannot read registers: {e}"
                )))
            }
        };
        let sregs = fd.get_sregs().ok();
        match read_exception_frame(&self.ram, regs.rsp) {
            Some(frame) => {
                eprint!(
                    "{}",
                    exception_dump::format_exception(index, &frame, sregs.as_ref())
                );
                Next::Stop(VmExit::GuestCrash(format!(
                    "vector {} ({})",
                    frame.vector,
                    exception_dump::vector_name(frame.vector)
                )))
            }
            None => {
                let reason = format!(
                    "guest exception, but the frame at RSP {:#x} is outside guest RAM",
                    regs.rsp
                );
                eprint!(
                    "{}",
                    exception_dump::format_cpu_state(index, &reason, Some(&regs), sregs.as_ref())
                );
                Next::Stop(VmExit::GuestCrash(reason))
            }
        }
    }
}

/// Reads an [`ExceptionFrame`] at guest-physical `addr`, bounds-checked.
pub fn read_exception_frame(ram: &GuestRam, addr: u64) -> Option<ExceptionFrame> {
    const N: usize = std::mem::size_of::<ExceptionFrame>() / 8;
    let mut words = [0u64; N];
    let mut bytes = [0u8; N * 8];
    ram.memory()
        .read_slice(&mut bytes, GuestAddress(addr))
        .ok()?;
    for (w, c) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        *w = u64::from_le_bytes(b);
    }
    let [r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax, vector, error_code, rip, cs, rflags, rsp, ss] =
        words;
    Some(ExceptionFrame {
        r15,
        r14,
        r13,
        r12,
        r11,
        r10,
        r9,
        r8,
        rbp,
        rdi,
        rsi,
        rdx,
        rcx,
        rbx,
        rax,
        vector,
        error_code,
        rip,
        cs,
        rflags,
        rsp,
        ss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_read_in_abi_order_and_bounds_checked() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let words: Vec<u64> = (1..=22).collect();
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        ram.memory()
            .write_slice(&bytes, GuestAddress(0x1000))
            .unwrap();
        let f = read_exception_frame(&ram, 0x1000).unwrap();
        assert_eq!(
            (f.r15, f.rax, f.vector, f.error_code, f.rip, f.ss),
            (1, 15, 16, 17, 18, 22)
        );
        assert!(read_exception_frame(&ram, (4 << 20) - 8).is_none());
        assert!(read_exception_frame(&ram, u64::MAX - 4).is_none());
    }

    #[test]
    fn lvt_mode_bits() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[APIC_LVT0] = 0x10;
        regs[APIC_LVT0 + 2] = 0x01; // masked bit 16
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x10);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
