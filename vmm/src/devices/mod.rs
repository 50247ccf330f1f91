//! Devices: the port I/O bus the vCPU threads dispatch to, and the
//! event-manager loop thread that serves host-side events (stdin today,
//! virtio queues later).

pub mod i8042;
pub mod pv_ports;
pub mod serial;
pub mod stdin;
pub mod virtio;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use snapvm_guest::abi;

use self::pv_ports::{PvAction, PvPorts};
use self::serial::SerialDevice;

/// What a port write asks the vCPU loop to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoAction {
    None,
    Poweroff(u8),
    Reboot,
    IdleWait(Duration),
    Exception,
    StartAps(u64),
}

const COM1_END: u16 = abi::PORT_COM1 + 8;
/// POST diagnostic port; Linux writes it as an I/O delay.
const POST_PORT: u16 = 0x80;

/// Port I/O dispatch.
#[derive(Debug)]
pub struct IoBus {
    pub serial: Arc<SerialDevice>,
    pub pv: PvPorts,
    /// The virtio-vsock window, once attached (before the vCPUs run).
    pub vsock: OnceLock<Arc<virtio::vsock::VsockDevice>>,
}

impl IoBus {
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.vsock.get() {
            Some(d) if d.contains(addr) => d.mmio_read(addr, data),
            _ => {
                tracing::debug!("MMIO read at {addr:#x} ({} bytes): no device", data.len());
                data.fill(0);
            }
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        match self.vsock.get() {
            Some(d) if d.contains(addr) => d.mmio_write(addr, data),
            _ => tracing::debug!("MMIO write at {addr:#x}: {data:02x?}: no device"),
        }
    }
}

impl IoBus {
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            abi::PORT_COM1..COM1_END => {
                data.fill(0);
                data[0] = self.serial.read((port - abi::PORT_COM1) as u8);
            }
            p if PvPorts::handles(p) => {
                let v = self.pv.read(p).to_le_bytes();
                for (d, s) in data
                    .iter_mut()
                    .zip(v.iter().chain(std::iter::repeat(&0xff)))
                {
                    *d = *s;
                }
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT => {
                data.fill(0);
                data[0] = i8042::read(port);
            }
            _ => {
                tracing::debug!("read of unhandled port {port:#x} ({} bytes)", data.len());
                data.fill(0xff);
            }
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) -> IoAction {
        let first = data.first().copied().unwrap_or(0);
        match port {
            abi::PORT_COM1..COM1_END => {
                self.serial.write((port - abi::PORT_COM1) as u8, first);
                IoAction::None
            }
            p if PvPorts::handles(p) => {
                let mut v = [0u8; 4];
                for (d, s) in v.iter_mut().zip(data) {
                    *d = *s;
                }
                match self.pv.write(p, u32::from_le_bytes(v)) {
                    PvAction::None => IoAction::None,
                    PvAction::Poweroff(s) => IoAction::Poweroff(s),
                    PvAction::IdleWait(d) => IoAction::IdleWait(d),
                    PvAction::Exception => IoAction::Exception,
                    PvAction::StartAps(a) => IoAction::StartAps(a),
                }
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT => {
                if i8042::is_reset(port, first) {
                    IoAction::Reboot
                } else {
                    IoAction::None
                }
            }
            // The guest also reports its status to QEMU's debug-exit port
            // right next to the real poweroff; nothing to do here.
            abi::PORT_QEMU_DEBUG_EXIT | POST_PORT => IoAction::None,
            _ => {
                tracing::debug!("write to unhandled port {port:#x}: {data:02x?}");
                IoAction::None
            }
        }
    }
}

/// The device event loop thread.
pub struct EventLoop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the loop with `subscribers`.
    pub fn start(
        subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    ) -> std::io::Result<Self> {
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                // The timeout bounds how long a stop request waits.
                while !stop2.load(Ordering::Acquire) {
                    if let Err(e) = manager.run_with_timeout(50) {
                        tracing::error!("device event loop failed: {e:?}");
                        break;
                    }
                }
            })?;
        Ok(EventLoop {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn bus() -> IoBus {
        IoBus {
            serial: Arc::new(SerialDevice::new(
                EventFd::new(0).unwrap(),
                Box::new(std::io::sink()),
            )),
            pv: PvPorts::new(1, 0),
            vsock: OnceLock::new(),
        }
    }

    #[test]
    fn dispatch() {
        let b = bus();
        let mut d = [0u8; 4];
        b.read(abi::PORT_SIGNATURE, &mut d);
        assert_eq!(&d, b"SPVM");
        let mut d = [0u8; 2];
        b.read(0x1234, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        assert_eq!(
            b.write(abi::PORT_POWEROFF, &9u32.to_le_bytes()),
            IoAction::Poweroff(9)
        );
        assert_eq!(b.write(0x64, &[0xfe]), IoAction::Reboot);
        assert_eq!(b.write(0xf4, &[1]), IoAction::None);
    }
}
