//! On a hand-driven transport over host memory: device state capture and
//! restore, the transport reset a restored device owes the guest, when the
//! guest is woken, and host sockets through a real epoll.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::super::backend::{Backend, GUEST_CID};
use super::super::device::{process_queues, VsockDevice};
use super::super::host::HostStream;
use super::super::packet::{Header, HDR_LEN, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW};
use super::super::state::{ResetEvent, VsockState, EVENT_LEN, EVENT_TRANSPORT_RESET};
use crate::devices::virtio::mmio::{self, MmioEvent, MmioTransport};

const RAM: usize = 0x40000;
const DATA: u64 = 0x30000;
/// Queue sizes the "driver" picks: RX, TX, event.
const SIZES: [u16; 3] = [16, 16, 8];

fn ring_base(q: usize) -> u64 {
    0x1_0000 + 0x3000 * q as u64
}
fn desc_at(q: usize) -> u64 {
    ring_base(q)
}
fn avail_at(q: usize) -> u64 {
    ring_base(q) + 0x1000
}
fn used_at(q: usize) -> u64 {
    ring_base(q) + 0x2000
}

fn w(t: &mut MmioTransport, reg: u64, v: u32) -> MmioEvent {
    t.write(reg, &v.to_le_bytes())
}

/// A transport set up as our guest driver does it.
fn driven_transport() -> MmioTransport {
    let mut t = VsockDevice::new_transport();
    w(&mut t, mmio::REG_STATUS, 3);
    w(&mut t, mmio::REG_DRIVER_FEATURES_SEL, 0);
    w(
        &mut t,
        mmio::REG_DRIVER_FEATURES,
        mmio::F_RING_EVENT_IDX as u32,
    );
    w(&mut t, mmio::REG_DRIVER_FEATURES_SEL, 1);
    w(&mut t, mmio::REG_DRIVER_FEATURES, 1);
    w(&mut t, mmio::REG_STATUS, 3 | mmio::STATUS_FEATURES_OK);
    for (q, size) in SIZES.iter().enumerate() {
        w(&mut t, mmio::REG_QUEUE_SEL, q as u32);
        w(&mut t, mmio::REG_QUEUE_NUM, u32::from(*size));
        w(&mut t, mmio::REG_QUEUE_DESC_LOW, desc_at(q) as u32);
        w(&mut t, mmio::REG_QUEUE_DRIVER_LOW, avail_at(q) as u32);
        w(&mut t, mmio::REG_QUEUE_DEVICE_LOW, used_at(q) as u32);
        w(&mut t, mmio::REG_QUEUE_READY, 1);
    }
    let ev = w(
        &mut t,
        mmio::REG_STATUS,
        3 | mmio::STATUS_FEATURES_OK | mmio::STATUS_DRIVER_OK,
    );
    assert_eq!(ev, MmioEvent::Activated);
    t
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).expect("memory")
}

/// Descriptor `i` of queue `q`: a device-writable buffer of `len`.
fn post(mem: &GuestMemoryMmap, q: usize, slot: u16, i: u16, len: u32) {
    let at = GuestAddress(desc_at(q) + 16 * u64::from(i));
    let addr = DATA + 0x1000 * q as u64 + 0x100 * u64::from(i);
    mem.write_obj(addr, at).expect("desc addr");
    mem.write_obj(len, GuestAddress(at.0 + 8))
        .expect("desc len");
    mem.write_obj(2u16, GuestAddress(at.0 + 12))
        .expect("desc flags");
    mem.write_obj(
        i,
        GuestAddress(avail_at(q) + 4 + 2 * u64::from(slot % SIZES[q])),
    )
    .expect("ring");
}

fn set_avail_idx(mem: &GuestMemoryMmap, q: usize, idx: u16) {
    mem.write_obj(idx, GuestAddress(avail_at(q) + 2))
        .expect("avail idx");
}

fn used_idx(mem: &GuestMemoryMmap, q: usize) -> u16 {
    mem.read_obj(GuestAddress(used_at(q) + 2))
        .expect("used idx")
}

fn used_elem(mem: &GuestMemoryMmap, q: usize, slot: u16) -> (u32, u32) {
    let at = used_at(q) + 4 + 8 * u64::from(slot % SIZES[q]);
    (
        mem.read_obj(GuestAddress(at)).expect("id"),
        mem.read_obj(GuestAddress(at + 4)).expect("len"),
    )
}

fn state_of(t: &MmioTransport, next_host_port: u32) -> VsockState {
    VsockState {
        transport: t.save(),
        guest_cid: GUEST_CID,
        next_host_port,
    }
}

