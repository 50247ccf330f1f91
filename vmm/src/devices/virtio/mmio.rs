//! The virtio-mmio v2 register file (virtio spec 1.1 §4.2.2): what the
//! guest driver reads and writes while it sets the device up.
//!
//! Only setup goes through here (every access is a userspace exit);
//! QueueNotify is caught in the kernel by an ioeventfd and never reaches
//! this code on the per-request path.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

pub const MAGIC: u32 = 0x7472_6976; // "virt"
pub const VERSION: u32 = 2;
pub const VENDOR_ID: u32 = 0x5350_564d; // "SPVM"

/// Register offsets.
pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

/// Device status bits (§2.1).
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 128;

/// Feature bits.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// What a register write means for the device owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioEvent {
    None,
    /// DRIVER_OK was set: the queues are live.
    Activated,
    /// Status was written 0: drop all device state.
    Reset,
}

/// Transport state of one virtio-mmio device.
pub struct MmioTransport {
    device_id: u32,
    device_features: u64,
    pub driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    pub status: u32,
    pub queues: Vec<Queue>,
    /// Device-specific configuration space, little endian.
    config: Vec<u8>,
    /// Bumped whenever `config` changes under the driver (§4.2.2).
    config_generation: u32,
}

/// One virtqueue as the transport knows it (virtio-queue's `QueueState`,
/// which has no serde support of its own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// Device positions: the next avail entry to take, the next used slot.
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The virtio-mmio register file of one device, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_features: u64,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    /// Always 0 today: the guest polls and the device raises no interrupts.
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
}

/// A saved transport that does not fit the device it is restored into.
#[derive(Debug, thiserror::Error)]
#[error("virtio-mmio state: {0}")]
pub struct BadTransportState(pub String);

impl MmioTransport {
    /// `queue_max` must be a power of two (virtio-queue checks it).
    pub fn new(device_id: u32, device_features: u64, queue_max: &[u16], config: Vec<u8>) -> Self {
        let queues = queue_max
            .iter()
            .filter_map(|&max| match Queue::new(max) {
                Ok(q) => Some(q),
                Err(e) => {
                    tracing::error!("virtio: bad queue size {max}: {e}");
                    None
                }
            })
            .collect();
        MmioTransport {
            device_id,
            device_features,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            queues,
            config,
            config_generation: 0,
        }
    }

    /// The register file and queue positions. Only meaningful while the
    /// device thread is paused (it moves the queue positions).
    pub fn save(&self) -> MmioTransportState {
        MmioTransportState {
            device_features: self.device_features,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: 0,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    /// Takes over a saved register file. The saved device must be this one
    /// (features, queue count and maximum sizes), and every queue must pass
    /// virtio-queue's checks (sizes, alignment): the state is untrusted.
    pub fn restore(&mut self, s: &MmioTransportState) -> Result<(), BadTransportState> {
        if s.device_features != self.device_features {
            return Err(BadTransportState(format!(
                "device features {:#x}, this device offers {:#x}",
                s.device_features, self.device_features
            )));
        }
        if s.driver_features & !self.device_features != 0 {
            return Err(BadTransportState(format!(
                "driver features {:#x} were never offered",
                s.driver_features
            )));
        }
        if s.queues.len() != self.queues.len() {
            return Err(BadTransportState(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                self.queues.len()
            )));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (saved, ours)) in s.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != ours.max_size() {
                return Err(BadTransportState(format!(
                    "queue {i}: max size {} saved, the device has {}",
                    saved.max_size,
                    ours.max_size()
                )));
            }
            let q = Queue::try_from(QueueState::from(*saved))
                .map_err(|e| BadTransportState(format!("queue {i}: {e}")))?;
            queues.push(q);
        }
        self.queues = queues;
        self.driver_features = s.driver_features;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.config_generation = s.config_generation;
        Ok(())
    }

    pub fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= REG_CONFIG {
            let start = (offset - REG_CONFIG) as usize;
            for (i, d) in data.iter_mut().enumerate() {
                *d = self.config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        let value: u32 = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device_id,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => 0,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        };
        for (d, s) in data.iter_mut().zip(value.to_le_bytes()) {
            *d = s;
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> MmioEvent {
        let mut bytes = [0u8; 4];
        for (d, s) in bytes.iter_mut().zip(data) {
            *d = *s;
        }
        let v = u32::from_le_bytes(bytes);
        // Queue layout may only change while the queue is not ready.
        let queue_settable = |t: &mut Self| t.selected().is_some_and(|q| !q.ready());
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return MmioEvent::None,
                };
                let mask = 0xffff_ffffu64 << shift;
                self.driver_features = (self.driver_features & !mask)
                    | ((u64::from(v) << shift) & self.device_features);
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if queue_settable(self) => {
                if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            REG_QUEUE_READY => {
                let event_idx = self.driver_features & F_RING_EVENT_IDX != 0;
                if let Some(q) = self.selected() {
                    q.set_event_idx(event_idx);
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_DESC_LOW..=REG_QUEUE_DEVICE_HIGH if queue_settable(self) => {
                if let Some(q) = self.selected() {
                    set_queue_address(q, offset, v);
                }
            }
            REG_INTERRUPT_ACK | REG_QUEUE_NOTIFY => {}
            REG_STATUS => {
                if v == 0 {
                    self.reset();
                    return MmioEvent::Reset;
                }
                let was_ok = self.driver_ok();
                if v & STATUS_FEATURES_OK != 0 && self.driver_features & F_VERSION_1 == 0 {
                    // A legacy driver: refuse FEATURES_OK (§3.1.1).
                    self.status = v & !STATUS_FEATURES_OK;
                    return MmioEvent::None;
                }
                self.status = v;
                if !was_ok && self.driver_ok() {
                    return MmioEvent::Activated;
                }
            }
            _ => tracing::debug!("virtio-mmio: ignored write {v:#x} to {offset:#x}"),
        }
        MmioEvent::None
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }
}

/// One half of a queue's descriptor / driver / device area address.
fn set_queue_address(q: &mut Queue, offset: u64, v: u32) {
    match offset {
        REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
        REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
        REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
        REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
        REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
        REG_QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(v)),
        _ => {}
    }
}
