//! Just enough of the i8042 keyboard controller for `reboot=k`: a write of
//! 0xfe (pulse reset line) to the command port is a reboot request, which
//! snapvm treats as a poweroff with status 0.

pub const DATA_PORT: u16 = 0x60;
pub const COMMAND_PORT: u16 = 0x64;
const CMD_RESET_CPU: u8 = 0xfe;

/// True if this write asks for a CPU reset.
pub fn is_reset(port: u16, value: u8) -> bool {
    port == COMMAND_PORT && value == CMD_RESET_CPU
}

/// Reads: status 0 (no data, input buffer empty), data 0.
pub fn read(_port: u16) -> u8 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset() {
        assert!(is_reset(0x64, 0xfe));
        assert!(!is_reset(0x60, 0xfe));
        assert!(!is_reset(0x64, 0xaa));
    }
}
