//! The vsock device logic: guest TX packets to host sockets, host socket
//! data and control packets into guest RX buffers. No threads and no KVM
//! here, so it can be driven by hand in tests against crafted queues.
//!
//! Anything the guest gets wrong in the rings (indices, loops, lengths,
//! addresses) is an [`Broken`] error: the caller stops the device for good.
//! A guest that breaks the vsock protocol on one connection only loses that
//! connection.
//!
//! Early clients are not dropped: a connection the guest refuses (OP_RST to
//! our OP_REQUEST) before it has accepted any is held and offered again
//! every [`RETRY_INTERVAL`] for up to [`HOLD_LIMIT`] (its server may still
//! be starting), and a driver reset keeps the connections still waiting for
//! their answer and offers them to the new driver. (Before the driver is up
//! at all, the device thread leaves clients in the listen backlog.)

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::num::Wrapping;
use std::os::unix::io::AsRawFd;
use std::time::Duration;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::conn::{HostConn, State, BUF_ALLOC};
use super::host::HostStream;
use super::packet::*;

/// The guest's context id (what the config space says).
pub const GUEST_CID: u64 = 3;
/// The guest port host connections are forwarded to.
pub const KV_PORT: u32 = 6379;
/// Epoll data values below this are not connections.
pub const TOKEN_CONN_BASE: u64 = 16;
/// Largest packet payload we accept from the guest or put in one RX
/// buffer (Linux uses 64 KiB as well).
const MAX_PAYLOAD: usize = 64 * 1024;
/// RSTs owed for unknown ports; more are dropped (the guest is misbehaving).
const MAX_ORPHAN_RSTS: usize = 1024;
/// Host ports we number connections from (the guest only sees them).
const FIRST_HOST_PORT: u32 = 1024;
/// How long after its connect a client the guest refused, before the guest
/// served any, is still offered again.
pub const HOLD_LIMIT: Duration = Duration::from_secs(10);
/// Between two offers of a held connection.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// A guest mistake in the virtqueues: the device stops.
#[derive(Debug, thiserror::Error)]
#[error("virtio-vsock: {0}")]
pub struct Broken(pub String);

fn broken(what: impl std::fmt::Display) -> Broken {
    Broken(what.to_string())
}

pub struct Backend {
    conns: HashMap<u32, HostConn>,
    /// Ports that may have something for the guest, round robin.
    ready: VecDeque<u32>,
    /// (host port, guest port) pairs owed an OP_RST without a connection.
    orphan_rsts: VecDeque<(u32, u32)>,
    next_port: u32,
    epoll: Option<std::sync::Arc<Epoll>>,
    scratch: Vec<u8>,
    /// The guest accepted a connection since the driver (re)started: from
    /// then on a refusal is final.
    guest_listens: bool,
    /// The "holding connections" line was logged since the driver started.
    held_logged: bool,
}

impl Backend {
    /// `epoll` is where host sockets get registered (None in tests).
    pub fn new(epoll: Option<std::sync::Arc<Epoll>>) -> Backend {
        Backend {
            conns: HashMap::new(),
            ready: VecDeque::new(),
            orphan_rsts: VecDeque::new(),
            next_port: FIRST_HOST_PORT,
            epoll,
            scratch: vec![0; MAX_PAYLOAD],
            guest_listens: false,
            held_logged: false,
        }
    }

    /// The next host port to hand out (saved with the device state).
    pub fn next_port(&self) -> u32 {
        self.next_port
    }

