//! virtio devices on the virtio-mmio transport.

pub mod mmio;
pub mod vsock;

/// Where the vsock device's register window lives (inside the MMIO hole).
pub const VSOCK_MMIO_BASE: u64 = crate::layout::VIRTIO_MMIO_BASE;
/// One 4 KiB window per device.
pub const MMIO_WINDOW: u64 = 0x1000;

/// The kernel command line word that tells the guest (our kernel, or
/// Linux) where the device is: `size@base:irq`.
pub fn cmdline_word() -> String {
    format!(
        "virtio_mmio.device=4K@{:#x}:{}",
        VSOCK_MMIO_BASE,
        crate::layout::VIRTIO_MMIO_IRQ
    )
}
