//! The vsock device thread and the MMIO window the vCPUs see.
//!
//! A dedicated thread (not the shared event-manager loop) owns the queues:
//! it runs an epoll loop over the queue-notify ioeventfd, the host
//! listener and every host connection, so the per-request path is
//! ioeventfd -> this thread -> guest memory, with no lock shared with
//! unrelated devices and no loop timeout in the way.
//!
//! Clients are never turned away for being early: until the guest's driver
//! sets the device up, the listener is not watched, so connections wait in
//! its backlog (a line is logged if that lasts [`NOTICE_AFTER`]), and the
//! backend holds connections the guest refuses before it serves any
//! (backend.rs).

use snapvm_snapshot::sync::lock;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::backend::{Backend, Broken, GUEST_CID, RETRY_INTERVAL, TOKEN_CONN_BASE};
use super::host::HostListener;
use super::state::{ResetEvent, VsockState};
use crate::component::{Pausable, PauseFailed, Persist};
use crate::devices::virtio::mmio::{
    MmioEvent, MmioTransport, F_RING_EVENT_IDX, F_VERSION_1, REG_QUEUE_NOTIFY,
};

mod worker;
pub use worker::process_queues;
use worker::Worker;

pub const DEVICE_ID_VSOCK: u32 = 19;
const QUEUE_SIZE: u16 = 256;
/// The event queue only ever carries transport resets.
const EVENT_QUEUE_SIZE: u16 = 8;

const TOKEN_STOP: u64 = 0;
const TOKEN_NOTIFY: u64 = 1;
const TOKEN_CONTROL: u64 = 2;
const TOKEN_LISTENER: u64 = 3;
const TOKEN_PAUSE: u64 = 4;
const TOKEN_RETRY: u64 = 5;
const TOKEN_NOTICE: u64 = 6;

/// How long clients may wait for a guest that has not set up its vsock
/// device before a line says so.
pub const NOTICE_AFTER: Duration = Duration::from_secs(5);

/// How long [`VsockDevice::pause`] waits for the thread. It only has to
/// finish one round over the queues, so this is a "the thread is stuck"
/// bound, not a latency.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("virtio-vsock: {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("virtio-vsock: cannot register the queue-notify ioeventfd: {0}")]
    Ioevent(kvm_ioctls::Error),
    #[error("virtio-vsock: the device thread did not pause within {0:?}")]
    PauseTimeout(Duration),
    #[error("virtio-vsock: device state can only be read while the device is paused")]
    NotPaused,
    #[error("virtio-vsock: cannot restore: {0}")]
    BadState(String),
}

/// As [`io`], for the errno errors of vmm-sys-util.
fn sys(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> VsockError {
    move |e| io(what)(std::io::Error::from_raw_os_error(e.errno()))
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> VsockError {
    move |source| VsockError::Io { what, source }
}

/// State shared by the vCPUs (register accesses) and the device thread.
struct Shared {
    transport: Mutex<MmioTransport>,
    /// Written by a vCPU when the driver activates or resets the device.
    control: EventFd,
    stop: EventFd,
    stopping: AtomicBool,
    /// Written by [`VsockDevice::pause`] to get the thread out of epoll.
    pause_evt: EventFd,
    pause: Mutex<PauseState>,
    /// Signals `pause` changes both ways (parked, released, exited).
    pause_cv: Condvar,
    /// The backend's next host port, kept current by the thread so the
    /// state can be read without it.
    next_port: AtomicU32,
}

#[derive(Default)]
struct PauseState {
    /// Set by pause(), cleared by resume().
    requested: bool,
    /// The thread is parked: it touches neither guest memory nor queues.
    parked: bool,
    /// The thread has returned (stopped, or failed): as good as parked.
    exited: bool,
    /// The thread is in (or about to enter) epoll_wait, touching nothing;
    /// when it returns it parks before anything else if `requested`.
    idle: bool,
}

impl PauseState {
    fn held(&self) -> bool {
        self.parked || self.exited || self.idle
    }
}

/// The device as the MMIO bus sees it.
pub struct VsockDevice {
    base: u64,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for VsockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VsockDevice@{:#x}", self.base)
    }
}

/// Marks the thread exited however it returns (including a panic), so a
/// pause() never waits for a thread that is gone.
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        lock(&self.0.pause).exited = true;
        self.0.pause_cv.notify_all();
    }
}

