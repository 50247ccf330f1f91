//! A VM: its parts (assembled by `builder.rs`, for a boot or a restore),
//! its vCPU threads, and the controls snapshots are built on — pause and
//! resume, its components as a list (`pausable`, `save_state`), guest
//! RAM, the guest probe.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::MutEventSubscriber;
use kvm_ioctls::{Kvm, VmFd};
use snapvm_guest::abi::{ProbeBlock, PROBE_MAGIC};

use crate::placement::CpuPlacement;
use crate::probe_gaps::ProbeGaps;
use vm_memory::{Bytes, GuestAddress};

use crate::component::{Pausable, Persist};
use crate::devices::stdin::StdinInput;
use crate::devices::virtio::vsock::{HostListener, VsockDevice};
use crate::devices::{EventLoop, IoBus};
pub use crate::error::VmError;
use crate::kvm_vm::KvmVm;
use crate::loader::{BootConfig, LoadedKernel};
use crate::memory::GuestRam;
use crate::vcpu::{SharedVcpuFd, VcpuThread};
use crate::vcpu_control::{PauseError, VcpuControl, VmExit};
use crate::vcpu_set::{RunningVcpus, VcpuSet};
use crate::vcpu_state::VcpuState;
use crate::vmstate::{MemoryRegionState, VmState, VmStateError, VMSTATE_VERSION};

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

/// The parts of a VM, as the builder makes them.
pub(crate) struct VmParts {
    pub kvm: Kvm,
    pub vm: KvmVm,
    pub ram: GuestRam,
    pub vcpus: VcpuSet,
    pub bus: Arc<IoBus>,
    pub loaded: LoadedKernel,
    pub serial_in: bool,
}

/// A running (or ready to run) VM.
pub struct Vm {
    /// /dev/kvm, open for the VM's life.
    #[allow(dead_code)]
    kvm: Kvm,
    vm: KvmVm,
    ram: GuestRam,
    vcpus: VcpuSet,
    bus: Arc<IoBus>,
    loaded: LoadedKernel,
    serial_in: bool,
    threads: Vec<JoinHandle<()>>,
    event_loop: Option<EventLoop>,
    started: bool,
    exit: Option<VmExit>,
    /// `--cpus`: where the guest's and the snapshots' threads run.
    cpus: Option<CpuPlacement>,
}