    /// Continues port numbering from a saved device, clamped to the range
    /// host ports are numbered in.
    pub fn set_next_port(&mut self, port: u32) {
        self.next_port = port.clamp(FIRST_HOST_PORT, u32::MAX - 1);
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection (the device stopped for good); their
    /// sockets close.
    pub fn reset(&mut self) {
        self.conns.clear();
        self.ready.clear();
        self.orphan_rsts.clear();
        self.guest_listens = false;
        self.held_logged = false;
    }

    /// The driver reset the device: established streams are gone with the
    /// old driver, but connections still waiting for their answer are
    /// offered again once the new driver runs.
    pub fn driver_reset(&mut self) {
        self.conns
            .retain(|_, c| c.state == State::Connecting && !c.close_after_flush);
        self.ready.clear();
        self.orphan_rsts.clear();
        self.guest_listens = false;
        self.held_logged = false;
        let ports: Vec<u32> = self.conns.keys().copied().collect();
        for port in ports {
            if let Some(c) = self.conns.get_mut(&port) {
                c.need_request = true;
                c.held = false;
                c.queued = false;
            }
            self.mark_ready(port);
        }
    }

    /// Whether a refused connection waits to be offered again.
    pub fn has_held(&self) -> bool {
        self.conns.values().any(|c| c.held)
    }

    /// Offers every held connection to the guest again.
    pub fn retry_held(&mut self) {
        let ports: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| c.held)
            .map(|(p, _)| *p)
            .collect();
        for port in ports {
            if let Some(c) = self.conns.get_mut(&port) {
                c.held = false;
                c.need_request = true;
            }
            self.mark_ready(port);
        }
    }

    /// Whether RX work is waiting for guest buffers.
    pub fn has_rx_work(&self) -> bool {
        !self.ready.is_empty() || !self.orphan_rsts.is_empty()
    }

