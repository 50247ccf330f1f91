//! Shared harness for the end-to-end tests: find the real `snapvm` binary,
//! start it, watch what it prints, and make sure nothing outlives the test.

pub mod paths;
pub mod process;
pub mod qemu;
pub mod redis_cli;
pub mod snapvm;