/// What a restored vsock device is built with besides its state.
pub struct VsockArgs {
    /// Its MMIO window.
    pub base: u64,
    pub vm_fd: std::sync::Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    /// Where host connections come from; without one the device still
    /// serves the guest, but no host connection can reach it.
    pub listener: Option<HostListener>,
    /// Ends the guest's idle wait.
    pub wake: Box<dyn Fn() + Send>,
}

impl Persist for VsockDevice {
    type State = VsockState;
    type ConstructorArgs = VsockArgs;
    type Error = VsockError;

    /// Only while paused, so the queue positions are those of the guest
    /// memory captured in the same pause.
    fn save(&self) -> Result<VsockState, VsockError> {
        if !self.is_paused() {
            return Err(VsockError::NotPaused);
        }
        Ok(VsockState {
            transport: lock(&self.shared.transport).save(),
            guest_cid: GUEST_CID,
            next_host_port: self.shared.next_port.load(Ordering::Relaxed),
        })
    }

    /// Re-creates a saved device on a restored VM: same window, same
    /// ioeventfd, queues at their saved positions, no connections. The
    /// guest is sent a transport reset so it drops the streams it had;
    /// until it has taken it no packet goes to RX.
    fn restore(args: VsockArgs, state: &VsockState) -> Result<VsockDevice, VsockError> {
        Self::spawn(
            args.base,
            &args.vm_fd,
            args.mem,
            args.listener,
            args.wake,
            Some(state),
        )
    }
}

impl Pausable for VsockDevice {
    fn name(&self) -> &'static str {
        "the vsock device"
    }

    fn pause(&self) -> Result<(), PauseFailed> {
        VsockDevice::pause(self).map_err(|e| PauseFailed::new("the vsock device", e))
    }

    fn resume(&self) {
        VsockDevice::resume(self)
    }

    fn is_paused(&self) -> bool {
        VsockDevice::is_paused(self)
    }
}

impl VsockDevice {
    /// Creates the device at `base`, registers its queue-notify ioeventfd
    /// with KVM and starts its thread. `wake` ends the guest's idle wait.
    pub fn start(
        base: u64,
        vm_fd: &VmFd,
        mem: GuestMemoryMmap,
        listener: HostListener,
        wake: Box<dyn Fn() + Send>,
    ) -> Result<VsockDevice, VsockError> {
        Self::spawn(base, vm_fd, mem, Some(listener), wake, None)
    }

    pub(crate) fn new_transport() -> MmioTransport {
        let mut config = Vec::new();
        config.extend_from_slice(&GUEST_CID.to_le_bytes());
        MmioTransport::new(
            DEVICE_ID_VSOCK,
            F_VERSION_1 | F_RING_EVENT_IDX,
            &[QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE],
            config,
        )
    }

    /// A transport in the saved state (checked: the state is untrusted).
    pub fn transport_from_state(state: &VsockState) -> Result<MmioTransport, VsockError> {
        if state.guest_cid != GUEST_CID {
            // The backend addresses the guest by this constant.
            return Err(VsockError::BadState(format!(
                "guest CID {} (this build uses {GUEST_CID})",
                state.guest_cid
            )));
        }
        let mut transport = Self::new_transport();
        transport
            .restore(&state.transport)
            .map_err(|e| VsockError::BadState(e.to_string()))?;
        Ok(transport)
    }

