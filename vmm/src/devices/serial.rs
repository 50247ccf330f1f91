//! COM1: a 16550 UART from vm-superio, output to stdout or a file, input
//! from stdin (see [`super::stdin::StdinInput`]), interrupt on IRQ 4 via an
//! irqfd when the in-kernel irqchip is there.

use std::io::Write;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::component::Persist;

/// IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;

/// Raises the serial interrupt by writing an eventfd (an irqfd in KVM).
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

type Uart = Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

/// vm-superio's `SerialState` (COM1's 16550 registers and receive FIFO),
/// which has no serde support of its own: a remote derive of it, used as
/// `#[serde(with = "SerialStateDef")]`.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
pub struct SerialStateDef {
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

/// What a restored COM1 is built with besides its state.
pub struct SerialArgs {
    /// The interrupt eventfd (an irqfd on IRQ 4 with the in-kernel irqchip).
    pub irq: EventFd,
    /// Where its output goes.
    pub out: Box<dyn Write + Send>,
}

impl Persist for SerialDevice {
    type State = SerialState;
    type ConstructorArgs = SerialArgs;
    type Error = std::io::Error;

    fn save(&self) -> Result<SerialState, std::io::Error> {
        Ok(self.uart().state())
    }

    fn restore(args: SerialArgs, state: &SerialState) -> Result<SerialDevice, std::io::Error> {
        let uart = Serial::from_state(state, IrqTrigger(args.irq), NoEvents, args.out)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        Ok(SerialDevice {
            uart: Mutex::new(uart),
        })
    }
}

/// The COM1 device, shared by the vCPU threads and the event loop.
pub struct SerialDevice {
    uart: Mutex<Uart>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            uart: Mutex::new(Serial::new(IrqTrigger(irq), out)),
        }
    }

    fn uart(&self) -> std::sync::MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn read(&self, offset: u8) -> u8 {
        self.uart().read(offset)
    }

    pub fn write(&self, offset: u8, value: u8) {
        if let Err(e) = self.uart().write(offset, value) {
            tracing::debug!("serial write failed: {e:?}");
        }
    }

    /// Queues input bytes for the guest; returns how many fit in the FIFO.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart();
        let n = bytes.len().min(uart.fifo_capacity());
        match uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart().fifo_capacity()
    }

    pub fn flush(&self) {
        let _ = self.uart().writer_mut().flush();
    }
}

/// Output sink that flushes at every newline (and at shutdown), so the
/// console is readable live without a syscall per byte.
pub fn output_sink(spec: &str) -> std::io::Result<Box<dyn Write + Send>> {
    if spec == "stdout" {
        Ok(Box::new(std::io::LineWriter::new(std::io::stdout())))
    } else {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(spec)?;
        Ok(Box::new(std::io::LineWriter::new(file)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input() {
        let sink = Sink::default();
        let dev = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            dev.write(0, *b);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(dev.enqueue_input(b"x"), 1);
        // LSR data-ready, then the byte from RBR.
        assert_eq!(dev.read(5) & 1, 1);
        assert_eq!(dev.read(0), b'x');
    }

    #[test]
    fn saved_registers_and_fifo_come_back() {
        let dev = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(Sink::default()));
        dev.write(3, 0x83); // DLAB on
        dev.write(0, 12); // divisor low
        dev.write(3, 0x03); // 8N1
        dev.enqueue_input(b"ab");
        let state = dev.save().unwrap();
        let args = SerialArgs {
            irq: EventFd::new(0).unwrap(),
            out: Box::new(Sink::default()),
        };
        let back = SerialDevice::restore(args, &state).unwrap();
        assert_eq!(back.save().unwrap(), state);
        assert_eq!(back.read(0), b'a');
    }
}
