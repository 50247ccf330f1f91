//! The snapvm guest: the pieces that build for the host too.
//!
//! `abi` is the contract with the VMM; `kv` is the key-value store logic; the kernel itself is the
//! `snapvm-guest` binary (src/main.rs), which only builds freestanding.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod abi;
pub mod kv;
