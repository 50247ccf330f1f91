//! End-to-end tests: each starts the real `snapvm` binary (and, where it
//! says so, QEMU or a real Linux kernel) and checks what a user would see.

mod api;
mod bench_mode;
mod bench_tool;
mod cli_errors;
mod early_connect;
mod guest_boot;
mod hugetlb;
mod incremental;
mod kv;
mod linux_boot;
mod pause_resume;
mod qemu_boot;
mod reliability;
mod restore_chain;
mod snapshot;
mod snapshot_bench;