impl Vm {
    /// A VM from the builder's parts; nothing runs yet.
    pub(crate) fn assemble(p: VmParts) -> Vm {
        Vm {
            kvm: p.kvm,
            vm: p.vm,
            ram: p.ram,
            vcpus: p.vcpus,
            bus: p.bus,
            loaded: p.loaded,
            serial_in: p.serial_in,
            threads: Vec::new(),
            event_loop: None,
            started: false,
            exit: None,
            cpus: None,
        }
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
                self.vcpus.control.clone(),
            ))));
        }
        self.event_loop = Some(EventLoop::start(subscribers).map_err(|source| VmError::Io {
            what: "cannot start the device event loop",
            source,
        })?);
        for (index, fd) in self.vcpus.fds.iter().enumerate() {
            let thread = VcpuThread {
                index,
                fd: fd.clone(),
                control: self.vcpus.control.clone(),
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
                    for i in index..self.vcpus.len() {
                        self.vcpus.control.mark_exited(i);
                    }
                    self.vcpus
                        .control
                        .request_stop(VmExit::Error("cannot spawn vCPU thread".into()));
                    return Err(VmError::Io {
                        what: "cannot spawn a vCPU thread",
                        source,
                    });
                }
            }
        }
        // A restored VM: the guest runs, the bulk of its memory may load.
        if let Some(l) = self.ram.loader() {
            l.start_prefetch();
        }
        Ok(())
    }

    /// Kicks every vCPU out of KVM_RUN and returns once all are held.
    /// Fails (never hangs) if a vCPU has exited or the VM is stopping.
    pub fn pause(&self) -> Result<(), PauseError> {
        if !self.started {
            return Err(PauseError::NotStarted);
        }
        self.vcpus.control.pause()
    }

    /// Releases the vCPUs held by [`Vm::pause`].
    pub fn resume(&self) -> Result<(), PauseError> {
        self.vcpus.control.resume()
    }

    /// The VM's components that run on their own, in the order a snapshot
    /// pauses them (vCPUs, then devices with threads of their own: the
    /// vsock device); resumed in reverse (`component::resume_all`).
    pub fn pausable(&self) -> Vec<Box<dyn Pausable + '_>> {
        let mut out: Vec<Box<dyn Pausable + '_>> = vec![Box::new(RunningVcpus {
            set: &self.vcpus,
            started: self.started,
        })];
        if let Some(d) = self.bus.vsock.get() {
            out.push(Box::new(d.as_ref()));
        }
        out
    }

    /// Pauses the VM's devices that have threads of their own (`pausable`
    /// but the vCPUs), e.g. to read their state with the vCPUs running.
    pub fn pause_devices(&self) -> Result<(), crate::component::PauseFailed> {
        for d in self.pausable().iter().skip(1) {
            d.pause()?;
        }
        Ok(())
    }

    /// Releases what [`Vm::pause_devices`] held.
    pub fn resume_devices(&self) {
        for d in self.pausable().iter().skip(1).rev() {
            d.resume();
        }
    }

    /// Every component's state, gathered into one [`VmState`]. The VM must
    /// be paused with its devices (`pausable`); pending I/O exits are
    /// completed first (so saved RIPs are past the instruction). Guest
    /// memory is not part of it.
    pub fn save_state(&self) -> Result<VmState, VmStateError> {
        if !self.is_paused() {
            return Err(VmStateError::NotPaused);
        }
        // First: it is the check most likely to fail (devices not paused).
        let vsock = match self.bus.vsock.get() {
            Some(d) => Some(d.save()?),
            None => None,
        };
        let Ok(boot) = self.loaded.save();
        Ok(VmState {
            version: VMSTATE_VERSION,
            boot,
            memory_layout: self
                .ram
                .regions()
                .iter()
                .map(|r| MemoryRegionState {
                    guest_addr: r.guest_addr,
                    len: r.len as u64,
                })
                .collect(),
            vcpus: self.vcpus.save()?,
            kvm: self.vm.save()?,
            serial: self
                .bus
                .serial
                .save()
                .map_err(|e| VmStateError::Serial(e.to_string()))?,
            pv: self.bus.pv.save().map_err(VmStateError::Invalid)?,
            vsock,
        })
    }

    /// Time from the last [`Vm::resume`] until every vCPU it released was
    /// back on its way into KVM_RUN (None while some are still waking).
    pub fn last_resume_latency(&self) -> Option<std::time::Duration> {
        self.vcpus.control.last_resume_latency()
    }

    pub fn is_paused(&self) -> bool {
        self.vcpus.control.is_paused()
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

    /// Every vCPU's state as it is now (pending exits left pending); the
    /// VM must be paused.
    pub fn vcpu_states(&self) -> Result<Vec<VcpuState>, VmStateError> {
        self.vcpus.states()
    }

    /// Guest RAM and its host mappings.
    pub fn memory(&self) -> &GuestRam {
        &self.ram
    }

    /// The KVM VM fd (memslots, dirty logging, ...).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm.fd
    }

    /// The vCPU fds; lock one only while the VM is paused.
    pub fn vcpu_fds(&self) -> &[SharedVcpuFd] {
        &self.vcpus.fds
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// What was loaded and how it is entered.
    pub fn loaded_kernel(&self) -> &LoadedKernel {
        &self.loaded
    }

    /// Ends every idle wait now (for devices with something for the guest).
    pub fn wake_guest(&self) {
        self.vcpus.control.wake_waiters();
    }

    /// Attaches the virtio-vsock device that forwards `listener`'s
    /// connections to the guest. Call before [`Vm::start`]; the guest learns
    /// where it is from [`crate::devices::virtio::cmdline_word`] on its
    /// command line.
    pub fn attach_vsock(&mut self, listener: HostListener) -> Result<(), VmError> {
        let control = self.vcpus.control.clone();
        let device = VsockDevice::start(
            crate::devices::virtio::VSOCK_MMIO_BASE,
            &self.vm.fd,
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
        self.exit.clone().or_else(|| self.vcpus.control.exit())
    }

    /// Blocks until every vCPU has stopped; returns why.
    pub fn wait(&mut self) -> VmExit {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        let exit = if self.started {
            self.vcpus.control.wait_exited()
        } else {
            VmExit::Shutdown
        };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The guest is gone: a restore still loading (or stuck on a chunk
        // it could not load) lets go of guest RAM, so a device thread
        // blocked on it returns and can be stopped.
        if let Some(l) = self.ram.loader() {
            l.shutdown();
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
        VmStopper(self.vcpus.control.clone())
    }

    /// Stops the VM (if it still runs) and waits for it.
    pub fn shutdown(&mut self) -> VmExit {
        self.vcpus.control.request_stop(VmExit::Shutdown);
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

impl Vm {
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
    pub fn background_cpus(&self) -> Option<&snapvm_snapshot::CpuSet> {
        self.cpus.as_ref().and_then(|p| p.background.as_ref())
    }

    /// Guest RAM as the snapshot engine sees it: regions in memslot
    /// order (the order of a snapshot's image).
    pub fn snapshot_regions(&self) -> Vec<snapvm_snapshot::Region> {
        self.ram
            .regions()
            .iter()
            .map(|r| snapvm_snapshot::Region::new(r.guest_addr, r.host_addr as u64, r.len as u64))
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
