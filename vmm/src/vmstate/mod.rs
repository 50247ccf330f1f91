//! VM state for snapshots: everything but guest memory, as plain data.
//!
//! [`VmState`] is the set of the components' saved states
//! (`component::Persist`: the KVM VM, the vCPUs, COM1, the PV ports, the
//! vsock device) plus the boot facts and the memory layout. `Vm::save_state`
//! gathers it while the VM is paused; the builder's restore path
//! (`builder::restore`) rebuilds a VM from it. This module encodes it into
//! the opaque blob the snapshot format stores ([`VmState::encode`] /
//! [`VmState::decode`]), and checks what it decodes; [`ram`] gives guest
//! memory for a restore; `vcpu_state` reads and writes one vCPU.

pub mod ram;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

pub use self::ram::{ram_from_copies, ram_from_mapped};
use crate::devices::pv_ports::PvPortsState;
use crate::devices::serial::SerialStateDef;
pub use crate::error::VmStateError;
pub use crate::kvm_vm::{IrqchipState, KvmVmState};
pub use crate::loader::BootState;
pub use crate::vcpu_set::VcpuSetState;
pub use crate::vcpu_state::VcpuState;

/// Version of [`VmState`]'s layout; bump on any change to these structs.
/// 2: the virtio-vsock device state.
/// 3: the vsock device wakes a sleeping guest only past the `used_event` it
///    set (`process_queues`); a version-2 guest never sets it, so it would
///    sleep through its replies' arrival (same layout, new contract).
pub const VMSTATE_VERSION: u32 = 3;

/// First bytes of an encoded state blob.
pub const VMSTATE_MAGIC: [u8; 8] = *b"SVMSTATE";

/// Upper bound for a decoded blob (guards allocations on garbage input).
const MAX_BLOB: u64 = 64 << 20;

/// One guest RAM region (KVM memslot `index`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    pub guest_addr: u64,
    pub len: u64,
}

/// Everything needed, besides guest memory, to resume a VM. (Its bincode
/// encoding is its fields in order, nested structs flat: grouping fields
/// into component states did not change a byte of version 3.)
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    pub boot: BootState,
    pub memory_layout: Vec<MemoryRegionState>,
    pub vcpus: VcpuSetState,
    pub kvm: KvmVmState,
    #[serde(with = "SerialStateDef")]
    pub serial: SerialState,
    pub pv: PvPortsState,
    /// The virtio-vsock device, if one was attached (its host connections
    /// are not saved: a restored guest gets a transport reset).
    pub vsock: Option<crate::devices::virtio::vsock::VsockState>,
}

fn codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(MAX_BLOB)
}

impl VmState {
    /// Encodes as `VMSTATE_MAGIC`, version (u32 LE), then the bincode body.
    /// (Integrity is the snapshot format's job: state.bin is checksummed.)
    pub fn encode(&self) -> Result<Vec<u8>, VmStateError> {
        use bincode::Options;
        let body = codec()
            .serialize(self)
            .map_err(|e| VmStateError::Encode(e.to_string()))?;
        let mut out = Vec::with_capacity(12 + body.len());
        out.extend_from_slice(&VMSTATE_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes and validates a blob from [`VmState::encode`]. Truncated,
    /// trailing or garbage input is refused with a clear error.
    pub fn decode(blob: &[u8]) -> Result<VmState, VmStateError> {
        use bincode::Options;
        const HEAD: usize = 12;
        if blob.len() < HEAD {
            return Err(VmStateError::Truncated {
                len: blob.len(),
                need: HEAD,
            });
        }
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&blob[..8]);
        if magic != VMSTATE_MAGIC {
            return Err(VmStateError::BadMagic(magic));
        }
        let mut v = [0u8; 4];
        v.copy_from_slice(&blob[8..12]);
        let version = u32::from_le_bytes(v);
        if version != VMSTATE_VERSION {
            return Err(VmStateError::Version {
                found: version,
                expected: VMSTATE_VERSION,
            });
        }
        let state: VmState = codec().deserialize(&blob[HEAD..]).map_err(|e| match *e {
            bincode::ErrorKind::Io(ref io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                VmStateError::Decode(format!("truncated body ({} bytes): {e}", blob.len() - HEAD))
            }
            _ => VmStateError::Decode(e.to_string()),
        })?;
        if state.version != version {
            return Err(VmStateError::Invalid(format!(
                "header version {version} but body version {}",
                state.version
            )));
        }
        state.validate()?;
        Ok(state)
    }

    /// Internal consistency checks (not the memory layout: see restore).
    pub fn validate(&self) -> Result<(), VmStateError> {
        let bad = |m: String| Err(VmStateError::Invalid(m));
        let n = self.vcpus.vcpus.len();
        if n == 0 || n > 255 {
            return bad(format!("{n} vCPUs"));
        }
        if self.vcpus.started.len() != n {
            return bad(format!(
                "{} started flags for {n} vCPUs",
                self.vcpus.started.len()
            ));
        }
        if !self.vcpus.started[0] {
            return bad("vCPU 0 is marked not started".into());
        }
        if self.pv.cpu_count as usize != n {
            return bad(format!(
                "PV ports report {} CPUs, state has {n}",
                self.pv.cpu_count
            ));
        }
        if self.memory_layout.is_empty() {
            return bad("no memory regions".into());
        }
        for r in &self.memory_layout {
            if r.len == 0 || r.guest_addr.checked_add(r.len).is_none() {
                return bad(format!(
                    "memory region {:#x}+{:#x} is empty or overflows",
                    r.guest_addr, r.len
                ));
            }
        }
        for (i, v) in self.vcpus.vcpus.iter().enumerate() {
            if v.lapic.is_some() != self.kvm.irqchip.is_some() {
                return bad(format!(
                    "vCPU {i}: LAPIC state without irqchip or vice versa"
                ));
            }
        }
        if self.serial.in_buffer.len() > 64 {
            return bad(format!(
                "serial FIFO holds {} bytes",
                self.serial.in_buffer.len()
            ));
        }
        Ok(())
    }
}
