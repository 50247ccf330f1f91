//! Device state: COM1 registers and the paravirtual ports.

use serde::{Deserialize, Serialize};
use snapvm_guest::abi;
use vm_superio::serial::SerialState;

use crate::devices::pv_ports::PvPorts;

/// COM1's 16550 registers and receive FIFO (vm-superio's `SerialState`,
/// which has no serde support of its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialSnapshot {
    fn from(s: &SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The paravirtual port block: facts the guest read at boot (kept as they
/// were, so the restored guest's view stays consistent) and the address it
/// registered its probe block at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvPortsState {
    pub cpu_count: u32,
    pub tsc_khz: u32,
    /// Guest-physical address of the ProbeBlock (0 = not registered).
    pub probe_addr: u64,
}

impl PvPortsState {
    pub fn save(pv: &PvPorts) -> Self {
        PvPortsState {
            cpu_count: pv.read(abi::PORT_CPU_COUNT),
            tsc_khz: pv.read(abi::PORT_TSC_KHZ),
            probe_addr: pv.probe_addr(),
        }
    }

    /// A PvPorts device in this state.
    pub fn restore(&self) -> Result<PvPorts, String> {
        let pv = PvPorts::new(self.cpu_count, self.tsc_khz);
        if self.probe_addr != 0 {
            // The guest registers it with a 32-bit port write.
            let addr = u32::try_from(self.probe_addr)
                .map_err(|_| format!("probe address {:#x} above 4 GiB", self.probe_addr))?;
            pv.write(abi::PORT_PROBE_ADDR, addr);
        }
        Ok(pv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pv_round_trip() {
        let pv = PvPorts::new(3, 2_500_000);
        pv.write(abi::PORT_PROBE_ADDR, 0x20_0000);
        let s = PvPortsState::save(&pv);
        assert_eq!(
            s,
            PvPortsState {
                cpu_count: 3,
                tsc_khz: 2_500_000,
                probe_addr: 0x20_0000
            }
        );
        assert_eq!(PvPortsState::save(&s.restore().unwrap()), s);
    }

    #[test]
    fn serial_round_trip() {
        let st = SerialState {
            scratch: 7,
            in_buffer: vec![1, 2, 3],
            ..SerialState::default()
        };
        assert_eq!(SerialState::from(&SerialSnapshot::from(&st)), st);
    }
}