    /// Takes a freshly accepted host socket: it becomes a vsock stream to
    /// the guest's KV port.
    pub fn add_host_stream(&mut self, stream: HostStream) -> std::io::Result<u32> {
        let port = self.alloc_port();
        if let Some(epoll) = &self.epoll {
            let events =
                EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
            epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(events, TOKEN_CONN_BASE + u64::from(port)),
            )?;
        }
        self.conns.insert(port, HostConn::new(stream));
        self.mark_ready(port);
        Ok(port)
    }

    fn alloc_port(&mut self) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = if port == u32::MAX - 1 {
                FIRST_HOST_PORT
            } else {
                port + 1
            };
            if !self.conns.contains_key(&port) {
                return port;
            }
        }
    }

    fn mark_ready(&mut self, port: u32) {
        if let Some(c) = self.conns.get_mut(&port) {
            if !c.queued {
                c.queued = true;
                self.ready.push_back(port);
            }
        }
    }

    /// An epoll event for a connection socket.
    pub fn socket_event(&mut self, port: u32, events: EventSet) {
        let Some(c) = self.conns.get_mut(&port) else {
            return;
        };
        if events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            c.readable = true;
        }
        if events.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR) {
            c.hang_up_seen = true;
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            c.writable = true;
            if c.flush().is_err() {
                c.pending_out.clear();
                c.host_closed = true;
            }
            if c.credit_update_due() {
                c.need_credit_update = true;
            }
        }
        self.maybe_close(port);
        self.mark_ready(port);
    }

    /// Removes a connection the guest is done with once its data is out.
    fn maybe_close(&mut self, port: u32) {
        let Some(c) = self.conns.get(&port) else {
            return;
        };
        if c.close_after_flush && (c.pending_out.is_empty() || c.host_closed) {
            if c.rst_on_close {
                self.push_orphan_rst(port);
            }
            // Dropping the stream closes the socket, which also removes it
            // from the epoll set.
            self.conns.remove(&port);
        }
    }

    fn push_orphan_rst(&mut self, port: u32) {
        if self.orphan_rsts.len() < MAX_ORPHAN_RSTS {
            self.orphan_rsts.push_back((port, KV_PORT));
        }
    }

    /// Handles every packet the guest made available on TX. Returns whether
    /// any buffer was returned to the guest.
    pub fn process_tx(&mut self, mem: &GuestMemoryMmap, txq: &mut Queue) -> Result<bool, Broken> {
        let mut used = false;
        loop {
            let size = txq.size();
            let next = txq
                .iter(mem)
                .map_err(|e| broken(format!("TX ring: {e}")))?
                .next();
            let Some(chain) = next else {
                // EVENT_IDX: ask for a notification at the next add, then
                // re-check so nothing added meanwhile is missed.
                if txq
                    .enable_notification(mem)
                    .map_err(|e| broken(format!("TX ring: {e}")))?
                {
                    continue;
                }
                return Ok(used);
            };
            let head = chain.head_index();
            if head >= size {
                return Err(broken(format!("TX head index {head} >= queue size {size}")));
            }
            let mut reader = chain
                .reader(mem)
                .map_err(|e| broken(format!("TX descriptor chain {head}: {e}")))?;
            let total = reader.available_bytes();
            if !(HDR_LEN..=HDR_LEN + MAX_PAYLOAD).contains(&total) {
                return Err(broken(format!("TX packet of {total} bytes")));
            }
            let mut hdr = [0u8; HDR_LEN];
            reader
                .read_exact(&mut hdr)
                .map_err(|e| broken(format!("TX header: {e}")))?;
            let hdr = Header::decode(&hdr);
            let len = hdr.len as usize;
            if len > total - HDR_LEN {
                return Err(broken(format!(
                    "TX packet claims {len} bytes, has {}",
                    total - HDR_LEN
                )));
            }
            let mut payload = std::mem::take(&mut self.scratch);
            let read = reader.read_exact(&mut payload[..len]);
            if let Err(e) = read {
                self.scratch = payload;
                return Err(broken(format!("TX payload: {e}")));
            }
            self.handle_guest_packet(&hdr, &payload[..len]);
            self.scratch = payload;
            txq.add_used(mem, head, 0)
                .map_err(|e| broken(format!("TX used ring: {e}")))?;
            used = true;
        }
    }

    fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != GUEST_CID || hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            tracing::debug!("vsock: dropping packet {hdr:?}");
            return;
        }
        let port = hdr.dst_port;
        let Some(c) = self.conns.get_mut(&port) else {
            if hdr.op != OP_RST {
                // Includes guest-initiated OP_REQUEST: nothing listens here.
                if self.orphan_rsts.len() < MAX_ORPHAN_RSTS {
                    self.orphan_rsts.push_back((port, hdr.src_port));
                }
            }
            return;
        };
        if hdr.src_port != KV_PORT {
            return;
        }
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match hdr.op {
            OP_RESPONSE if c.state == State::Connecting => {
                c.state = State::Established;
                self.guest_listens = true;
            }
            OP_RW if c.state == State::Established && !c.close_after_flush => {
                if c.pending_out.len() + payload.len() > BUF_ALLOC as usize {
                    tracing::warn!("vsock: guest overran its credit on port {port}; resetting");
                    c.pending_out.clear();
                    c.close_after_flush = true;
                    c.rst_on_close = true;
                } else if c.send_to_host(payload).is_err() {
                    c.pending_out.clear();
                    c.host_closed = true;
                }
                if c.credit_update_due() {
                    c.need_credit_update = true;
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => c.need_credit_update = true,
            OP_SHUTDOWN => {
                c.close_after_flush = true;
                c.rst_on_close = true;
            }
            OP_RST
                if c.state == State::Connecting
                    && !self.guest_listens
                    && c.accepted_at.elapsed() < HOLD_LIMIT =>
            {
                // Its server may not listen yet: offer it again later.
                c.held = true;
                if !self.held_logged {
                    self.held_logged = true;
                    tracing::info!(
                        "virtio-vsock: the guest refused a connection on port {KV_PORT} before serving any; holding connections and offering them again for up to {} s",
                        HOLD_LIMIT.as_secs()
                    );
                }
            }
            OP_RST => {
                if c.state == State::Connecting && !self.guest_listens {
                    tracing::warn!(
                        "virtio-vsock: the guest did not accept a connection on port {KV_PORT} within {} s; closing it",
                        HOLD_LIMIT.as_secs()
                    );
                }
                c.close_after_flush = true;
                c.rst_on_close = false;
            }
            _ => {
                tracing::debug!("vsock: unexpected op {} on port {port}; resetting", hdr.op);
                c.pending_out.clear();
                c.close_after_flush = true;
                c.rst_on_close = true;
            }
        }
        self.maybe_close(port);
        self.mark_ready(port);
    }

    /// Fills guest RX buffers with owed control packets and host data.
    /// Returns whether any buffer was handed back to the guest.
    pub fn process_rx(&mut self, mem: &GuestMemoryMmap, rxq: &mut Queue) -> Result<bool, Broken> {
        let mut used = false;
        while self.has_rx_work() {
            let size = rxq.size();
            let next = rxq
                .iter(mem)
                .map_err(|e| broken(format!("RX ring: {e}")))?
                .next();
            let Some(chain) = next else {
                // Out of buffers: ask for a notification when the guest
                // refills, and re-check to close the race.
                if rxq
                    .enable_notification(mem)
                    .map_err(|e| broken(format!("RX ring: {e}")))?
                {
                    continue;
                }
                return Ok(used);
            };
            let head = chain.head_index();
            if head >= size {
                return Err(broken(format!("RX head index {head} >= queue size {size}")));
            }
            let mut writer = chain
                .writer(mem)
                .map_err(|e| broken(format!("RX descriptor chain {head}: {e}")))?;
            let room = writer.available_bytes();
            if room < HDR_LEN {
                return Err(broken(format!("RX buffer of {room} bytes")));
            }
            let room = (room - HDR_LEN).min(MAX_PAYLOAD);
            match self.next_rx_packet(room) {
                Some((hdr, len)) => {
                    writer
                        .write_all(&hdr.encode())
                        .and_then(|()| writer.write_all(&self.scratch[..len]))
                        .map_err(|e| broken(format!("RX write: {e}")))?;
                    rxq.add_used(mem, head, (HDR_LEN + len) as u32)
                        .map_err(|e| broken(format!("RX used ring: {e}")))?;
                    used = true;
                }
                None => {
                    // Nothing after all: give the buffer back unused.
                    rxq.go_to_previous_position();
                    break;
                }
            }
        }
        Ok(used)
    }

    /// The next packet for the guest (payload in `scratch`), if any.
    fn next_rx_packet(&mut self, room: usize) -> Option<(Header, usize)> {
        if let Some((src, dst)) = self.orphan_rsts.pop_front() {
            return Some((self.header(src, dst, OP_RST, 0, 0), 0));
        }
        while let Some(port) = self.ready.pop_front() {
            let Some(c) = self.conns.get_mut(&port) else {
                continue;
            };
            c.queued = false;
            let packet = build_packet(port, c, &mut self.scratch[..room]);
            let remove = c.host_closed && packet.is_some_and(|(h, _)| h.op == OP_RST);
            if remove {
                self.conns.remove(&port);
            } else if self.conns.get(&port).is_some_and(HostConn::wants_rx) {
                self.mark_ready(port);
            }
            if let Some((hdr, len)) = packet {
                return Some((hdr, len));
            }
        }
        None
    }

    fn header(&self, src_port: u32, dst_port: u32, op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: GUEST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        }
    }
}

