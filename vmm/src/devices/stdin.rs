//! Feeds host stdin to COM1 when stdin is readable (an event-manager
//! subscriber), and wakes idle vCPUs so the guest sees the input promptly.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::serial::SerialDevice;
use crate::vcpu_control::VcpuControl;

pub struct StdinInput {
    serial: Arc<SerialDevice>,
    control: Arc<VcpuControl>,
}

impl StdinInput {
    pub fn new(serial: Arc<SerialDevice>, control: Arc<VcpuControl>) -> Self {
        StdinInput { serial, control }
    }
}

impl MutEventSubscriber for StdinInput {
    fn init(&mut self, ops: &mut EventOps) {
        let fd = std::io::stdin().as_raw_fd();
        // Regular files and /dev/null cannot be polled: no input then.
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            tracing::debug!("stdin is not pollable ({e:?}); serial input disabled");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // Never take more than the FIFO holds: what is left stays in the
        // pipe and is picked up on the next round (level-triggered).
        let room = self.serial.input_capacity().min(buf.len());
        if room == 0 {
            // The guest is not reading; back off instead of spinning.
            std::thread::sleep(std::time::Duration::from_millis(5));
            return;
        }
        // Read the fd directly: std's Stdin buffers, which would hide bytes
        // from epoll.
        // SAFETY: reads into a live buffer of at least `room` bytes.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), room) };
        match usize::try_from(n) {
            Err(_)
                if matches!(
                    std::io::Error::last_os_error().kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Ok(0) | Err(_) => {
                let _ = ops.remove(events);
            }
            Ok(n) => {
                self.serial.enqueue_input(&buf[..n]);
                self.control.wake_waiters();
            }
        }
    }
}
