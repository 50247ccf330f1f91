//! virtio-vsock (device ID 19, virtio spec 1.1 §5.10) over virtio-mmio:
//! each host connection accepted on `--kv-listen` becomes one vsock stream
//! to the guest's KV port.

pub mod backend;
pub mod conn;
pub mod device;
pub mod host;
pub mod packet;
pub mod state;

#[cfg(test)]
mod tests;

pub use device::process_queues;
pub use device::{VsockArgs, VsockDevice, VsockError};
pub use host::{HostListener, ListenAddr};
pub use state::VsockState;
