//! COM1 console (16550 UART) and the `print!`/`println!` macros.
//!
//! Every register access is a VM exit (from ring 3 under PVM about 50-70 µs,
//! as the hypervisor emulates the trapped instruction), so the UART is
//! driven with as few accesses as possible: poll LSR until the transmitter
//! is empty (THRE; with FIFOs on, the whole 16-byte FIFO is then free),
//! then write up to 16 bytes before polling again. Lines end in a bare
//! `\n` so the output greps cleanly.

use core::fmt::{self, Write};

use snapvm_guest::abi::PORT_COM1;
use spin::mutex::SpinMutex;

use super::port::{inb, outb};

const REG_DATA: u16 = PORT_COM1;
const REG_IER: u16 = PORT_COM1 + 1;
const REG_FCR: u16 = PORT_COM1 + 2;
const REG_LCR: u16 = PORT_COM1 + 3;
const REG_MCR: u16 = PORT_COM1 + 4;
const REG_LSR: u16 = PORT_COM1 + 5;
const LSR_THRE: u8 = 1 << 5;
/// Transmit FIFO depth of a 16550A.
const TX_FIFO: u8 = 16;
/// LSR reads all ones when nothing decodes the port; don't spin on that.
const LSR_ABSENT: u8 = 0xff;

pub struct Serial {
    /// Bytes we may still write before polling LSR again.
    room: u8,
}

impl Serial {
    /// 115200 8N1, FIFOs on, no interrupts (we poll).
    pub fn init() {
        outb(REG_IER, 0x00);
        outb(REG_LCR, 0x80); // DLAB: next two writes set the divisor
        outb(REG_DATA, 0x01); // divisor 1 = 115200 baud
        outb(REG_IER, 0x00);
        outb(REG_LCR, 0x03); // 8 bits, no parity, 1 stop bit
        outb(REG_FCR, 0x07); // enable and clear FIFOs
        outb(REG_MCR, 0x03); // DTR | RTS
    }

    pub const fn new() -> Self {
        Self { room: 0 }
    }

    fn put(&mut self, byte: u8) {
        while self.room == 0 {
            let lsr = inb(REG_LSR);
            if lsr & LSR_THRE != 0 || lsr == LSR_ABSENT {
                self.room = TX_FIFO;
            } else {
                core::hint::spin_loop();
            }
        }
        outb(REG_DATA, byte);
        self.room -= 1;
    }
}

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(|byte| self.put(byte));
        Ok(())
    }
}

/// Serialises whole `print!` calls so lines from several CPUs don't mix.
static CONSOLE: SpinMutex<Serial> = SpinMutex::new(Serial::new());

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    // Writing to the UART cannot fail.
    let _ = CONSOLE.lock().write_fmt(args);
}

/// Prints without taking the console lock: for the panic handler, which
/// may run while this CPU (or a dead one) holds it.
pub fn print_unlocked(args: fmt::Arguments) {
    let _ = Serial::new().write_fmt(args);
}

#[allow(unused_macros)] // part of the console API, not every build prints without a newline
macro_rules! print {
    ($($arg:tt)*) => ($crate::kernel::serial::_print(format_args!($($arg)*)));
}

macro_rules! println {
    () => ($crate::kernel::serial::_print(format_args!("\n")));
    ($($arg:tt)*) => ($crate::kernel::serial::_print(format_args!("{}\n", format_args!($($arg)*))));
}
