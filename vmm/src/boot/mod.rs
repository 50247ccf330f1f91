//! Boot protocols: what the loader leaves in guest memory and the register
//! state vCPU 0 starts in.

pub mod gdt;
pub mod linux;
pub mod paging;
pub mod pvh;

/// How the kernel expects to be entered; applied to vCPU 0 by vcpu.rs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EntryState {
    /// PVH: 32-bit protected mode, flat segments, paging off,
    /// EBX = `start_info`, EIP = `entry`.
    Pvh32 { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode on identity tables at `cr3`,
    /// RSI = `boot_params`, RIP = `entry`.
    Linux64 {
        entry: u64,
        boot_params: u64,
        cr3: u64,
    },
}

/// How application processors come up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApStartup {
    /// snapvm's paravirtual path: APs wait until the guest writes
    /// `abi::PORT_START_APS`, then start in the PVH 32-bit state.
    Paravirtual,
    /// INIT/SIPI through the in-kernel LAPIC (Linux).
    InitSipi,
}
