//! Mode `kv`: the KV store served over virtio-vsock stream connections,
//! one polled main loop on the BSP.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use snapvm_guest::kv::{Clock, Connection, Store, StoreConfig};

use super::probe::Heartbeat;
use super::tsc::{self, rdtsc};
use super::virtio::vsock::{self, Header, Vsock};
use super::{pv, virtio};

pub const KV_PORT: u32 = 6379;
/// Our receive buffer per connection, advertised as buf_alloc: the host
/// never has more than this in flight towards an unprocessed connection.
const BUF_ALLOC: u32 = 256 * 1024;
/// Spin this long with nothing to do before sleeping in the VMM. Short:
/// a spinning vCPU holds a host core that the vsock thread and the clients
/// need on a 2-core host (docs/journal/2026-12-01-kv-spin.md compares
/// spin times). `kv_spin_us=N` on the command line overrides it.
const SPIN_US: u64 = 20;
/// Longest idle sleep. The device ends it as soon as it hands the guest
/// anything after `Vsock::request_wake` (and a wake that races with the
/// decision to sleep is kept, see `VcpuControl::idle_wait`), so this only
/// bounds how often an idle guest exits: 100 exits/s (~1 % of a core here)
/// instead of 1000 at 1 ms.
const IDLE_WAIT_US: u32 = 10_000;
/// Heap kept out of the store for buffers, rings and allocator slack.
const MIN_RESERVE: u64 = 64 << 20;

struct TscClock {
    tpus: u64,
}

impl Clock for TscClock {
    fn now_ticks(&self) -> u64 {
        rdtsc()
    }

    fn ticks_per_us(&self) -> u64 {
        self.tpus
    }
}

/// One vsock stream from the host.
struct Stream {
    kv: Connection,
    peer_port: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we sent.
    tx_cnt: u32,
    /// Bytes we received.
    rx_cnt: u32,
    /// fwd_cnt we last told the peer.
    fwd_reported: u32,
    /// Output was sent since the last feed: held-back input may run now.
    drained: bool,
}

impl Stream {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Bytes we consumed: received minus what the connection still holds,
    /// so a client that never reads cannot make us buffer unboundedly.
    fn fwd_cnt(&self) -> u32 {
        self.rx_cnt.wrapping_sub(self.kv.pending_input_len() as u32)
    }
}

struct Server {
    dev: Vsock,
    store: Store,
    clock: TscClock,
    streams: BTreeMap<u32, Stream>,
    /// Control packets that found no free TX buffer yet.
    pending: Vec<Header>,
    /// Idle spin before sleeping (µs).
    spin_us: u64,
}

pub fn run(cmdline: &super::cmdline::Cmdline, heap_bytes: u64) -> ! {
    let Some(base) = virtio::find_device(cmdline) else {
        println!("kv: no virtio-mmio device on the command line; idling");
        idle()
    };
    // SAFETY: the VMM told us this is a virtio-mmio window; the 3-4 GiB
    // hole is identity-mapped uncached and nothing else uses it.
    let dev = match unsafe { Vsock::new(base) } {
        Ok(d) => d,
        Err(e) => {
            println!("kv: virtio-vsock at {base:#x} unusable: {e:?}; idling");
            idle()
        }
    };
    let reserve = MIN_RESERVE.max(heap_bytes / 20);
    let maxmemory = heap_bytes.saturating_sub(reserve).max(1 << 20) as usize;
    let store = Store::new(StoreConfig {
        maxmemory,
        heap_used: Some(super::heap::used_bytes),
        hash_seed: rdtsc(),
        ..StoreConfig::default()
    });
    let tpus = (tsc::khz() / 1000).max(1);
    let spin_us = match cmdline.get_u64("kv_spin_us", SPIN_US) {
        Ok(v) => v,
        Err(text) => {
            println!("kv: kv_spin_us={text} is not a number; using {SPIN_US}");
            SPIN_US
        }
    };
    println!(
        "kv: listening on vsock port {KV_PORT} (cid {}, maxmemory {} MiB)",
        dev.guest_cid,
        maxmemory >> 20
    );
    let mut server = Server {
        dev,
        store,
        clock: TscClock { tpus },
        streams: BTreeMap::new(),
        pending: Vec::new(),
        spin_us,
    };
    server.main_loop()
}

fn idle() -> ! {
    let mut heartbeat = Heartbeat::new(0);
    loop {
        heartbeat.beat();
        pv::wait_us(0);
    }
}

impl Server {
    fn main_loop(&mut self) -> ! {
        let mut heartbeat = Heartbeat::new(0);
        let spin_ticks = self.spin_us * self.clock.tpus;
        let mut last = rdtsc();
        let mut last_activity = last;
        loop {
            heartbeat.beat();
            let now = rdtsc();
            self.store.probe.record_loop_gap(now.wrapping_sub(last));
            last = now;

            let mut busy = self.receive();
            busy |= self.serve();
            self.dev.flush();

            if busy {
                last_activity = now;
            } else if now.wrapping_sub(last_activity) > spin_ticks
                && !self.store.background_step(200)
            {
                // Only a guest that asked for it gets woken: a wake-up
                // for every reply would cost the device thread a futex
                // call and make the next sleep here return at once.
                if self.dev.request_wake() {
                    pv::wait_us(IDLE_WAIT_US);
                }
                last = rdtsc();
            } else {
                core::hint::spin_loop();
            }
        }
    }

    fn header(&self, peer_port: u32, op: u16, fwd_cnt: u32) -> Header {
        stream_header(self.dev.guest_cid, peer_port, op, fwd_cnt)
    }

    fn control(&mut self, hdr: Header) {
        if !self.pending.is_empty() || !self.dev.send(&hdr, &[]) {
            self.pending.push(hdr);
        }
    }

