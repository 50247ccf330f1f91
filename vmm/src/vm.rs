//! The VM owner: creates the KVM VM, its memory, devices and vCPU threads,
//! and exposes the controls snapshots are built on (pause/resume, vCPU
//! state, guest RAM, the guest probe).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::MutEventSubscriber;
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_config, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use snapvm_guest::abi::{ProbeBlock, PROBE_MAGIC};

use crate::placement::CpuPlacement;
use crate::probe_gaps::ProbeGaps;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::ApStartup;
use crate::devices::pv_ports::PvPorts;
use crate::devices::serial::{SerialDevice, COM1_IRQ};
use crate::devices::stdin::StdinInput;
use crate::devices::virtio::vsock::{HostListener, VsockDevice, VsockError};
use crate::devices::{EventLoop, IoBus};
use crate::kvm_device::{self, KvmDeviceError};
use crate::loader::{self, BootConfig, KernelFormat, LoadError, LoadedKernel};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{self, lock_vcpu, SharedVcpuFd, VcpuError, VcpuThread};
use crate::vcpu_control::{self, PauseError, VcpuControl, VmExit};

/// Identity-map and TSS pages KVM needs on Intel; inside the MMIO hole so
/// they never shadow RAM.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    KvmDevice(#[from] KvmDeviceError),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot open serial output {path}: {source}")]
    Serial {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the VM was already started")]
    AlreadyStarted,
    #[error("{0}")]
    Pause(#[from] PauseError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("a vsock device is already attached")]
    VsockAttached,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbeError {
    #[error("the guest has not registered a probe block")]
    NotRegistered,
    #[error("the probe block at {0:#x} is outside guest RAM")]
    OutOfRange(u64),
    #[error("the probe block at {addr:#x} has bad magic {magic:#x}")]
    BadMagic { addr: u64, magic: u64 },
}

/// What the VM is built from.
pub struct VmConfig {
    pub boot: BootConfig,
    /// Bytes of RAM, a multiple of 2 MiB.
    pub memory_size: u64,
    pub vcpus: usize,
    /// Where COM1 output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Feed host stdin to COM1.
    pub serial_in: bool,
    /// Host page backing of guest RAM (`--hugepages on|off`).
    pub backing: crate::memory::PageBacking,
}

impl VmConfig {
    /// A config with `serial` being "stdout" or a file path.
    pub fn serial_sink(serial: &str) -> Result<Box<dyn Write + Send>, VmError> {
        crate::devices::serial::output_sink(serial).map_err(|source| VmError::Serial {
            path: serial.to_string(),
            source,
        })
    }
}

/// A vCPU's architectural state, readable while the VM is paused.
#[derive(Clone, Debug)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    pub xcrs: kvm_xcrs,
    pub lapic: Option<kvm_lapic_state>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
    pub msrs: Vec<kvm_msr_entry>,
}

/// A running (or ready to run) VM.
pub struct Vm {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    vcpu_fds: Vec<SharedVcpuFd>,
    control: Arc<VcpuControl>,
    bus: Arc<IoBus>,
    loaded: LoadedKernel,
    irqchip: bool,
    serial_in: bool,
    threads: Vec<JoinHandle<()>>,
    event_loop: Option<EventLoop>,
    started: bool,
    exit: Option<VmExit>,
    /// `--cpus`: where the guest's and the snapshots' threads run.
    cpus: Option<CpuPlacement>,
}

impl Vm {
    /// Builds the VM: KVM VM, RAM, kernel, devices and vCPUs. Nothing runs yet.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        vcpu_control::install_kick_handler().map_err(|e| VmError::Io {
            what: "cannot install the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let kvm = kvm_device::open_kvm()?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("cannot create a KVM VM"))?;
        let ram = GuestRam::with_backing(config.memory_size, config.backing)?;
        ram.register(&vm_fd)?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("cannot set the TSS address"))?;
        let irqchip = match vm_fd.create_irq_chip() {
            Ok(()) => {
                let pit = kvm_pit_config {
                    flags: KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                };
                if let Err(e) = vm_fd.create_pit2(pit) {
                    tracing::warn!("no in-kernel PIT: {e}");
                }
                true
            }
            Err(e) => {
                tracing::warn!("no in-kernel irqchip ({e}); guest interrupts are unavailable");
                false
            }
        };
        let loaded = loader::load(&ram, &config.boot)?;
        tracing::info!(
            "loaded {} as {:?}, entry {:?}",
            config.boot.kernel.name,
            loaded.format,
            loaded.entry
        );

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("cannot read supported CPUID"))?;
        // Linux runs its own code in ring 0: see cpuid::configure.
        let ring0_quirks = loaded.format == KernelFormat::BzImage;
        let mut vcpu_fds = Vec::with_capacity(config.vcpus);
        for index in 0..config.vcpus {
            let fd = vcpu::create_vcpu(
                &vm_fd,
                &supported,
                index,
                config.vcpus,
                irqchip,
                ring0_quirks,
            )?;
            if index == 0 {
                vcpu::set_entry_state(&fd, 0, &loaded.entry)?;
            }
            vcpu_fds.push(Arc::new(Mutex::new(fd)));
        }
        let tsc_khz = lock_vcpu(&vcpu_fds[0]).get_tsc_khz().unwrap_or_else(|e| {
            tracing::debug!("KVM_GET_TSC_KHZ failed: {e}");
            0
        });

        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Io {
            what: "cannot create the serial interrupt eventfd",
            source,
        })?;
        if irqchip {
            vm_fd
                .register_irqfd(&irq, COM1_IRQ)
                .map_err(kvm_err("cannot register the serial irqfd"))?;
        }
        let serial = Arc::new(SerialDevice::new(irq, config.serial_out));
        let bus = Arc::new(IoBus {
            serial,
            pv: PvPorts::new(config.vcpus as u32, tsc_khz),
            vsock: std::sync::OnceLock::new(),
        });
        let control = Arc::new(VcpuControl::new(
            config.vcpus,
            loaded.ap_startup == ApStartup::Paravirtual,
        ));
        Ok(Vm {
            kvm,
            vm_fd: Arc::new(vm_fd),
            ram,
            vcpu_fds,
            control,
            bus,
            loaded,
            irqchip,
            serial_in: config.serial_in,
            threads: Vec::new(),
            event_loop: None,
            started: false,
            exit: None,
            cpus: None,
        })
    }

    /// Starts the device loop and one thread per vCPU (`vcpu0`, `vcpu1`, ...).
    pub fn start(&mut self) -> Result<(), VmError> {
        if self.started {
            return Err(VmError::AlreadyStarted);
        }
        self.started = true;
        let mut subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> = Vec::new();
        if self.serial_in {
            subscribers.push(Arc::new(Mutex::new(StdinInput::new(
                self.bus.serial.clone(),
                self.control.clone(),
            ))));
        }
        self.event_loop = Some(EventLoop::start(subscribers).map_err(|source| VmError::Io {
            what: "cannot start the device event loop",
            source,
        })?);
        for (index, fd) in self.vcpu_fds.iter().enumerate() {
            let thread = VcpuThread {
                index,
                fd: fd.clone(),
                control: self.control.clone(),
                bus: self.bus.clone(),
                ram: self.ram.clone(),
                ap_startup: self.loaded.ap_startup,
            };
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || thread.run());
            match spawned {
                Ok(h) => {
                    if let Some(p) = &self.cpus {
                        p.pin_guest_thread(&format!("vCPU {index}"), &h);
                    }
                    self.threads.push(h)
                }
                Err(source) => {
                    // Threads never started count as exited so waits end.
                    for i in index..self.vcpu_fds.len() {
                        self.control.mark_exited(i);
                    }
                    self.control
                        .request_stop(VmExit::Error("cannot spawn vCPU thread".into()));
                    return Err(VmError::Io {
                        what: "cannot spawn a vCPU thread",
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Kicks every vCPU out of KVM_RUN and returns once all are held.
    /// Fails (never hangs) if a vCPU has exited or the VM is stopping.
    pub fn pause(&self) -> Result<(), PauseError> {
        if !self.started {
            return Err(PauseError::NotStarted);
        }
        self.control.pause()
    }

    /// Releases the vCPUs held by [`Vm::pause`].
    pub fn resume(&self) -> Result<(), PauseError> {
        self.control.resume()
    }

    /// Parks the device threads (the vsock one, if attached) between
    /// packets: until [`Vm::resume_devices`] no device reads or writes
    /// guest memory or queue state. Separate from [`Vm::pause`] because
    /// only a snapshot needs both (pause vCPUs, then devices); idempotent.
    pub fn pause_devices(&self) -> Result<(), VmError> {
        if let Some(d) = self.bus.vsock.get() {
            d.pause()?;
        }
        Ok(())
    }

    /// Releases the device threads held by [`Vm::pause_devices`].
    pub fn resume_devices(&self) {
        if let Some(d) = self.bus.vsock.get() {
            d.resume();
        }
    }

    /// Time from the last [`Vm::resume`] until every vCPU it released was
    /// back on its way into KVM_RUN (None while some are still waking).
    pub fn last_resume_latency(&self) -> Option<std::time::Duration> {
        self.control.last_resume_latency()
    }

    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// The guest's probe block (validated magic, bounds-checked read).
    pub fn probe(&self) -> Result<ProbeBlock, ProbeError> {
        let addr = self.bus.pv.probe_addr();
        if addr == 0 {
            return Err(ProbeError::NotRegistered);
        }
        let mut bytes = vec![0u8; std::mem::size_of::<ProbeBlock>()];
        self.ram
            .memory()
            .read_slice(&mut bytes, GuestAddress(addr))
            .map_err(|_| ProbeError::OutOfRange(addr))?;
        // SAFETY: `bytes` holds size_of::<ProbeBlock>() initialised bytes and
        // ProbeBlock is repr(C) made only of integers, valid for any bits.
        let block: ProbeBlock = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        if block.magic != PROBE_MAGIC {
            return Err(ProbeError::BadMagic {
                addr,
                magic: block.magic,
            });
        }
        Ok(block)
    }

    /// Zeroes every valid probe slot's `max_gap_tsc` in guest memory, to
    /// start a fresh stall window (benchmarks only: a VMM write into guest
    /// RAM; the guest re-reads the field on every beat). Call with no
    /// snapshot in flight, so the write is not part of one.
    pub fn reset_probe_gaps(&self) -> Result<(), ProbeError> {
        let block = self.probe()?;
        let base = self.bus.pv.probe_addr();
        let n = (block.cpus as usize).min(block.slots.len());
        for i in 0..n {
            let off = std::mem::offset_of!(ProbeBlock, slots)
                + i * std::mem::size_of::<snapvm_guest::abi::ProbeSlot>()
                + std::mem::offset_of!(snapvm_guest::abi::ProbeSlot, max_gap_tsc);
            let addr = base + off as u64;
            self.ram
                .memory()
                .write_obj(0u64, GuestAddress(addr))
                .map_err(|_| ProbeError::OutOfRange(addr))?;
        }
        Ok(())
    }

    /// Largest `max_gap_tsc` over the valid probe slots, in microseconds
    /// (None if the guest reports no TSC frequency).
    pub fn probe_max_gap_us(&self) -> Result<Option<f64>, ProbeError> {
        let block = self.probe()?;
        let n = (block.cpus as usize).min(block.slots.len());
        let max = block.slots[..n]
            .iter()
            .map(|s| s.max_gap_tsc)
            .max()
            .unwrap_or(0);
        Ok((block.tsc_khz > 0).then(|| max as f64 * 1000.0 / block.tsc_khz as f64))
    }

    /// Gaps the guest logged since `cursors` (one per vCPU slot, grown as
    /// needed and advanced), with the number of records lost because the
    /// ring lapped the reader. A guest without a gap log gives none.
    pub fn probe_gaps(&self, cursors: &mut Vec<u64>) -> Result<ProbeGaps, ProbeError> {
        Ok(ProbeGaps::read(&self.probe()?, cursors))
    }

    /// Heartbeat of every probe slot the guest declared valid.
    pub fn heartbeats(&self) -> Result<Vec<u64>, ProbeError> {
        let block = self.probe()?;
        let n = (block.cpus as usize).min(block.slots.len());
        Ok(block.slots[..n].iter().map(|s| s.heartbeat).collect())
    }

    /// Reads every vCPU's state; the VM must be paused.
    pub fn vcpu_states(&self) -> Result<Vec<VcpuState>, VmError> {
        if !self.control.is_paused() {
            return Err(PauseError::NotPaused.into());
        }
        let msr_list = self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("cannot list MSRs"))?;
        self.vcpu_fds
            .iter()
            .map(|fd| {
                let fd = lock_vcpu(fd);
                Ok(VcpuState {
                    regs: fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
                    sregs: fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
                    fpu: fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?,
                    xcrs: fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
                    lapic: if self.irqchip {
                        Some(fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?)
                    } else {
                        None
                    },
                    events: fd
                        .get_vcpu_events()
                        .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
                    mp_state: fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
                    debugregs: fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
                    msrs: read_msrs(&fd, msr_list.as_slice())?,
                })
            })
            .collect()
    }

    /// Guest RAM and its host mappings.
    pub fn memory(&self) -> &GuestRam {
        &self.ram
    }

    /// The KVM VM fd (memslots, dirty logging, ...).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// The vCPU fds; lock one only while the VM is paused.
    pub fn vcpu_fds(&self) -> &[SharedVcpuFd] {
        &self.vcpu_fds
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpu_fds.len()
    }

    /// What was loaded and how it is entered.
    pub fn loaded_kernel(&self) -> &LoadedKernel {
        &self.loaded
    }

    /// COM1 register state (for snapshots).
    pub fn serial_state(&self) -> vm_superio::serial::SerialState {
        self.bus.serial.state()
    }

    /// Ends every idle wait now (for devices with something for the guest).
    pub fn wake_guest(&self) {
        self.control.wake_waiters();
    }

    /// Attaches the virtio-vsock device that forwards `listener`'s
    /// connections to the guest. Call before [`Vm::start`]; the guest learns
    /// where it is from [`crate::devices::virtio::cmdline_word`] on its
    /// command line.
    pub fn attach_vsock(&mut self, listener: HostListener) -> Result<(), VmError> {
        let control = self.control.clone();
        let device = VsockDevice::start(
            crate::devices::virtio::VSOCK_MMIO_BASE,
            &self.vm_fd,
            self.ram.memory().clone(),
            listener,
            Box::new(move || control.wake_waiters()),
        )?;
        if let Some(p) = &self.cpus {
            device.pin_thread(p);
        }
        self.bus
            .vsock
            .set(Arc::new(device))
            .map_err(|_| VmError::VsockAttached)
    }

    /// Why the VM stopped, if it has.
    pub fn exit_reason(&self) -> Option<VmExit> {
        self.exit.clone().or_else(|| self.control.exit())
    }

    /// Blocks until every vCPU has stopped; returns why.
    pub fn wait(&mut self) -> VmExit {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        let exit = if self.started {
            self.control.wait_exited()
        } else {
            VmExit::Shutdown
        };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(mut l) = self.event_loop.take() {
            l.stop();
        }
        if let Some(d) = self.bus.vsock.get() {
            d.stop();
        }
        self.bus.serial.flush();
        self.exit = Some(exit.clone());
        exit
    }

    /// A handle that can stop this VM from another thread (e.g. when a
    /// background check finds its restored memory corrupt).
    pub fn stopper(&self) -> VmStopper {
        VmStopper(self.control.clone())
    }

    /// Stops the VM (if it still runs) and waits for it.
    pub fn shutdown(&mut self) -> VmExit {
        self.control.request_stop(VmExit::Shutdown);
        self.wait()
    }
}

/// Stops a VM from another thread: the first recorded exit wins and the
/// VM's owner sees it from `Vm::wait` / `Vm::exit_reason`.
#[derive(Debug, Clone)]
pub struct VmStopper(Arc<VcpuControl>);

impl VmStopper {
    pub fn stop(&self, exit: VmExit) {
        self.0.request_stop(exit);
    }
}

/// Internals for the snapshot state code ([`crate::vmstate`]).
impl Vm {
    /// The /dev/kvm handle the VM was made with (no new open in the pause).
    pub(crate) fn kvm_sys(&self) -> &Kvm {
        &self.kvm
    }

    /// Devices, vCPU control and whether there is an in-kernel irqchip.
    pub(crate) fn state_parts(&self) -> (&IoBus, &VcpuControl, bool) {
        (&self.bus, &self.control, self.irqchip)
    }

    /// A VM (not started) from parts built by [`crate::vmstate::restore`].
    pub(crate) fn from_parts(p: crate::vmstate::restore::VmParts) -> Vm {
        Vm {
            kvm: p.kvm,
            vm_fd: p.vm_fd,
            ram: p.ram,
            vcpu_fds: p.vcpu_fds,
            control: p.control,
            bus: p.bus,
            loaded: p.loaded,
            irqchip: p.irqchip,
            serial_in: p.serial_in,
            threads: Vec::new(),
            event_loop: None,
            started: false,
            exit: None,
            cpus: None,
        }
    }

    /// Keeps the guest's threads (vCPUs, vsock device) on `p.guest` from
    /// [`Vm::start`] on, and snapshots' background threads on
    /// `p.background` (placement.rs). Call before `start`.
    pub fn set_cpu_placement(&mut self, p: CpuPlacement) {
        if let Some(vsock) = self.bus.vsock.get() {
            vsock.pin_thread(&p);
        }
        self.cpus = Some(p);
    }

    /// The `--cpus` placement, if any.
    pub fn cpu_placement(&self) -> Option<&CpuPlacement> {
        self.cpus.as_ref()
    }

    /// Where snapshots' background threads go (`--cpus` leaves them the
    /// other CPUs); None: unpinned.
    pub fn background_cpus(&self) -> Option<&snapshot::CpuSet> {
        self.cpus.as_ref().and_then(|p| p.background.as_ref())
    }

    /// Guest RAM as the snapshot engine sees it: regions in memslot
    /// order (the order of a snapshot's image).
    pub fn snapshot_regions(&self) -> Vec<snapshot::Region> {
        self.ram
            .regions()
            .iter()
            .map(|r| snapshot::Region::new(r.guest_addr, r.host_addr as u64, r.len as u64))
            .collect()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.started && self.exit.is_none() {
            self.shutdown();
        }
    }
}

/// Reads every MSR in `list` that KVM lets us read. KVM_GET_MSRS stops at
/// the first one it refuses, so skip that one and go on.
fn read_msrs(fd: &kvm_ioctls::VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VmError> {
    let mut out = Vec::with_capacity(list.len());
    let mut i = 0;
    while i < list.len() {
        let chunk: Vec<kvm_msr_entry> = list[i..]
            .iter()
            .take(256)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk).map_err(|e| VmError::Io {
            what: "cannot build the MSR list",
            source: std::io::Error::other(format!("{e:?}")),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        i += n;
        if n < chunk.len() {
            i += 1; // unreadable MSR
        }
    }
    Ok(out)
}
