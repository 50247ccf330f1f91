//! The snapvm guest kernel. Ring 0 is assembly only (boot, gdt, idt,
//! paging); everything else is Rust running in ring 3.

#[macro_use]
pub mod serial;

pub mod bench_mode;
pub mod boot;
pub mod cmdline;
pub mod entry;
pub mod gdt;
pub mod heap;
pub mod idt;
pub mod kv_server;
pub mod mem;
pub mod modes;
pub mod paging;
pub mod port;
pub mod probe;
pub mod pv;
pub mod scribble;
pub mod smp;
pub mod start_info;
pub mod tsc;
pub mod virtio;
