//! The vsock device thread and the MMIO window the vCPUs see.
//!
//! A dedicated thread (not the shared event-manager loop) owns the queues:
//! it runs an epoll loop over the queue-notify ioeventfd, the host
//! listener and every host connection, so the per-request path is
//! ioeventfd -> this thread -> guest memory, with no lock shared with
//! unrelated devices and no loop timeout in the way.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{Backend, Broken, GUEST_CID, TOKEN_CONN_BASE};
use super::host::HostListener;
use crate::devices::virtio::mmio::{
    MmioEvent, MmioTransport, F_RING_EVENT_IDX, F_VERSION_1, REG_QUEUE_NOTIFY,
};

pub const DEVICE_ID_VSOCK: u32 = 19;
const QUEUE_SIZE: u16 = 256;

const TOKEN_STOP: u64 = 0;
const TOKEN_NOTIFY: u64 = 1;
const TOKEN_CONTROL: u64 = 2;
const TOKEN_LISTENER: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("virtio-vsock: {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("virtio-vsock: cannot register the queue-notify ioeventfd: {0}")]
    Ioevent(kvm_ioctls::Error),
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

fn lock(m: &Mutex<MmioTransport>) -> MutexGuard<'_, MmioTransport> {
    // A panic elsewhere must not take the device down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        let mut config = Vec::new();
        config.extend_from_slice(&GUEST_CID.to_le_bytes());
        let transport = MmioTransport::new(
            DEVICE_ID_VSOCK,
            F_VERSION_1 | F_RING_EVENT_IDX,
            &[QUEUE_SIZE, QUEUE_SIZE, 8],
            config,
        );
        let shared = Arc::new(Shared {
            transport: Mutex::new(transport),
            control: EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?,
            stop: EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?,
            stopping: AtomicBool::new(false),
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
        add(listener.as_raw_fd(), TOKEN_LISTENER).map_err(io("epoll"))?;
        let worker = Worker {
            shared: shared.clone(),
            mem,
            listener,
            notify,
            backend: Backend::new(Some(epoll.clone())),
            epoll,
            wake,
            active: false,
            broken: false,
        };
        let thread = std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || worker.run())
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

    /// Stops the device thread (idempotent).
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Release);
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

struct Worker {
    shared: Arc<Shared>,
    mem: GuestMemoryMmap,
    listener: HostListener,
    notify: EventFd,
    backend: Backend,
    epoll: Arc<Epoll>,
    wake: Box<dyn Fn() + Send>,
    active: bool,
    broken: bool,
}

impl Worker {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 256];
        while !self.shared.stopping.load(Ordering::Acquire) {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-vsock: epoll failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => return,
                    TOKEN_NOTIFY => {
                        let _ = self.notify.read();
                    }
                    TOKEN_CONTROL => {
                        let _ = self.shared.control.read();
                        self.control();
                    }
                    TOKEN_LISTENER => self.accept(),
                    token => {
                        let port = token.saturating_sub(TOKEN_CONN_BASE) as u32;
                        self.backend.socket_event(port, ev.event_set());
                    }
                }
            }
            self.process();
        }
    }

    /// The driver activated or reset the device.
    fn control(&mut self) {
        let ok = lock(&self.shared.transport).driver_ok();
        if !ok && self.active {
            tracing::info!("virtio-vsock: reset by the guest");
            self.backend.reset();
            self.broken = false;
        }
        self.active = ok;
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok(Some(stream)) => {
                    if !self.active || self.broken {
                        // Nobody to forward to: closing tells the client.
                        continue;
                    }
                    if let Err(e) = self.backend.add_host_stream(stream) {
                        tracing::warn!("virtio-vsock: cannot watch a connection: {e}");
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    // EMFILE and friends: keep serving the others.
                    tracing::warn!("virtio-vsock: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn process(&mut self) {
        if !self.active || self.broken {
            return;
        }
        let result = {
            let mut t = lock(&self.shared.transport);
            process_queues(&mut self.backend, &self.mem, &mut t)
        };
        match result {
            Ok(true) => (self.wake)(),
            Ok(false) => {}
            Err(e) => {
                tracing::error!("{e}; device stopped");
                self.broken = true;
                self.backend.reset();
            }
        }
    }
}

/// One round of TX then RX; true if the guest has new used buffers.
pub fn process_queues(
    backend: &mut Backend,
    mem: &GuestMemoryMmap,
    t: &mut MmioTransport,
) -> Result<bool, Broken> {
    let [rxq, txq, ..] = t.queues.as_mut_slice() else {
        return Ok(false);
    };
    let mut used = false;
    if txq.ready() {
        used |= backend.process_tx(mem, txq)?;
    }
    if rxq.ready() {
        used |= backend.process_rx(mem, rxq)?;
    }
    Ok(used)
}
