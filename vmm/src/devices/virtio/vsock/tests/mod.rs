//! Device tests on plain host memory, no KVM: `hostile.rs` feeds the
//! device logic crafted virtqueues a hostile guest could write, and
//! `driven.rs` drives the device through its MMIO transport as our guest
//! driver does (state save and restore, transport reset, guest wake-ups,
//! host sockets through a real epoll).

mod driven;
mod hostile;