    fn spawn(
        base: u64,
        vm_fd: &VmFd,
        mem: GuestMemoryMmap,
        listener: Option<HostListener>,
        wake: Box<dyn Fn() + Send>,
        saved: Option<&VsockState>,
    ) -> Result<VsockDevice, VsockError> {
        let transport = match saved {
            Some(state) => Self::transport_from_state(state)?,
            None => Self::new_transport(),
        };
        let active = transport.driver_ok();
        let backend_port = saved.map(|state| state.next_host_port);
        let shared = Arc::new(Shared {
            transport: Mutex::new(transport),
            control: EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?,
            stop: EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?,
            stopping: AtomicBool::new(false),
            pause_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?,
            pause: Mutex::new(PauseState::default()),
            pause_cv: Condvar::new(),
            next_port: AtomicU32::new(0),
        });
        let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?;
        // Any write to QueueNotify lands here, in the kernel: no exit to
        // userspace on the guest's notification path.
        vm_fd
            .register_ioevent(
                &notify,
                &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                NoDatamatch,
            )
            .map_err(VsockError::Ioevent)?;
        let epoll = Arc::new(Epoll::new().map_err(io("epoll"))?);
        let add = |fd: i32, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(shared.stop.as_raw_fd(), TOKEN_STOP).map_err(io("epoll"))?;
        add(notify.as_raw_fd(), TOKEN_NOTIFY).map_err(io("epoll"))?;
        add(shared.control.as_raw_fd(), TOKEN_CONTROL).map_err(io("epoll"))?;
        add(shared.pause_evt.as_raw_fd(), TOKEN_PAUSE).map_err(io("epoll"))?;
        let retry = TimerFd::new().map_err(sys("timerfd"))?;
        let mut notice = TimerFd::new().map_err(sys("timerfd"))?;
        add(retry.as_raw_fd(), TOKEN_RETRY).map_err(io("epoll"))?;
        add(notice.as_raw_fd(), TOKEN_NOTICE).map_err(io("epoll"))?;
        // Until the driver is up, clients wait in the listen backlog.
        let listening = match &listener {
            Some(l) if active => {
                add(l.as_raw_fd(), TOKEN_LISTENER).map_err(io("epoll"))?;
                true
            }
            Some(_) => {
                notice.reset(NOTICE_AFTER, None).map_err(sys("timerfd"))?;
                false
            }
            None => false,
        };
        let mut backend = Backend::new(Some(epoll.clone()));
        if let Some(port) = backend_port {
            backend.set_next_port(port);
        }
        shared
            .next_port
            .store(backend.next_port(), Ordering::Relaxed);
        let worker = Worker {
            shared: shared.clone(),
            mem,
            listener,
            notify,
            backend,
            epoll,
            wake,
            active,
            listening,
            retry,
            retry_armed: false,
            notice,
            broken: false,
            // A restored, live device owes the guest a transport reset:
            // the streams it knows about died with the old process.
            reset: if saved.is_some() && active {
                ResetEvent::Pending
            } else {
                ResetEvent::Done
            },
        };
        let thread = std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || {
                let _exit = ExitGuard(worker.shared.clone());
                worker.run()
            })
            .map_err(io("cannot spawn the device thread"))?;
        Ok(VsockDevice {
            base,
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn contains(&self, addr: u64) -> bool {
        (self.base..self.base + super::super::MMIO_WINDOW).contains(&addr)
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        lock(&self.shared.transport).read(addr - self.base, data);
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        let event = lock(&self.shared.transport).write(addr - self.base, data);
        if event != MmioEvent::None {
            if let Err(e) = self.shared.control.write(1) {
                tracing::error!("virtio-vsock: cannot signal the device thread: {e}");
            }
        }
    }

    /// Returns once the device thread is parked between packets: from then
    /// until [`VsockDevice::resume`] it reads and writes neither guest
    /// memory nor queue state (host sockets keep queueing in the kernel).
    /// Idempotent; immediate if the thread has exited.
    pub fn pause(&self) -> Result<(), VsockError> {
        let mut p = lock(&self.shared.pause);
        p.requested = true;
        if p.held() {
            return Ok(());
        }
        if let Err(e) = self.shared.pause_evt.write(1) {
            p.requested = false;
            return Err(VsockError::Io {
                what: "cannot signal the device thread",
                source: e,
            });
        }
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while !p.held() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Do not leave the thread to park later behind our back.
                p.requested = false;
                return Err(VsockError::PauseTimeout(PAUSE_TIMEOUT));
            }
            p = match self.shared.pause_cv.wait_timeout(p, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        Ok(())
    }

    /// Releases a thread held by [`VsockDevice::pause`] (no-op otherwise).
    pub fn resume(&self) {
        lock(&self.shared.pause).requested = false;
        self.shared.pause_cv.notify_all();
    }

    /// Whether the thread is held (or gone) after a pause().
    pub fn is_paused(&self) -> bool {
        let p = lock(&self.shared.pause);
        p.requested && p.held()
    }

    /// Keeps the device thread on the guest's CPUs (`--cpus`).
    pub fn pin_thread(&self, p: &crate::placement::CpuPlacement) {
        if let Some(t) = lock(&self.thread).as_ref() {
            p.pin_guest_thread("the vsock device thread", t);
        }
    }

    /// Stops the device thread (idempotent).
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        {
            // Under the lock, so a thread about to wait cannot miss it.
            let _p = lock(&self.shared.pause);
            self.shared.pause_cv.notify_all();
        }
        let _ = self.shared.stop.write(1);
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = handle {
            let _ = t.join();
        }
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        self.stop();
    }
}
