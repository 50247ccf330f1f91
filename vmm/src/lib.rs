//! snapvm's virtual machine monitor: KVM VM and vCPUs, guest memory, boot,
//! devices, and the pause/resume primitive snapshots are built on.
//!
//! Entry points: [`builder::boot`] and [`builder::restore`] make a
//! [`vm::Vm`] (then [`vm::Vm::start`], [`vm::Vm::pause`] /
//! [`vm::Vm::resume`], [`vm::Vm::probe`], [`vm::Vm::wait`]); a run hands
//! it to its one owner ([`owner::run`]), which the API ([`api`]) and the
//! snapshot trigger ([`trigger`]) send requests to. See
//! docs/ARCHITECTURE.md for how data flows.

pub mod api;
pub mod bench_pause;
pub mod bench_snapshot;
pub mod boot;
pub mod builder;
pub mod cli;
pub mod component;
pub mod cpuid;
pub mod devices;
pub mod error;
pub mod exception_dump;
pub mod kvm_device;
pub mod kvm_vm;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod msr;
pub mod owner;
pub mod placement;
pub mod probe_gaps;
pub mod signals;
pub mod snapshotting;
pub mod trigger;
pub mod vcpu;
pub mod vcpu_control;
pub mod vcpu_set;
pub mod vcpu_state;
pub mod vm;
pub mod vmstate;

pub use memory::{GuestRam, HostRegion, PageBacking};
pub use vcpu_control::{PauseError, VmExit};
pub use vm::{ProbeError, Vm, VmConfig, VmError};
