//! The virtio-vsock packet header and constants: shared with the guest's
//! driver, defined once in `snapvm_guest::vsock_wire`.

pub use snapvm_guest::vsock_wire::*;
