//! What survives a snapshot of the vsock device, and the transport-reset
//! event a restored device owes the guest.
//!
//! Host connections are not state: their sockets belong to the process
//! that took the snapshot. A restored device therefore starts with no
//! connections and tells the guest so with VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
//! (virtio spec 1.1 §5.10.6.6), after which the guest drops every stream it
//! had and new host connections work as on a fresh device.

use std::sync::atomic::{fence, Ordering};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::backend::Broken;
use crate::devices::virtio::mmio::MmioTransportState;

/// `virtio_vsock_event.id` of a transport reset.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// `struct virtio_vsock_event { le32 id; }`.
pub const EVENT_LEN: usize = 4;

/// The device's saved state: transport registers and queue positions, the
/// guest CID and where host port numbering had got to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub transport: MmioTransportState,
    pub guest_cid: u64,
    /// Next host port to hand out. Kept so connections made after a
    /// restore never reuse a port of a connection the guest had: packets
    /// for those still in the rings must not hit a new stream.
    pub next_host_port: u32,
}

/// Progress of the transport reset a restored device owes the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetEvent {
    /// Nothing owed: RX flows.
    Done,
    /// Not delivered yet (the guest has no event buffer posted).
    Pending,
    /// Delivered; RX waits until the guest posts a new event buffer, which
    /// it does only after it has dropped its streams. Otherwise a
    /// connection request could reach it first and be dropped with the
    /// old ones. `seen` is the event queue's avail index at delivery (the
    /// guest keeps several buffers posted, so "more posted than taken"
    /// says nothing; a move of the index does).
    AwaitingAck { seen: u16 },
}

fn ring(e: impl std::fmt::Display) -> Broken {
    Broken(format!("event ring: {e}"))
}

impl ResetEvent {
    /// Moves the reset along on the event queue. Returns whether a buffer
    /// was handed back to the guest.
    pub fn advance(&mut self, mem: &GuestMemoryMmap, evq: &mut Queue) -> Result<bool, Broken> {
        let mut delivered = false;
        loop {
            match *self {
                ResetEvent::Done => return Ok(delivered),
                _ if !evq.ready() => {
                    // A driver without an event queue cannot be told;
                    // holding RX back would only starve it.
                    tracing::warn!("virtio-vsock: no event queue; cannot send a transport reset");
                    *self = ResetEvent::Done;
                    return Ok(false);
                }
                ResetEvent::Pending => {
                    let next = evq.iter(mem).map_err(ring)?.next();
                    let Some(chain) = next else {
                        // Ask to be notified when the guest posts one.
                        if evq.enable_notification(mem).map_err(ring)? {
                            continue;
                        }
                        return Ok(false);
                    };
                    let head = chain.head_index();
                    let mut writer = chain
                        .writer(mem)
                        .map_err(|e| Broken(format!("event descriptor chain {head}: {e}")))?;
                    if writer.available_bytes() < EVENT_LEN {
                        return Err(Broken(format!(
                            "event buffer of {} bytes",
                            writer.available_bytes()
                        )));
                    }
                    std::io::Write::write_all(&mut writer, &EVENT_TRANSPORT_RESET.to_le_bytes())
                        .map_err(|e| Broken(format!("event write: {e}")))?;
                    evq.add_used(mem, head, EVENT_LEN as u32).map_err(ring)?;
                    delivered = true;
                    let seen = evq.avail_idx(mem, Ordering::Acquire).map_err(ring)?.0;
                    // Have the guest's next post notify us (EVENT_IDX):
                    // avail_event = the index as it stands now.
                    // virtio-queue's enable_notification would use
                    // next_avail, which the guest is already past.
                    let avail_event = evq.used_ring() + 4 + 8 * u64::from(evq.size());
                    mem.write_obj(seen, GuestAddress(avail_event))
                        .map_err(ring)?;
                    // The store before the re-check below (spec §2.6.7.2).
                    fence(Ordering::SeqCst);
                    *self = ResetEvent::AwaitingAck { seen };
                }
                ResetEvent::AwaitingAck { seen } => {
                    let avail = evq.avail_idx(mem, Ordering::Acquire).map_err(ring)?;
                    if avail.0 != seen {
                        *self = ResetEvent::Done;
                    }
                    return Ok(delivered);
                }
            }
        }
    }

    pub fn blocks_rx(self) -> bool {
        self != ResetEvent::Done
    }
}
