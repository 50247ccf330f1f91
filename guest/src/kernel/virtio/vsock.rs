//! virtio-vsock driver (device ID 19): device setup and packet I/O. The
//! stream logic lives with its user (`kernel/kv_server.rs`).

use super::mmio::{self, Mmio};
use super::queue::{NoMemory, VirtQueue};

pub const DEVICE_ID: u32 = 19;
pub const HDR_LEN: usize = 44;
const QUEUE_SIZE: u16 = 256;
const BUF_SIZE: usize = 4096;
/// Largest payload of one packet we send or receive.
pub const MAX_PAYLOAD: usize = BUF_SIZE - HDR_LEN;

pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const HOST_CID: u64 = 2;
/// `virtio_vsock_event.id` of a transport reset (§5.10.6.6): every
/// connection is gone (e.g. the VM was restored from a snapshot).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// `struct virtio_vsock_event { le32 id; }`.
const EVENT_LEN: usize = 4;
const EVENT_QUEUE_SIZE: u16 = 8;

#[derive(Clone, Copy, Debug, Default)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    fn encode(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Header {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

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
        if len >= HDR_LEN {
            let hdr = Header::decode(&buf[..HDR_LEN]);
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
        h.encode(&mut buf[..HDR_LEN]);
        buf[HDR_LEN..HDR_LEN + payload.len()].copy_from_slice(payload);
        self.tx.push(id, HDR_LEN + payload.len());
        true
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