    /// Handles every received packet; true if there was any.
    fn receive(&mut self) -> bool {
        let mut any = false;
        // Events first: after a transport reset the RX ring may still hold
        // packets of the dropped streams, which must find them gone.
        while let Some(event) = self.dev.recv_event() {
            any = true;
            if event == vsock::EVENT_TRANSPORT_RESET {
                self.transport_reset();
            }
        }
        let mut packets: Vec<(Header, Vec<u8>)> = Vec::new();
        // Copy out first: handling needs `self` (TX, store) mutably.
        // Bounded by the RX ring size.
        while self.dev.recv(|h, p| packets.push((*h, p.to_vec()))) {
            any = true;
        }
        for (hdr, payload) in packets {
            self.handle(&hdr, &payload);
        }
        any
    }

    fn handle(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.type_ != vsock::TYPE_STREAM || hdr.dst_cid != self.dev.guest_cid {
            return;
        }
        let port = hdr.src_port;
        if hdr.op == vsock::OP_REQUEST {
            if hdr.dst_port != KV_PORT || self.streams.contains_key(&port) {
                let mut h = self.header(port, vsock::OP_RST, 0);
                h.src_port = hdr.dst_port;
                self.control(h);
                return;
            }
            let stream = Stream {
                kv: Connection::new(&mut self.store),
                peer_port: port,
                peer_buf_alloc: hdr.buf_alloc,
                peer_fwd_cnt: hdr.fwd_cnt,
                tx_cnt: 0,
                rx_cnt: 0,
                fwd_reported: 0,
                drained: false,
            };
            self.streams.insert(port, stream);
            self.control(self.header(port, vsock::OP_RESPONSE, 0));
            return;
        }
        let Some(s) = self.streams.get_mut(&port) else {
            if hdr.op != vsock::OP_RST {
                self.control(self.header(port, vsock::OP_RST, 0));
            }
            return;
        };
        s.peer_buf_alloc = hdr.buf_alloc;
        s.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            vsock::OP_RW => {
                s.rx_cnt = s.rx_cnt.wrapping_add(payload.len() as u32);
                s.kv.feed(&mut self.store, payload, &self.clock);
            }
            vsock::OP_CREDIT_REQUEST => {
                let fwd = s.fwd_cnt();
                s.fwd_reported = fwd;
                self.control(self.header(port, vsock::OP_CREDIT_UPDATE, fwd));
            }
            vsock::OP_SHUTDOWN => {
                // The client is gone: nobody to answer.
                self.close(port, true);
            }
            vsock::OP_RST => self.close(port, false),
            _ => {}
        }
    }

    /// Every connection is gone (the VM was restored from a snapshot, or
    /// the device lost its host side): drop them all as on a peer reset,
    /// without RSTs, since nobody is left to receive them.
    fn transport_reset(&mut self) {
        let streams = core::mem::take(&mut self.streams);
        let dropped = streams.len();
        for (_, s) in streams {
            s.kv.release(&mut self.store);
        }
        self.pending.clear();
        self.dev.reread_cid();
        println!(
            "kv: vsock transport reset: dropped {dropped} connections (cid {})",
            self.dev.guest_cid
        );
    }

    fn close(&mut self, port: u32, send_rst: bool) {
        if let Some(s) = self.streams.remove(&port) {
            s.kv.release(&mut self.store);
        }
        if send_rst {
            self.control(self.header(port, vsock::OP_RST, 0));
        }
    }

    /// Sends pending control packets and replies; true if anything moved.
    fn serve(&mut self) -> bool {
        self.dev.reclaim_tx();
        let mut any = false;
        while let Some(h) = self.pending.first().copied() {
            if !self.dev.send(&h, &[]) {
                return true;
            }
            self.pending.remove(0);
            any = true;
        }
        let mut finished: Vec<u32> = Vec::new();
        let guest_cid = self.dev.guest_cid;
        for s in self.streams.values_mut() {
            if s.drained && s.kv.has_pending_input() {
                s.drained = false;
                s.kv.feed(&mut self.store, &[], &self.clock);
            }
            while s.kv.has_output() && s.credit() > 0 && self.dev.tx_free() > 0 {
                let out = s.kv.output();
                let n = out.len().min(vsock::MAX_PAYLOAD).min(s.credit() as usize);
                let fwd = s.fwd_cnt();
                let hdr = stream_header(guest_cid, s.peer_port, vsock::OP_RW, fwd);
                if !self.dev.send(&hdr, &out[..n]) {
                    break;
                }
                s.kv.consume_output(n);
                s.tx_cnt = s.tx_cnt.wrapping_add(n as u32);
                s.fwd_reported = fwd;
                s.drained = true;
                any = true;
            }
            if s.kv.is_finished() {
                finished.push(s.peer_port);
            } else if s.fwd_cnt().wrapping_sub(s.fwd_reported) >= BUF_ALLOC / 2 {
                let fwd = s.fwd_cnt();
                let h = stream_header(guest_cid, s.peer_port, vsock::OP_CREDIT_UPDATE, fwd);
                if self.dev.send(&h, &[]) {
                    s.fwd_reported = fwd;
                    any = true;
                }
            }
        }
        for port in finished {
            self.close(port, true);
            any = true;
        }
        any
    }
}

/// A packet header from our KV port to host port `peer_port`.
fn stream_header(guest_cid: u64, peer_port: u32, op: u16, fwd_cnt: u32) -> Header {
    Header {
        src_cid: guest_cid,
        dst_cid: vsock::HOST_CID,
        src_port: KV_PORT,
        dst_port: peer_port,
        len: 0,
        type_: vsock::TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: BUF_ALLOC,
        fwd_cnt,
    }
}
