//! snapvm-guest: the freestanding guest kernel (see `kernel/`).
#![no_std]
#![no_main]

extern crate alloc;

#[macro_use]
mod kernel;

/// The prebuilt `core` references this symbol; nothing unwinds here
/// (panic = "abort").
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