/// One packet from connection `c` (host port `port`), payload written to
/// `buf`.
fn build_packet(port: u32, c: &mut HostConn, buf: &mut [u8]) -> Option<(Header, usize)> {
    let mut hdr = Header {
        src_cid: HOST_CID,
        dst_cid: GUEST_CID,
        src_port: port,
        dst_port: KV_PORT,
        len: 0,
        type_: TYPE_STREAM,
        op: 0,
        flags: 0,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: c.fwd_cnt.0,
    };
    if c.need_request {
        c.need_request = false;
        hdr.op = OP_REQUEST;
        return Some((hdr, 0));
    }
    if c.state != State::Established || c.close_after_flush {
        return None;
    }
    if c.readable && !c.host_closed {
        let want = buf.len().min(c.peer_credit() as usize);
        if want > 0 {
            match c.read_host(&mut buf[..want]) {
                Ok(0) => {}
                Ok(n) => {
                    c.rx_cnt += Wrapping(n as u32);
                    c.last_fwd_sent = c.fwd_cnt;
                    c.need_credit_update = false;
                    hdr.op = OP_RW;
                    hdr.len = n as u32;
                    return Some((hdr, n));
                }
                Err(_) => c.host_closed = true,
            }
        }
    }
    if c.need_credit_update {
        c.need_credit_update = false;
        c.last_fwd_sent = c.fwd_cnt;
        hdr.op = OP_CREDIT_UPDATE;
        return Some((hdr, 0));
    }
    if c.host_closed {
        // The client went away (EOF or error): the KV server has nobody to
        // answer, so reset rather than half-close.
        hdr.op = OP_RST;
        return Some((hdr, 0));
    }
    None
}
