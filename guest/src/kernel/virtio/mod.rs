//! virtio over virtio-mmio, polled from ring 3: no interrupts, the driver
//! looks at the used rings itself.

pub mod mmio;
pub mod queue;
pub mod vsock;

use super::cmdline::{parse_u64, Cmdline};

/// The register window named by `virtio_mmio.device=SIZE@BASE[:IRQ]` (the
/// Linux syntax snapvm appends to our command line).
pub fn find_device(cmdline: &Cmdline) -> Option<u64> {
    let value = cmdline.get("virtio_mmio.device")?;
    let (_, rest) = value.split_once('@')?;
    let base = rest.split(':').next()?;
    parse_u64(base)
}
