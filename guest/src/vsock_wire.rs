//! The virtio-vsock wire format (virtio spec 1.1 §5.10.6): the packet
//! header, encoded by hand (little endian, 44 bytes, no padding), and the
//! constants both ends use. The VMM's device and the guest's driver share
//! this one definition.

pub const HDR_LEN: usize = 44;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// OP_SHUTDOWN flags: the sender will receive / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

pub const HOST_CID: u64 = 2;

/// `virtio_vsock_event.id` of a transport reset (§5.10.6.6): every
/// connection is gone (e.g. the VM was restored from a snapshot).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// `struct virtio_vsock_event { le32 id; }`.
pub const EVENT_LEN: usize = 4;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The header at the start of `b`, if `b` is long enough to hold one.
    pub fn from_prefix(b: &[u8]) -> Option<Header> {
        let bytes: &[u8; HDR_LEN] = b.get(..HDR_LEN)?.try_into().ok()?;
        Some(Header::decode(bytes))
    }

    pub fn decode(b: &[u8; HDR_LEN]) -> Header {
        let u64_at = |i: usize| {
            u64::from_le_bytes([
                b[i],
                b[i + 1],
                b[i + 2],
                b[i + 3],
                b[i + 4],
                b[i + 5],
                b[i + 6],
                b[i + 7],
            ])
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_its_bytes() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 6379,
            dst_port: 1_000_001,
            len: 17,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0xdead_beef,
        };
        let bytes = h.encode();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Header::decode(&bytes), h);
        assert_eq!(Header::from_prefix(&bytes), Some(h));
        assert_eq!(Header::from_prefix(&bytes[..HDR_LEN - 1]), None);
    }
}
