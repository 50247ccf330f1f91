//! virtio-vsock driver (device ID 19): device setup and packet I/O. The
//! stream logic lives with its user (`kernel/kv_server.rs`).

pub use snapvm_guest::vsock_wire::{
    Header, EVENT_LEN, EVENT_TRANSPORT_RESET, HDR_LEN, HOST_CID, OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, TYPE_STREAM,
};

use core::sync::atomic::{fence, Ordering};

use super::mmio::{self, Mmio};
use super::queue::{NoMemory, VirtQueue};

pub const DEVICE_ID: u32 = 19;
const QUEUE_SIZE: u16 = 256;
const BUF_SIZE: usize = 4096;
/// Largest payload of one packet we send or receive.
pub const MAX_PAYLOAD: usize = BUF_SIZE - HDR_LEN;
const EVENT_QUEUE_SIZE: u16 = 8;

#[derive(Debug)]
pub enum SetupError {
    NotVirtio,
    /// The window holds a virtio device of another type.
    #[allow(dead_code)] // printed through Debug
    WrongDevice(u32),
    FeaturesRefused,
    NoMemory,
}

impl From<NoMemory> for SetupError {
    fn from(_: NoMemory) -> Self {
        SetupError::NoMemory
    }
}

pub struct Vsock {
    pub guest_cid: u64,
    dev: Mmio,
    rx: VirtQueue,
    tx: VirtQueue,
    /// The event queue (2); None if the device offers none.
    ev: Option<VirtQueue>,
    /// TX buffers not owned by the device.
    tx_free: alloc::vec::Vec<u16>,
}

impl Vsock {
    /// Initialises the device at `base` (spec §3.1.1) and fills RX.
    ///
    /// # Safety
    /// `base` must be a virtio-mmio window as [`Mmio::new`] requires.
    pub unsafe fn new(base: u64) -> Result<Vsock, SetupError> {
        // SAFETY: forwarded from the caller.
        let dev = unsafe { Mmio::new(base) };
        if dev.read(mmio::REG_MAGIC) != mmio::MAGIC || dev.read(mmio::REG_VERSION) != 2 {
            return Err(SetupError::NotVirtio);
        }
        let id = dev.read(mmio::REG_DEVICE_ID);
        if id != DEVICE_ID {
            return Err(SetupError::WrongDevice(id));
        }
        dev.write(mmio::REG_STATUS, 0);
        let mut status = mmio::STATUS_ACKNOWLEDGE | mmio::STATUS_DRIVER;
        dev.write(mmio::REG_STATUS, status);
        dev.write(mmio::REG_DEVICE_FEATURES_SEL, 1);
        let high = u64::from(dev.read(mmio::REG_DEVICE_FEATURES));
        dev.write(mmio::REG_DEVICE_FEATURES_SEL, 0);
        let offered = (high << 32) | u64::from(dev.read(mmio::REG_DEVICE_FEATURES));
        let wanted = mmio::F_VERSION_1 | mmio::F_RING_EVENT_IDX;
        if offered & wanted != wanted {
            return Err(SetupError::FeaturesRefused);
        }
        dev.write(mmio::REG_DRIVER_FEATURES_SEL, 0);
        dev.write(mmio::REG_DRIVER_FEATURES, wanted as u32);
        dev.write(mmio::REG_DRIVER_FEATURES_SEL, 1);
        dev.write(mmio::REG_DRIVER_FEATURES, (wanted >> 32) as u32);
        status |= mmio::STATUS_FEATURES_OK;
        dev.write(mmio::REG_STATUS, status);
        if dev.read(mmio::REG_STATUS) & mmio::STATUS_FEATURES_OK == 0 {
            return Err(SetupError::FeaturesRefused);
        }
        let guest_cid = read_cid(&dev);
        dev.write(mmio::REG_QUEUE_SEL, 0);
        let size = QUEUE_SIZE.min(dev.read(mmio::REG_QUEUE_NUM_MAX) as u16);
        let mut rx = VirtQueue::new(&dev, 0, size, BUF_SIZE, true)?;
        let tx = VirtQueue::new(&dev, 1, size, BUF_SIZE, false)?;
        // The event queue carries transport resets: keep it stocked so the
        // device can always tell us (it cannot send one without a buffer).
        dev.write(mmio::REG_QUEUE_SEL, 2);
        let ev_size = EVENT_QUEUE_SIZE.min(dev.read(mmio::REG_QUEUE_NUM_MAX) as u16);
        let mut ev = if ev_size == 0 {
            None
        } else {
            Some(VirtQueue::new(&dev, 2, ev_size, EVENT_LEN, true)?)
        };
        for id in 0..rx.size() {
            rx.push(id, BUF_SIZE);
        }
        if let Some(ev) = &mut ev {
            for id in 0..ev.size() {
                ev.push(id, EVENT_LEN);
            }
        }
        let tx_free = (0..tx.size()).rev().collect();
        dev.write(mmio::REG_STATUS, status | mmio::STATUS_DRIVER_OK);
        rx.publish();
        if let Some(ev) = &mut ev {
            ev.publish();
        }
        Ok(Vsock {
            guest_cid,
            dev,
            rx,
            tx,
            ev,
            tx_free,
        })
    }

