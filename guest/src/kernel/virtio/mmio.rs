//! The virtio-mmio v2 register window (virtio spec 1.1 §4.2.2). Every
//! access except QueueNotify is a VM exit to the VMM, so these are used
//! at setup only; QueueNotify is caught in the host kernel (ioeventfd).

use core::ptr::{read_volatile, write_volatile};

pub const REG_MAGIC: usize = 0x000;
pub const REG_VERSION: usize = 0x004;
pub const REG_DEVICE_ID: usize = 0x008;
pub const REG_DEVICE_FEATURES: usize = 0x010;
pub const REG_DEVICE_FEATURES_SEL: usize = 0x014;
pub const REG_DRIVER_FEATURES: usize = 0x020;
pub const REG_DRIVER_FEATURES_SEL: usize = 0x024;
pub const REG_QUEUE_SEL: usize = 0x030;
pub const REG_QUEUE_NUM_MAX: usize = 0x034;
pub const REG_QUEUE_NUM: usize = 0x038;
pub const REG_QUEUE_READY: usize = 0x044;
pub const REG_QUEUE_NOTIFY: usize = 0x050;
pub const REG_STATUS: usize = 0x070;
pub const REG_QUEUE_DESC_LOW: usize = 0x080;
pub const REG_QUEUE_DESC_HIGH: usize = 0x084;
pub const REG_QUEUE_DRIVER_LOW: usize = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: usize = 0x094;
pub const REG_QUEUE_DEVICE_LOW: usize = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: usize = 0x0a4;
pub const REG_CONFIG: usize = 0x100;

pub const MAGIC: u32 = 0x7472_6976;
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;

/// Feature bits, as (word, bit) of the 64-bit feature set.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

#[derive(Clone, Copy)]
pub struct Mmio {
    base: usize,
}

impl Mmio {
    /// # Safety
    /// `base` must be an identity-mapped, uncached virtio-mmio window of
    /// at least 4 KiB that nothing else uses.
    pub unsafe fn new(base: u64) -> Mmio {
        Mmio {
            base: base as usize,
        }
    }

    pub fn read(&self, reg: usize) -> u32 {
        // SAFETY: inside the window `new` was promised; MMIO needs volatile.
        unsafe { read_volatile((self.base + reg) as *const u32) }
    }

    pub fn write(&self, reg: usize, value: u32) {
        // SAFETY: as for `read`.
        unsafe { write_volatile((self.base + reg) as *mut u32, value) }
    }

    pub fn write_addr(&self, low: usize, high: usize, addr: u64) {
        self.write(low, addr as u32);
        self.write(high, (addr >> 32) as u32);
    }

    pub fn notify_ptr(&self) -> *mut u32 {
        (self.base + REG_QUEUE_NOTIFY) as *mut u32
    }
}
