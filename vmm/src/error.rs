//! The VMM's error types for building, running and saving a VM.
//!
//! They live apart from the modules that raise them so that the builder,
//! the VM, the VM state and the vCPU state code can all name them without
//! importing each other.

use crate::devices::virtio::vsock::VsockError;
use crate::kvm_device::KvmDeviceError;
use crate::loader::LoadError;
use crate::memory::MemoryError;
use crate::vcpu::VcpuError;
use crate::vcpu_control::PauseError;

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    KvmDevice(#[from] KvmDeviceError),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot open serial output {path}: {source}")]
    Serial {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the VM was already started")]
    AlreadyStarted,
    #[error("{0}")]
    Pause(#[from] PauseError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("a vsock device is already attached")]
    VsockAttached,
}

/// Errors capturing, encoding, decoding or restoring VM state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("VM state can only be captured while the VM is paused")]
    NotPaused,
    #[error("VM state: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {what}: {source}")]
    VcpuKvm {
        index: usize,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM accepted only {set} of {total} MSRs (first refused: {refused:#x})")]
    Msrs {
        index: usize,
        set: usize,
        total: usize,
        refused: u32,
    },
    #[error(
        "vCPU {index}: completing the pending exit with immediate_exit gave another exit ({exit})"
    )]
    PendingExit { index: usize, exit: String },
    #[error("cannot build a KVM structure: {0:?}")]
    Fam(vmm_sys_util::fam::Error),
    #[error("VM state blob is truncated: {len} bytes, need at least {need}")]
    Truncated { len: usize, need: usize },
    #[error("VM state blob has bad magic {0:02x?}")]
    BadMagic([u8; 8]),
    #[error("VM state version {found} is not supported (this build reads {expected})")]
    Version { found: u32, expected: u32 },
    #[error("cannot decode the VM state: {0}")]
    Decode(String),
    #[error("cannot encode the VM state: {0}")]
    Encode(String),
    #[error("invalid VM state: {0}")]
    Invalid(String),
    #[error("guest memory does not match the saved layout: {0}")]
    Layout(String),
    #[error("cannot save this VM: {0}")]
    Unsupported(&'static str),
    #[error("cannot restore the serial port: {0}")]
    Serial(String),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}
