//! The paravirtual port block of `snapvm_guest::abi`: what each access
//! means for the VMM. Decoding lives here; the vCPU loop acts on the result.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use snapvm_guest::abi;

use crate::component::Persist;

/// Idle wait when the guest passes 0.
pub const DEFAULT_WAIT: Duration = Duration::from_millis(10);

/// What a write to a PV port asks the vCPU loop to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvAction {
    None,
    Poweroff(u8),
    IdleWait(Duration),
    Exception,
    StartAps(u64),
}

/// Read-only facts and guest-registered addresses.
#[derive(Debug)]
pub struct PvPorts {
    cpu_count: u32,
    tsc_khz: u32,
    probe_addr: AtomicU64,
}

impl PvPorts {
    pub fn new(cpu_count: u32, tsc_khz: u32) -> Self {
        PvPorts {
            cpu_count,
            tsc_khz,
            probe_addr: AtomicU64::new(0),
        }
    }

    pub fn handles(port: u16) -> bool {
        (abi::PV_PORT_BASE..abi::PV_PORT_BASE + 0x20).contains(&port)
    }

    /// Guest-physical address of the guest's ProbeBlock (0 = none yet).
    pub fn probe_addr(&self) -> u64 {
        self.probe_addr.load(Ordering::Acquire)
    }

    pub fn read(&self, port: u16) -> u32 {
        match port {
            abi::PORT_SIGNATURE => abi::SIGNATURE,
            abi::PORT_CPU_COUNT => self.cpu_count,
            abi::PORT_TSC_KHZ => self.tsc_khz,
            _ => {
                tracing::debug!("read of write-only or unknown PV port {port:#x}");
                u32::MAX
            }
        }
    }

    pub fn write(&self, port: u16, value: u32) -> PvAction {
        match port {
            abi::PORT_POWEROFF => {
                let status = u8::try_from(value).unwrap_or_else(|_| {
                    tracing::warn!("guest poweroff status {value} out of range, using 255");
                    255
                });
                PvAction::Poweroff(status)
            }
            abi::PORT_WAIT => PvAction::IdleWait(if value == 0 {
                DEFAULT_WAIT
            } else {
                Duration::from_micros(u64::from(value))
            }),
            abi::PORT_EXCEPTION => PvAction::Exception,
            abi::PORT_START_APS => PvAction::StartAps(u64::from(value)),
            abi::PORT_PROBE_ADDR => {
                self.probe_addr.store(u64::from(value), Ordering::Release);
                PvAction::None
            }
            _ => {
                tracing::debug!("write {value:#x} to read-only or unknown PV port {port:#x}");
                PvAction::None
            }
        }
    }
}

/// The port block's state: facts the guest read at boot (kept as they
/// were, so the restored guest's view stays consistent) and the address it
/// registered its probe block at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvPortsState {
    pub cpu_count: u32,
    pub tsc_khz: u32,
    /// Guest-physical address of the ProbeBlock (0 = not registered).
    pub probe_addr: u64,
}

impl Persist for PvPorts {
    type State = PvPortsState;
    type ConstructorArgs = ();
    type Error = String;

    fn save(&self) -> Result<PvPortsState, String> {
        Ok(PvPortsState {
            cpu_count: self.cpu_count,
            tsc_khz: self.tsc_khz,
            probe_addr: self.probe_addr(),
        })
    }

    fn restore((): (), state: &PvPortsState) -> Result<PvPorts, String> {
        let pv = PvPorts::new(state.cpu_count, state.tsc_khz);
        if state.probe_addr != 0 {
            // The guest registers it with a 32-bit port write.
            let addr = u32::try_from(state.probe_addr)
                .map_err(|_| format!("probe address {:#x} above 4 GiB", state.probe_addr))?;
            pv.write(abi::PORT_PROBE_ADDR, addr);
        }
        Ok(pv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip() {
        let pv = PvPorts::new(3, 2_500_000);
        pv.write(abi::PORT_PROBE_ADDR, 0x20_0000);
        let s = pv.save().unwrap();
        assert_eq!(
            s,
            PvPortsState {
                cpu_count: 3,
                tsc_khz: 2_500_000,
                probe_addr: 0x20_0000
            }
        );
        assert_eq!(PvPorts::restore((), &s).unwrap().save().unwrap(), s);
        let far = PvPortsState {
            probe_addr: 1 << 33,
            ..s
        };
        assert_eq!(
            PvPorts::restore((), &far).unwrap_err(),
            "probe address 0x200000000 above 4 GiB"
        );
    }

    #[test]
    fn ports() {
        let pv = PvPorts::new(2, 3000000);
        assert_eq!(pv.read(abi::PORT_SIGNATURE), u32::from_le_bytes(*b"SPVM"));
        assert_eq!(pv.read(abi::PORT_CPU_COUNT), 2);
        assert_eq!(pv.read(abi::PORT_TSC_KHZ), 3000000);
        assert_eq!(pv.write(abi::PORT_POWEROFF, 5), PvAction::Poweroff(5));
        assert_eq!(pv.write(abi::PORT_POWEROFF, 1000), PvAction::Poweroff(255));
        assert_eq!(
            pv.write(abi::PORT_WAIT, 0),
            PvAction::IdleWait(DEFAULT_WAIT)
        );
        assert_eq!(
            pv.write(abi::PORT_WAIT, 250),
            PvAction::IdleWait(Duration::from_micros(250))
        );
        assert_eq!(
            pv.write(abi::PORT_START_APS, 0x8000),
            PvAction::StartAps(0x8000)
        );
        assert_eq!(pv.probe_addr(), 0);
        pv.write(abi::PORT_PROBE_ADDR, 0x20_0000);
        assert_eq!(pv.probe_addr(), 0x20_0000);
        assert!(PvPorts::handles(abi::PORT_PROBE_ADDR));
        assert!(!PvPorts::handles(0x3f8));
    }
}