/// A backend with one host connection, so RX has a REQUEST to send.
fn backend_with_connection() -> (Backend, std::os::unix::net::UnixStream) {
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    let mut backend = Backend::new(None);
    backend.set_next_port(5000);
    let port = backend
        .add_host_stream(HostStream::Unix(a))
        .expect("add stream");
    assert_eq!(port, 5000);
    (backend, b)
}

#[test]
fn state_round_trips_through_serde_and_restore() {
    let mem = memory();
    let mut t = driven_transport();
    // Move the RX queue's positions off zero: two buffers, both used.
    let (mut backend, _peer) = backend_with_connection();
    post(&mem, 0, 0, 0, 0x100);
    set_avail_idx(&mem, 0, 1);
    post(&mem, 2, 0, 0, EVENT_LEN as u32);
    set_avail_idx(&mem, 2, 1);
    let mut reset = ResetEvent::Done;
    assert!(process_queues(&mut backend, &mem, &mut t, &mut reset).expect("round"));
    assert_eq!(used_idx(&mem, 0), 1);
    w(&mut t, mmio::REG_QUEUE_SEL, 1);

    let state = state_of(&t, backend.next_port());
    assert_eq!(state.transport.queues.len(), 3);
    assert_eq!(state.transport.queues[0].next_avail, 1);
    assert_eq!(state.transport.queues[0].next_used, 1);
    assert!(state.transport.queues[0].event_idx_enabled);
    assert_eq!(state.transport.queues[2].size, 8);
    assert_eq!(state.transport.queue_sel, 1);
    assert_eq!(state.next_host_port, 5001);

    let blob = bincode::serialize(&state).expect("encode");
    let decoded: VsockState = bincode::deserialize(&blob).expect("decode");
    assert_eq!(decoded, state);
    let restored = VsockDevice::transport_from_state(&decoded).expect("restore");
    assert!(restored.driver_ok());
    assert_eq!(state_of(&restored, 5001), state);
    // Registers read back as the guest left them.
    let mut restored = restored;
    let mut b = [0u8; 4];
    restored.read(mmio::REG_QUEUE_READY, &mut b);
    assert_eq!(u32::from_le_bytes(b), 1);
    restored.read(mmio::REG_CONFIG, &mut b);
    assert_eq!(u64::from(u32::from_le_bytes(b)), GUEST_CID);
}

#[test]
fn restore_refuses_states_of_another_device() {
    let good = state_of(&driven_transport(), 1024);
    let refuse = |f: &dyn Fn(&mut VsockState)| {
        let mut s = good.clone();
        f(&mut s);
        assert!(
            VsockDevice::transport_from_state(&s).is_err(),
            "accepted {s:?}"
        );
    };
    refuse(&|s| s.guest_cid = 42);
    refuse(&|s| {
        s.transport.queues.pop();
    });
    refuse(&|s| s.transport.queues[2].max_size = 16);
    refuse(&|s| s.transport.queues[0].size = 3);
    refuse(&|s| s.transport.queues[0].desc_table = 0x1001);
    refuse(&|s| s.transport.device_features = 0);
    refuse(&|s| s.transport.driver_features |= 1 << 40);
    assert!(VsockDevice::transport_from_state(&good).is_ok());
}

