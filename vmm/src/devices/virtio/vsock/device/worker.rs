//! The device thread: one epoll loop over the queue-notify ioeventfd, the
//! host listener, every host connection and the control events, handing
//! the queues to the backend; and `process_queues`, one round of it.

use super::*;

pub(super) struct Worker {
    pub(super) shared: Arc<Shared>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) listener: Option<HostListener>,
    pub(super) notify: EventFd,
    pub(super) backend: Backend,
    pub(super) epoll: Arc<Epoll>,
    pub(super) wake: Box<dyn Fn() + Send>,
    pub(super) active: bool,
    /// The listener is in the epoll set (only while the driver is up).
    pub(super) listening: bool,
    /// Fires when held connections are due to be offered again.
    pub(super) retry: TimerFd,
    pub(super) retry_armed: bool,
    /// Fires once if the driver is not up [`NOTICE_AFTER`] after start.
    pub(super) notice: TimerFd,
    pub(super) broken: bool,
    pub(super) reset: ResetEvent,
}

impl Worker {
    pub(super) fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 256];
        // A restored device has a reset to deliver before anything wakes it.
        self.process();
        while !self.shared.stopping.load(Ordering::Acquire) {
            // From here until epoll returns the thread touches nothing, so
            // a pause meanwhile needs no wake-up (the common, idle case).
            self.checkpoint(true);
            if self.shared.stopping.load(Ordering::Acquire) {
                return;
            }
            let wait = self.epoll.wait(-1, &mut events);
            self.checkpoint(false);
            let n = match wait {
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
                    TOKEN_PAUSE => {
                        let _ = self.shared.pause_evt.read();
                    }
                    TOKEN_RETRY => {
                        let _ = self.retry.wait();
                        self.retry_armed = false;
                        self.backend.retry_held();
                    }
                    TOKEN_NOTICE => {
                        let _ = self.notice.wait();
                        if !self.active {
                            tracing::warn!(
                                "virtio-vsock: the guest has not set up its vsock device {} s after start; clients wait until it does",
                                NOTICE_AFTER.as_secs()
                            );
                        }
                    }
                    token => {
                        let port = token.saturating_sub(TOKEN_CONN_BASE) as u32;
                        self.backend.socket_event(port, ev.event_set());
                    }
                }
            }
            // Events above only touch host sockets and backend state, so
            // parking here (not before them) loses no edge-triggered event;
            // the queues are handled on release.
            self.checkpoint(false);
            if self.shared.stopping.load(Ordering::Acquire) {
                return;
            }
            self.process();
        }
    }

    /// Holds the thread while a pause is requested, then records whether
    /// it is about to block in epoll (`idle`).
    fn checkpoint(&self, entering_epoll: bool) {
        let mut p = lock(&self.shared.pause);
        p.idle = false;
        if p.requested {
            p.parked = true;
            self.shared.pause_cv.notify_all();
            while p.requested && !self.shared.stopping.load(Ordering::Acquire) {
                p = self
                    .shared
                    .pause_cv
                    .wait(p)
                    .unwrap_or_else(|e| e.into_inner());
            }
            p.parked = false;
        }
        p.idle = entering_epoll;
    }

    /// The driver activated or reset the device.
    fn control(&mut self) {
        let ok = lock(&self.shared.transport).driver_ok();
        if !ok && self.active {
            tracing::info!("virtio-vsock: reset by the guest");
            self.backend.driver_reset();
            self.broken = false;
            // A driver that starts over has no old streams to drop.
            self.reset = ResetEvent::Done;
            self.watch_listener(false);
        }
        let activated = ok && !self.active;
        self.active = ok;
        if activated {
            self.watch_listener(true);
            // Whoever waited in the backlog is served now.
            self.accept();
        }
    }

    /// Adds the listener to the epoll set or takes it out.
    fn watch_listener(&mut self, on: bool) {
        let Some(l) = &self.listener else {
            return;
        };
        if on == self.listening {
            return;
        }
        let op = if on {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        match self.epoll.ctl(
            op,
            l.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        ) {
            Ok(()) => self.listening = on,
            Err(e) => tracing::warn!("virtio-vsock: cannot watch the listener: {e}"),
        }
    }

    /// Arms the retry timer while refused connections are held.
    fn arm_retry(&mut self) {
        if self.retry_armed || !self.backend.has_held() {
            return;
        }
        match self.retry.reset(RETRY_INTERVAL, None) {
            Ok(()) => self.retry_armed = true,
            Err(e) => tracing::warn!("virtio-vsock: cannot arm the retry timer: {e}"),
        }
    }

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
            if !self.active {
                // The driver is not up: clients wait in the backlog.
                return;
            }
            match listener.accept() {
                Ok(Some(stream)) => {
                    if self.broken {
                        // Nobody to forward to: closing tells the client.
                        continue;
                    }
                    if let Err(e) = self.backend.add_host_stream(stream) {
                        tracing::warn!("virtio-vsock: cannot watch a connection: {e}");
                    }
                    self.shared
                        .next_port
                        .store(self.backend.next_port(), Ordering::Relaxed);
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
            process_queues(&mut self.backend, &self.mem, &mut t, &mut self.reset)
        };
        self.arm_retry();
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

/// One round of events, TX then RX; true if the guest asked to hear about
/// the used buffers this round added.
///
/// The guest polls its rings and wants no interrupts, but before it
/// sleeps in the VMM (`PORT_WAIT`) it sets `used_event` of the queues it
/// waits on (VIRTIO_F_EVENT_IDX) and looks once more. Waking it only when
/// a used index crosses that mark keeps the wake (a futex call here, and a
/// stale wake-up that makes the guest's next sleep return at once) off
/// the per-request path while the guest is awake and polling.
/// RX waits while a transport reset is owed or unacknowledged.
pub fn process_queues(
    backend: &mut Backend,
    mem: &GuestMemoryMmap,
    t: &mut MmioTransport,
    reset: &mut ResetEvent,
) -> Result<bool, Broken> {
    let [rxq, txq, evq, ..] = t.queues.as_mut_slice() else {
        return Ok(false);
    };
    let ev_used = reset.advance(mem, evq)?;
    let tx_used = txq.ready() && backend.process_tx(mem, txq)?;
    let rx_used = rxq.ready() && !reset.blocks_rx() && backend.process_rx(mem, rxq)?;
    let mut wake = false;
    for (q, used) in [(evq, ev_used), (txq, tx_used), (rxq, rx_used)] {
        // Only after add_used: without EVENT_IDX this is always true.
        if used {
            wake |= q
                .needs_notification(mem)
                .map_err(|e| Broken(format!("used_event: {e}")))?;
        }
    }
    Ok(wake)
}
