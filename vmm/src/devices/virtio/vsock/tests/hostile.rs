//! A hostile guest against the device logic: crafted virtqueues in plain
//! host memory (no KVM). Every case must end in `Broken`, never a panic
//! or an access outside guest RAM.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::super::backend::{Backend, GUEST_CID};
use super::super::packet::{Header, HDR_LEN, HOST_CID, OP_RST, TYPE_STREAM};

const SIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const DATA: u64 = 0x4000;
const RAM: usize = 0x10000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn setup() -> (GuestMemoryMmap, Queue) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).expect("memory");
    let mut q = Queue::new(SIZE).expect("queue");
    q.set_size(SIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_event_idx(true);
    q.set_ready(true);
    (mem, q)
}

fn desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = GuestAddress(DESC + 16 * u64::from(i));
    mem.write_obj(addr, at).expect("desc addr");
    mem.write_obj(len, at.unchecked_add(8)).expect("desc len");
    mem.write_obj(flags, at.unchecked_add(12))
        .expect("desc flags");
    mem.write_obj(next, at.unchecked_add(14))
        .expect("desc next");
}

/// Makes `heads` available, avail.idx = `idx`.
fn avail(mem: &GuestMemoryMmap, heads: &[u16], idx: u16) {
    for (i, h) in heads.iter().enumerate() {
        mem.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * i as u64))
            .expect("ring");
    }
    mem.write_obj(idx, GuestAddress(AVAIL + 2)).expect("idx");
}

fn rst_packet(mem: &GuestMemoryMmap) {
    let h = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 6379,
        dst_port: 5000,
        type_: TYPE_STREAM,
        op: OP_RST,
        ..Header::default()
    };
    mem.write_slice(&h.encode(), GuestAddress(DATA))
        .expect("hdr");
}

#[test]
fn well_formed_packet_is_consumed() {
    let (mem, mut q) = setup();
    rst_packet(&mem);
    desc(&mem, 0, DATA, HDR_LEN as u32, 0, 0);
    avail(&mem, &[0], 1);
    let mut b = Backend::new(None);
    assert!(b.process_tx(&mem, &mut q).expect("valid packet"));
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
    assert_eq!(used_idx, 1);
}

#[test]
fn head_index_out_of_range_breaks_the_device() {
    let (mem, mut q) = setup();
    avail(&mem, &[SIZE + 100], 1);
    assert!(Backend::new(None).process_tx(&mem, &mut q).is_err());
}

#[test]
fn descriptor_outside_ram_breaks_the_device() {
    let (mem, mut q) = setup();
    desc(&mem, 0, 0x1_0000_0000, 64, 0, 0);
    avail(&mem, &[0], 1);
    assert!(Backend::new(None).process_tx(&mem, &mut q).is_err());
    // Straddling the end of RAM is no better.
    let (mem, mut q) = setup();
    desc(&mem, 0, RAM as u64 - 8, 64, 0, 0);
    avail(&mem, &[0], 1);
    assert!(Backend::new(None).process_tx(&mem, &mut q).is_err());
}

#[test]
fn absurd_length_breaks_the_device() {
    let (mem, mut q) = setup();
    desc(&mem, 0, DATA, u32::MAX, 0, 0);
    avail(&mem, &[0], 1);
    assert!(Backend::new(None).process_tx(&mem, &mut q).is_err());
}

#[test]
fn header_claiming_more_than_the_chain_breaks_the_device() {
    let (mem, mut q) = setup();
    rst_packet(&mem);
    mem.write_obj(1000u32, GuestAddress(DATA + 24))
        .expect("len");
    desc(&mem, 0, DATA, HDR_LEN as u32, 0, 0);
    avail(&mem, &[0], 1);
    assert!(Backend::new(None).process_tx(&mem, &mut q).is_err());
}

#[test]
fn descriptor_loop_terminates_and_breaks_the_device() {
    let (mem, mut q) = setup();
    // 0 -> 1 -> 0 -> ...: bounded by the queue size, and the result is
    // longer than any packet.
    desc(&mem, 0, DATA, 8192, F_NEXT, 1);
    desc(&mem, 1, DATA, 8192, F_NEXT, 0);
    avail(&mem, &[0], 1);
    assert!(Backend::new(None).process_tx(&mem, &mut q).is_err());
}

#[test]
fn avail_index_far_ahead_breaks_the_device() {
    let (mem, mut q) = setup();
    avail(&mem, &[0], SIZE + 5);
    assert!(Backend::new(None).process_tx(&mem, &mut q).is_err());
}

#[test]
fn used_ring_outside_ram_breaks_the_device() {
    let (mem, mut q) = setup();
    q.set_ready(false);
    q.set_used_ring_address(Some(0xffff_f000), Some(0));
    q.set_ready(true);
    rst_packet(&mem);
    desc(&mem, 0, DATA, HDR_LEN as u32, 0, 0);
    avail(&mem, &[0], 1);
    assert!(Backend::new(None).process_tx(&mem, &mut q).is_err());
}

#[test]
fn rx_buffer_too_small_or_read_only_breaks_the_device() {
    // An owed RST needs an RX buffer: give it a 4-byte one.
    let (mem, mut txq) = setup();
    let mut b = Backend::new(None);
    // An RW for an unknown port makes the backend owe the guest an RST.
    rst_packet(&mem);
    mem.write_obj(5u16, GuestAddress(DATA + 30)).expect("op");
    desc(&mem, 0, DATA, HDR_LEN as u32, 0, 0);
    avail(&mem, &[0], 1);
    b.process_tx(&mem, &mut txq).expect("valid packet");
    assert!(b.has_rx_work());
    let (mem, mut rxq) = setup();
    desc(&mem, 0, DATA, 4, F_WRITE, 0);
    avail(&mem, &[0], 1);
    assert!(b.process_rx(&mem, &mut rxq).is_err());
    let (mem, mut rxq) = setup();
    desc(&mem, 0, DATA, 4096, 0, 0); // not device-writable
    avail(&mem, &[0], 1);
    assert!(b.process_rx(&mem, &mut rxq).is_err());
}