#[test]
fn restored_device_sends_a_transport_reset_before_any_rx() {
    let mem = memory();
    let mut t = driven_transport();
    let (mut backend, _peer) = backend_with_connection();
    // RX buffers are there, the event queue has none yet.
    for i in 0..4 {
        post(&mem, 0, i, i, 0x100);
    }
    set_avail_idx(&mem, 0, 4);
    let mut reset = ResetEvent::Pending;
    assert!(!process_queues(&mut backend, &mem, &mut t, &mut reset).expect("round"));
    assert_eq!(reset, ResetEvent::Pending);
    assert_eq!(used_idx(&mem, 0), 0, "RX must wait for the reset");
    // The device asked to hear about the first event buffer.
    let avail_event: u16 = mem
        .read_obj(GuestAddress(used_at(2) + 4 + 8 * u64::from(SIZES[2])))
        .expect("avail_event");
    assert_eq!(avail_event, 0);

    // The guest posts two event buffers: one carries the reset.
    post(&mem, 2, 0, 0, EVENT_LEN as u32);
    post(&mem, 2, 1, 1, EVENT_LEN as u32);
    set_avail_idx(&mem, 2, 2);
    assert!(process_queues(&mut backend, &mem, &mut t, &mut reset).expect("round"));
    assert_eq!(used_idx(&mem, 2), 1, "exactly one event");
    assert_eq!(used_elem(&mem, 2, 0), (0, EVENT_LEN as u32));
    let id: u32 = mem.read_obj(GuestAddress(DATA + 0x2000)).expect("event");
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    assert_eq!(reset, ResetEvent::AwaitingAck { seen: 2 });
    // A buffer still posted is not an acknowledgement; RX still waits.
    process_queues(&mut backend, &mem, &mut t, &mut reset).expect("round");
    assert_eq!(used_idx(&mem, 0), 0);

    // Posting again (after dropping its streams) releases RX.
    post(&mem, 2, 2, 0, EVENT_LEN as u32);
    set_avail_idx(&mem, 2, 3);
    assert!(process_queues(&mut backend, &mem, &mut t, &mut reset).expect("round"));
    assert_eq!(reset, ResetEvent::Done);
    assert_eq!(used_idx(&mem, 0), 1);
    assert_eq!(used_idx(&mem, 2), 1, "only one reset");
    let mut hdr = [0u8; HDR_LEN];
    mem.read_slice(&mut hdr, GuestAddress(DATA)).expect("rx");
    let hdr = Header::decode(&hdr);
    assert_eq!((hdr.op, hdr.src_port), (OP_REQUEST, 5000));
}

#[test]
fn reset_is_acknowledged_when_the_guest_reposts() {
    let mem = memory();
    let mut t = driven_transport();
    let mut backend = Backend::new(None);
    post(&mem, 2, 0, 0, EVENT_LEN as u32);
    set_avail_idx(&mem, 2, 1);
    let mut reset = ResetEvent::Pending;
    process_queues(&mut backend, &mem, &mut t, &mut reset).expect("round");
    assert_eq!(reset, ResetEvent::AwaitingAck { seen: 1 });
    // The device asked to be notified at the next post.
    let avail_event: u16 = mem
        .read_obj(GuestAddress(used_at(2) + 4 + 8 * u64::from(SIZES[2])))
        .expect("avail_event");
    assert_eq!(avail_event, 1);
    post(&mem, 2, 1, 0, EVENT_LEN as u32);
    set_avail_idx(&mem, 2, 2);
    process_queues(&mut backend, &mem, &mut t, &mut reset).expect("round");
    assert_eq!(reset, ResetEvent::Done);
}

#[test]
fn short_event_buffer_breaks_the_device() {
    let mem = memory();
    let mut t = driven_transport();
    post(&mem, 2, 0, 0, 2);
    set_avail_idx(&mem, 2, 1);
    let mut reset = ResetEvent::Pending;
    assert!(process_queues(&mut Backend::new(None), &mem, &mut t, &mut reset).is_err());
}

#[test]
fn no_event_queue_means_no_reset_and_rx_flows() {
    let mem = memory();
    let mut t = driven_transport();
    w(&mut t, mmio::REG_QUEUE_SEL, 2);
    // Only a not-ready queue can be changed: fake a driver that never
    // enabled it by building the state by hand.
    let mut s = state_of(&t, 1024);
    s.transport.queues[2].ready = false;
    let mut t = VsockDevice::transport_from_state(&s).expect("restore");
    let (mut backend, _peer) = backend_with_connection();
    post(&mem, 0, 0, 0, 0x100);
    set_avail_idx(&mem, 0, 1);
    let mut reset = ResetEvent::Pending;
    assert!(process_queues(&mut backend, &mem, &mut t, &mut reset).expect("round"));
    assert_eq!(reset, ResetEvent::Done);
    assert_eq!(used_idx(&mem, 0), 1);
}

/// A TX packet from the guest's KV port to host port `port`.
fn guest_sends(mem: &GuestMemoryMmap, slot: u16, op: u16, port: u32) {
    let h = Header {
        src_cid: GUEST_CID,
        dst_cid: super::super::packet::HOST_CID,
        src_port: super::super::backend::KV_PORT,
        dst_port: port,
        type_: super::super::packet::TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..Header::default()
    };
    let i = slot % SIZES[1];
    let addr = DATA + 0x1000 + 0x100 * u64::from(i);
    mem.write_slice(&h.encode(), GuestAddress(addr))
        .expect("tx packet");
    let at = GuestAddress(desc_at(1) + 16 * u64::from(i));
    mem.write_obj(addr, at).expect("desc addr");
    mem.write_obj(HDR_LEN as u32, GuestAddress(at.0 + 8))
        .expect("desc len");
    mem.write_obj(0u16, GuestAddress(at.0 + 12))
        .expect("desc flags");
    mem.write_obj(i, GuestAddress(avail_at(1) + 4 + 2 * u64::from(i)))
        .expect("ring");
    set_avail_idx(mem, 1, slot + 1);
}

