//! The snapvm guest: the pieces that build for the host too.
//!
//! `abi` is the contract with the VMM; `vsock_wire` the virtio-vsock packet
//! format both ends speak; `kv` is the key-value store logic. The kernel
//! itself is the `snapvm-guest` binary (src/main.rs), which only builds
//! freestanding.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod abi;
pub mod kv;
pub mod vsock_wire;
