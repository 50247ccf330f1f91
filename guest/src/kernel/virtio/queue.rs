//! A split virtqueue, driver side (virtio spec 1.1 §2.6), with fixed
//! descriptor→buffer assignment: descriptor `i` always points at buffer
//! `i`, so handing a buffer to the device is one avail-ring entry.
//!
//! Notifications use VIRTIO_F_EVENT_IDX: the driver only writes
//! QueueNotify when the device asked for it (avail_event), so a busy device
//! is never notified. The driver never wants interrupts: it polls the used
//! ring.

use alloc::alloc::{alloc_zeroed, Layout};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use super::mmio::{self, Mmio};

const DESC_F_WRITE: u16 = 2;

#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

pub struct VirtQueue {
    index: u32,
    size: u16,
    desc: *mut Desc,
    /// flags, idx, ring[size], used_event
    avail: *mut u16,
    /// flags, idx, ring[size] of (id: u32, len: u32), avail_event
    used: *mut u8,
    buffers: *mut u8,
    buf_size: usize,
    /// Our copy of avail.idx (entries made available so far).
    avail_idx: u16,
    /// avail.idx at the last notification decision.
    published_idx: u16,
    last_used: u16,
    notify: *mut u32,
}

/// Allocation failed while setting a queue up.
#[derive(Debug)]
pub struct NoMemory;

fn alloc_pages(bytes: usize) -> Result<*mut u8, NoMemory> {
    let layout = Layout::from_size_align(bytes.max(1), 4096).map_err(|_| NoMemory)?;
    // SAFETY: the layout is non-zero sized.
    let p = unsafe { alloc_zeroed(layout) };
    if p.is_null() {
        Err(NoMemory)
    } else {
        Ok(p)
    }
}

impl VirtQueue {
    /// Allocates the rings and `size` buffers of `buf_size` bytes and
    /// registers them as queue `index`. Memory is identity-mapped, so
    /// pointers are guest-physical addresses. Never freed (the device
    /// lives as long as the kernel).
    pub fn new(
        dev: &Mmio,
        index: u32,
        size: u16,
        buf_size: usize,
        device_writable: bool,
    ) -> Result<VirtQueue, NoMemory> {
        let n = usize::from(size);
        let desc = alloc_pages(16 * n)?.cast::<Desc>();
        let avail = alloc_pages(6 + 2 * n)?.cast::<u16>();
        let used = alloc_pages(6 + 8 * n)?;
        let buffers = alloc_pages(buf_size * n)?;
        for i in 0..n {
            // SAFETY: i < size, inside the allocation above.
            unsafe {
                write_volatile(
                    desc.add(i),
                    Desc {
                        addr: buffers.add(i * buf_size) as u64,
                        len: buf_size as u32,
                        flags: if device_writable { DESC_F_WRITE } else { 0 },
                        next: 0,
                    },
                )
            };
        }
        dev.write(mmio::REG_QUEUE_SEL, index);
        dev.write(mmio::REG_QUEUE_NUM, u32::from(size));
        dev.write_addr(
            mmio::REG_QUEUE_DESC_LOW,
            mmio::REG_QUEUE_DESC_HIGH,
            desc as u64,
        );
        dev.write_addr(
            mmio::REG_QUEUE_DRIVER_LOW,
            mmio::REG_QUEUE_DRIVER_HIGH,
            avail as u64,
        );
        dev.write_addr(
            mmio::REG_QUEUE_DEVICE_LOW,
            mmio::REG_QUEUE_DEVICE_HIGH,
            used as u64,
        );
        dev.write(mmio::REG_QUEUE_READY, 1);
        Ok(VirtQueue {
            index,
            size,
            desc,
            avail,
            used,
            buffers,
            buf_size,
            avail_idx: 0,
            published_idx: 0,
            last_used: 0,
            notify: dev.notify_ptr(),
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Buffer `id` (< size).
    pub fn buffer(&mut self, id: u16) -> &mut [u8] {
        let id = usize::from(id % self.size);
        // SAFETY: inside the buffer allocation; the device does not own
        // this buffer while the driver looks at it (it is not available).
        unsafe {
            core::slice::from_raw_parts_mut(self.buffers.add(id * self.buf_size), self.buf_size)
        }
    }

    /// Makes buffer `id` available with `len` bytes (device-readable
    /// queues) or its full size (device-writable ones). Not visible to the
    /// device before [`VirtQueue::publish`].
    pub fn push(&mut self, id: u16, len: usize) {
        let id = id % self.size;
        // SAFETY: id < size; the descriptor is ours until published.
        unsafe {
            let d = self.desc.add(usize::from(id));
            write_volatile(&raw mut (*d).len, len.min(self.buf_size) as u32);
            let slot = self.avail.add(2 + usize::from(self.avail_idx % self.size));
            write_volatile(slot, id);
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes pushed buffers and notifies the device if it asked to be
    /// (EVENT_IDX): at most one notification per batch.
    pub fn publish(&mut self) {
        if self.avail_idx == self.published_idx {
            return;
        }
        let old = self.published_idx;
        let new = self.avail_idx;
        // Descriptors and ring entries before the index (release).
        fence(Ordering::Release);
        // SAFETY: avail.idx is the second u16 of the avail ring.
        unsafe { write_volatile(self.avail.add(1), new) };
        self.published_idx = new;
        // The index store must be visible before we read avail_event, or
        // we could miss the device's request (spec 2.6.7.2).
        fence(Ordering::SeqCst);
        // SAFETY: avail_event follows the used ring's `size` elements.
        let event =
            unsafe { read_volatile(self.used.add(4 + 8 * usize::from(self.size)).cast::<u16>()) };
        if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old) {
            // SAFETY: QueueNotify of our window; an ioeventfd in the host
            // kernel catches it.
            unsafe { write_volatile(self.notify, self.index) };
        }
    }

    /// Asks the device to wake us when it next returns a buffer, by
    /// setting used_event (EVENT_IDX) to the next used index we will read.
    /// The caller must fence (SeqCst) and look at [`VirtQueue::has_used`]
    /// again before it sleeps: the device may have returned one just
    /// before it saw the request. Left as is once awake, the mark is
    /// passed and the device does not wake a polling guest again.
    pub fn request_wake(&mut self) {
        // SAFETY: used_event follows the avail ring's `size` elements,
        // inside its allocation.
        unsafe { write_volatile(self.avail.add(2 + usize::from(self.size)), self.last_used) };
    }

    /// Whether the device has returned a buffer we have not taken yet.
    pub fn has_used(&self) -> bool {
        // SAFETY: used.idx is the second u16 of the used ring.
        let idx = unsafe { read_volatile(self.used.add(2).cast::<u16>()) };
        idx != self.last_used
    }

    /// The next buffer the device is done with: (id, bytes written).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: used.idx is the second u16 of the used ring.
        let idx = unsafe { read_volatile(self.used.add(2).cast::<u16>()) };
        if idx == self.last_used {
            return None;
        }
        // Entries are read only after the index (acquire).
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: slot < size, inside the used ring.
        let (id, len) = unsafe {
            let e = self.used.add(4 + 8 * slot);
            (
                read_volatile(e.cast::<u32>()),
                read_volatile(e.add(4).cast::<u32>()),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some(((id % u32::from(self.size)) as u16, len))
    }
}