fn set_used_event(mem: &GuestMemoryMmap, q: usize, v: u16) {
    mem.write_obj(v, GuestAddress(avail_at(q) + 4 + 2 * u64::from(SIZES[q])))
        .expect("used_event");
}

/// RX packets `from..to` as (op, payload).
fn rx_packets(mem: &GuestMemoryMmap, from: u16, to: u16) -> Vec<(u16, Vec<u8>)> {
    (from..to)
        .map(|slot| {
            let (id, len) = used_elem(mem, 0, slot);
            let addr = DATA + 0x100 * u64::from(id);
            let mut buf = vec![0u8; len as usize];
            mem.read_slice(&mut buf, GuestAddress(addr)).expect("rx");
            let mut h = [0u8; HDR_LEN];
            h.copy_from_slice(&buf[..HDR_LEN]);
            let hdr = Header::decode(&h);
            (hdr.op, buf[HDR_LEN..].to_vec())
        })
        .collect()
}

#[test]
fn guest_is_woken_only_past_the_used_event_it_set() {
    use std::os::unix::net::UnixStream;
    let mem = memory();
    let mut t = driven_transport();
    let mut reset = ResetEvent::Done;
    let (mut backend, _peer) = backend_with_connection();
    let (a, _b) = UnixStream::pair().expect("socketpair");
    backend
        .add_host_stream(HostStream::Unix(a))
        .expect("second stream");
    for i in 0..SIZES[0] {
        post(&mem, 0, i, i, 0x100);
    }
    set_avail_idx(&mem, 0, SIZES[0]);
    // A polling guest: its mark (5) is not reached by two requests.
    set_used_event(&mem, 0, 5);
    assert!(!process_queues(&mut backend, &mem, &mut t, &mut reset).expect("round"));
    assert_eq!(used_idx(&mem, 0), 2, "the buffers are used all the same");
    // About to sleep after taking both: the next buffer must wake it.
    set_used_event(&mem, 0, 2);
    let (c, _d) = UnixStream::pair().expect("socketpair");
    backend.add_host_stream(HostStream::Unix(c)).expect("third");
    assert!(process_queues(&mut backend, &mem, &mut t, &mut reset).expect("round"));
    assert_eq!(used_idx(&mem, 0), 3);
    // Awake again and polling: its old mark is behind, no more wakes.
    let (e, _f) = UnixStream::pair().expect("socketpair");
    backend
        .add_host_stream(HostStream::Unix(e))
        .expect("fourth");
    assert!(!process_queues(&mut backend, &mem, &mut t, &mut reset).expect("round"));
    assert_eq!(used_idx(&mem, 0), 4);
}

