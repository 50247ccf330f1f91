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
pub mod schedule;
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

/// Panics unwind (so the snapshot engine can turn a panicking copier into
/// a rolled-back snapshot), but anywhere else a panic means a bug in a
/// thread the VM depends on: a vCPU or device thread that silently died
/// would leave a hung VM. Installs a hook that prints the panic, then
/// aborts the process. Every program that runs a VM installs it first
/// (`snapvm`, and snapvm-bench's in-process drivers).
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        if !snapvm_snapshot::recover::recovers_panics_here() {
            std::process::abort();
        }
    }));
}
