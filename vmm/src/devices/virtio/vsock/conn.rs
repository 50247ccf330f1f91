//! One host connection forwarded as a vsock stream: the host socket plus
//! the credit accounting of both directions (virtio spec §5.10.6.3).

use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::time::Instant;

use super::host::HostStream;

/// Bytes of guest→host data we buffer per connection while the host socket
/// is slow; advertised to the guest as our `buf_alloc`, so a guest that
/// respects credit can never make us buffer more.
pub const BUF_ALLOC: u32 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// OP_REQUEST queued or sent, waiting for OP_RESPONSE.
    Connecting,
    Established,
}

pub struct HostConn {
    pub stream: HostStream,
    pub state: State,
    // Host -> guest.
    /// The guest's receive buffer and how much of it it consumed.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    pub rx_cnt: Wrapping<u32>,
    /// The socket may have data (edge-triggered: cleared on WouldBlock).
    pub readable: bool,
    /// The host side hit EOF or an error; the guest must be told once.
    pub host_closed: bool,
    /// Epoll reported a hang-up or error: read to EOF, since the FIN
    /// behind a short read raises no further edge.
    pub hang_up_seen: bool,
    // Guest -> host.
    pub pending_out: Vec<u8>,
    pub writable: bool,
    /// Bytes written to the host socket, reported to the guest.
    pub fwd_cnt: Wrapping<u32>,
    pub last_fwd_sent: Wrapping<u32>,
    // Control packets owed to the guest.
    pub need_request: bool,
    pub need_credit_update: bool,
    /// Close once `pending_out` is flushed (the guest reset or shut down).
    pub close_after_flush: bool,
    /// Reply OP_RST when closing (the guest shut down, it waits for it).
    pub rst_on_close: bool,
    /// In the backend's ready queue.
    pub queued: bool,
    /// When the client connected: bounds how long a connection the guest
    /// refused is held (`backend::HOLD_LIMIT`).
    pub accepted_at: Instant,
    /// Refused by a guest that serves nobody yet: offered again by
    /// `Backend::retry_held`.
    pub held: bool,
}

impl HostConn {
    pub fn new(stream: HostStream) -> HostConn {
        HostConn {
            stream,
            state: State::Connecting,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            readable: true,
            host_closed: false,
            hang_up_seen: false,
            pending_out: Vec::new(),
            writable: true,
            fwd_cnt: Wrapping(0),
            last_fwd_sent: Wrapping(0),
            need_request: true,
            need_credit_update: false,
            close_after_flush: false,
            rst_on_close: false,
            queued: false,
            accepted_at: Instant::now(),
            held: false,
        }
    }

    /// Bytes the guest can still take from us.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether this connection has something for the guest right now.
    pub fn wants_rx(&self) -> bool {
        if self.close_after_flush {
            return false;
        }
        self.need_request
            || self.need_credit_update
            || (self.state == State::Established
                && (self.host_closed || (self.readable && self.peer_credit() > 0)))
    }

    /// Writes guest data to the socket, buffering what it does not take.
    /// Err means the socket is gone.
    pub fn send_to_host(&mut self, data: &[u8]) -> io::Result<()> {
        let mut data = data;
        if self.pending_out.is_empty() && self.writable {
            let n = write_some(&mut self.stream, data, &mut self.writable)?;
            self.fwd_cnt += Wrapping(n as u32);
            data = &data[n..];
        }
        self.pending_out.extend_from_slice(data);
        Ok(())
    }

    /// Flushes buffered guest data after EPOLLOUT.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.pending_out.is_empty() || !self.writable {
            return Ok(());
        }
        let n = write_some(&mut self.stream, &self.pending_out, &mut self.writable)?;
        self.pending_out.drain(..n);
        self.fwd_cnt += Wrapping(n as u32);
        Ok(())
    }

    /// Whether the guest should hear about our progress: half the buffer
    /// was consumed since it last did, so it never stalls on credit.
    pub fn credit_update_due(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_sent).0 >= BUF_ALLOC / 2
    }

    /// Reads at most `buf.len()` bytes; Ok(0) with `readable` cleared
    /// means nothing to read now, Ok(0) with `host_closed` set means EOF.
    ///
    /// A short read also clears `readable`: a stream socket returns less
    /// than asked only when its receive queue ran dry (epoll(7)), and data
    /// arriving after that raises a new edge. Without this every request
    /// cost a second recv that only returned EAGAIN (half of the device
    /// thread's recv calls under redis-benchmark). Not after a hang-up:
    /// the EOF waiting behind the data raises no new edge.
    pub fn read_host(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Ok(0) => {
                    self.host_closed = true;
                    self.readable = false;
                    return Ok(0);
                }
                Ok(n) => {
                    if n < buf.len() && !self.hang_up_seen {
                        self.readable = false;
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn write_some(stream: &mut HostStream, mut data: &[u8], writable: &mut bool) -> io::Result<usize> {
    let mut total = 0;
    while !data.is_empty() {
        match stream.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                total += n;
                data = &data[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *writable = false;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}