/// A host TCP client through a real epoll: data then EOF reach the
/// guest, whether the EOF comes with the data or after the device has
/// read it (short reads clear `readable`, so the EOF must raise a new
/// edge or be seen as a hang-up with the data).
#[test]
fn host_data_then_eof_reach_the_guest_through_epoll() {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use vmm_sys_util::epoll::{Epoll, EpollEvent};

    for eof_with_data in [true, false] {
        let mem = memory();
        let mut t = driven_transport();
        let mut reset = ResetEvent::Done;
        let epoll = Arc::new(Epoll::new().expect("epoll"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        server.set_nonblocking(true).expect("nonblocking");
        let mut backend = Backend::new(Some(epoll.clone()));
        backend.set_next_port(5000);
        let port = backend
            .add_host_stream(HostStream::Tcp(server))
            .expect("add stream");
        let mut events = vec![EpollEvent::default(); 8];
        let mut round = |backend: &mut Backend, t: &mut MmioTransport, reset: &mut ResetEvent| {
            let n = epoll.wait(1000, &mut events).expect("epoll");
            for ev in &events[..n] {
                let p = ev
                    .data()
                    .saturating_sub(super::super::backend::TOKEN_CONN_BASE);
                backend.socket_event(p as u32, ev.event_set());
            }
            process_queues(backend, &mem, t, reset).expect("round");
            n
        };
        for i in 0..SIZES[0] {
            post(&mem, 0, i, i, 0x100);
        }
        set_avail_idx(&mem, 0, SIZES[0]);
        round(&mut backend, &mut t, &mut reset);
        assert_eq!(rx_packets(&mem, 0, 1), vec![(OP_REQUEST, vec![])]);
        guest_sends(&mem, 0, OP_RESPONSE, port);
        process_queues(&mut backend, &mem, &mut t, &mut reset).expect("response");

        client.write_all(b"PING\r\n").expect("send");
        if eof_with_data {
            drop(client);
            round(&mut backend, &mut t, &mut reset);
        } else {
            round(&mut backend, &mut t, &mut reset);
            assert_eq!(used_idx(&mem, 0), 2, "the data alone");
            drop(client);
            assert!(
                round(&mut backend, &mut t, &mut reset) > 0,
                "no edge for the EOF"
            );
        }
        assert_eq!(
            rx_packets(&mem, 1, used_idx(&mem, 0)),
            vec![(OP_RW, b"PING\r\n".to_vec()), (OP_RST, vec![])],
            "eof_with_data={eof_with_data}"
        );
    }
}

/// Issue #21: a guest that refuses a connection before serving any (its
/// server still starting) gets it offered again, and the client is kept;
/// once the guest served one, a refusal is final and the client closed.
#[test]
fn refused_before_any_served_is_held_and_offered_again_then_refusals_are_final() {
    use std::io::Read;
    let mem = memory();
    let mut t = driven_transport();
    let mut reset = ResetEvent::Done;
    let (mut backend, mut peer) = backend_with_connection();
    peer.set_nonblocking(true).expect("nonblocking");
    for i in 0..SIZES[0] {
        post(&mem, 0, i, i, 0x100);
    }
    set_avail_idx(&mem, 0, SIZES[0]);
    process_queues(&mut backend, &mem, &mut t, &mut reset).expect("round");
    assert_eq!(rx_packets(&mem, 0, 1), vec![(OP_REQUEST, vec![])]);

    // Refused: held, nothing new for the guest until the retry.
    guest_sends(&mem, 0, OP_RST, 5000);
    process_queues(&mut backend, &mem, &mut t, &mut reset).expect("refusal");
    assert!(backend.has_held());
    assert_eq!(backend.connection_count(), 1);
    assert_eq!(used_idx(&mem, 0), 1);
    let mut buf = [0u8; 8];
    assert!(
        matches!(peer.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the client must stay connected"
    );
    backend.retry_held();
    assert!(!backend.has_held());
    process_queues(&mut backend, &mem, &mut t, &mut reset).expect("retry");
    assert_eq!(rx_packets(&mem, 1, 2), vec![(OP_REQUEST, vec![])]);
    guest_sends(&mem, 1, OP_RESPONSE, 5000);
    process_queues(&mut backend, &mem, &mut t, &mut reset).expect("accepted");

    // A second client, refused now that the guest serves: closed at once.
    let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    let port = backend
        .add_host_stream(HostStream::Unix(a))
        .expect("second stream");
    process_queues(&mut backend, &mem, &mut t, &mut reset).expect("request");
    assert_eq!(rx_packets(&mem, 2, 3), vec![(OP_REQUEST, vec![])]);
    guest_sends(&mem, 2, OP_RST, port);
    process_queues(&mut backend, &mem, &mut t, &mut reset).expect("final refusal");
    assert!(!backend.has_held());
    assert_eq!(backend.connection_count(), 1);
    assert_eq!(
        b.read(&mut buf).expect("EOF"),
        0,
        "the refused client is closed"
    );
}

/// A driver reset keeps the connections still waiting for an answer (and
/// asks again), and drops the established ones.
#[test]
fn a_driver_reset_keeps_waiting_connections_and_drops_established_ones() {
    let mem = memory();
    let mut t = driven_transport();
    let mut reset = ResetEvent::Done;
    let (mut backend, _peer) = backend_with_connection();
    for i in 0..SIZES[0] {
        post(&mem, 0, i, i, 0x100);
    }
    set_avail_idx(&mem, 0, SIZES[0]);
    process_queues(&mut backend, &mem, &mut t, &mut reset).expect("round");
    guest_sends(&mem, 0, OP_RESPONSE, 5000);
    process_queues(&mut backend, &mem, &mut t, &mut reset).expect("accepted");
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    backend
        .add_host_stream(HostStream::Unix(a))
        .expect("second stream");
    assert_eq!(backend.connection_count(), 2);
    backend.driver_reset();
    assert_eq!(backend.connection_count(), 1, "only the waiting one stays");
    assert!(backend.has_rx_work(), "and it is offered again");
}