    /// The next event from the device, if any. Its buffer is posted again
    /// at the next [`Vsock::flush`]: after a transport reset the device
    /// holds RX back until then, so the caller must have dropped its
    /// connections by that time.
    pub fn recv_event(&mut self) -> Option<u32> {
        let ev = self.ev.as_mut()?;
        while let Some((id, len)) = ev.pop_used() {
            let buf = ev.buffer(id);
            let event = (len as usize >= EVENT_LEN)
                .then(|| u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]));
            ev.push(id, EVENT_LEN);
            if event.is_some() {
                return event;
            }
        }
        None
    }

    /// Reads the guest CID from config space again (it may change across
    /// a transport reset, spec §5.10.6.6).
    pub fn reread_cid(&mut self) {
        self.guest_cid = read_cid(&self.dev);
    }

    /// The next received packet, handed to `f` with its payload; the RX
    /// buffer is recycled (made available again at the next `flush`).
    /// Returns false when there was none.
    pub fn recv(&mut self, f: impl FnOnce(&Header, &[u8])) -> bool {
        let Some((id, len)) = self.rx.pop_used() else {
            return false;
        };
        let buf = self.rx.buffer(id);
        let len = (len as usize).min(buf.len());
        if let Some(hdr) = Header::from_prefix(&buf[..len]) {
            let payload_len = (hdr.len as usize).min(len - HDR_LEN);
            f(&hdr, &buf[HDR_LEN..HDR_LEN + payload_len]);
        }
        self.rx.push(id, BUF_SIZE);
        true
    }

    /// Takes back TX buffers the device has finished with.
    pub fn reclaim_tx(&mut self) {
        while let Some((id, _)) = self.tx.pop_used() {
            self.tx_free.push(id);
        }
    }

    pub fn tx_free(&self) -> usize {
        self.tx_free.len()
    }

    /// Queues one packet (payload at most [`MAX_PAYLOAD`]); false if no TX
    /// buffer is free. Visible to the device after [`Vsock::flush`].
    pub fn send(&mut self, hdr: &Header, payload: &[u8]) -> bool {
        let Some(id) = self.tx_free.pop() else {
            return false;
        };
        let payload = &payload[..payload.len().min(MAX_PAYLOAD)];
        let mut h = *hdr;
        h.len = payload.len() as u32;
        let buf = self.tx.buffer(id);
        buf[..HDR_LEN].copy_from_slice(&h.encode());
        buf[HDR_LEN..HDR_LEN + payload.len()].copy_from_slice(payload);
        self.tx.push(id, HDR_LEN + payload.len());
        true
    }

    /// Asks the device to wake us (see `VirtQueue::request_wake`) when a
    /// packet or an event arrives, or a TX buffer comes back while none
    /// is free; returns false if one already has, so the caller must not
    /// sleep. Call after [`Vsock::flush`].
    pub fn request_wake(&mut self) -> bool {
        self.rx.request_wake();
        if let Some(ev) = &mut self.ev {
            ev.request_wake();
        }
        let tx_starved = self.tx_free.is_empty();
        if tx_starved {
            self.tx.request_wake();
        }
        // Our used_event stores before the device's used.idx loads, as the
        // device orders its used.idx store before its used_event load: one
        // of the two sides sees the other (spec 2.7.10).
        fence(Ordering::SeqCst);
        let arrived = self.rx.has_used()
            || self.ev.as_ref().is_some_and(VirtQueue::has_used)
            || (tx_starved && self.tx.has_used());
        !arrived
    }

    /// Publishes queued TX packets and recycled RX buffers, notifying the
    /// device only where it asked to be.
    pub fn flush(&mut self) {
        self.tx.publish();
        self.rx.publish();
        if let Some(ev) = &mut self.ev {
            ev.publish();
        }
    }
}

/// `guest_cid` (le64) from the config space, as two 32-bit reads.
fn read_cid(dev: &Mmio) -> u64 {
    let low = u64::from(dev.read(mmio::REG_CONFIG));
    let high = u64::from(dev.read(mmio::REG_CONFIG + 4));
    low | (high << 32)
}
