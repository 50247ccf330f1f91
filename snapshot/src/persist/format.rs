//! The on-disk layout of a snapshot directory, versions 1 and 2.
//!
//! Version 2 is an incremental snapshot: the chunks the guest did not
//! write since its parent snapshot are not stored again (chunk flag 2,
//! with the crc32c they have in the parent chain), and a parent block
//! between the chunk checksums and the blob names the parent and its
//! content id (see below). A snapshot without a parent is written as
//! version 1, so older readers keep reading full snapshots.
//!
//! ```text
//! <dir>/memory.img   raw guest memory: region i's bytes at regions[i].file_offset;
//!                    all-zero chunks are holes (never written, file set_len'd)
//! <dir>/state.bin    everything else, written last; little-endian:
//!
//!   off  size  field
//!   0    8     magic  b"SNAPVMSS"
//!   8    4     format version (u32) = 1
//!   12   4     reserved, 0
//!   16   8     file length in bytes, this field and the trailer included
//!   24   8     chunk size (power of two, >= 4096)
//!   32   8     memory image length in bytes
//!   40   4     region count R (1..=MAX_REGIONS)
//!   44   4     reserved, 0
//!   48   24*R  regions: guest address, length, file offset (u64 each)
//!   ..   8     chunk count C (= sum of region lengths / chunk size)
//!   ..   C     chunk flags: 0 = data, 1 = zero (a hole in memory.img),
//!                2 = data held by the parent chain (version 2 only)
//!   ..   4*C   chunk checksums: crc32c of the chunk's bytes (0 for zero chunks)
//!   (version 2 only:)
//!   ..   4     parent state.bin's trailer crc32c (its content id)
//!   ..   8     parent state.bin's length
//!   ..   4     parent path length P (1..=4096)
//!   ..   P     parent path, UTF-8: relative to this directory's parent
//!                directory, or absolute
//!   ..   8     VM state blob length B
//!   ..   4     crc32c of the blob
//!   ..   B     VM state blob (opaque: vCPU and device state, serialised by the VMM)
//!   end-4 4    crc32c of every byte before it
//! ```
//!
//! Chunks are numbered across regions in region order; chunk `k` of region
//! `i` sits at `file_offset + k * chunk_size` in memory.img. The decoder
//! rejects anything it does not understand: another magic or version, a
//! non-zero reserved field, unknown flags, misaligned or overlapping ranges,
//! a length that disagrees with the file, trailing bytes.

/// First 8 bytes of `state.bin`.
pub const MAGIC: [u8; 8] = *b"SNAPVMSS";
/// Full snapshots (no parent).
pub const FORMAT_VERSION: u32 = 1;
/// Incremental snapshots (a parent block, inherited chunks).
pub const FORMAT_VERSION_DIFF: u32 = 2;
/// Upper bound on a parent path's length.
pub const MAX_PARENT_PATH: u32 = 4096;
/// File names inside a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
pub const MEMORY_FILE: &str = "memory.img";
/// Upper bound on regions (KVM memslots are far fewer); bounds allocations
/// made while decoding untrusted input.
pub const MAX_REGIONS: u32 = 4096;

const PREAMBLE: usize = 24;
const TRAILER: usize = 4;
const FLAG_DATA: u8 = 0;
const FLAG_ZERO: u8 = 1;
const FLAG_PARENT: u8 = 2;

/// What an incremental snapshot depends on: its parent directory and the
/// parent state file's content id (its trailer crc32c and length), so a
/// parent replaced by another snapshot of the same name is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    /// Relative to the child directory's parent directory, or absolute.
    pub path: String,
    pub state_crc: u32,
    pub state_len: u64,
}

/// One region of guest RAM and where its bytes live in memory.img.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionEntry {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// One chunk: a hole, data stored here, or data held by the parent chain
/// (an incremental snapshot); with the crc32c of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    pub zero: bool,
    pub crc: u32,
    /// Not stored in this directory's memory.img: the nearest ancestor
    /// holding it has it (with this crc).
    pub inherited: bool,
}

impl ChunkEntry {
    pub const fn zero() -> ChunkEntry {
        ChunkEntry {
            zero: true,
            crc: 0,
            inherited: false,
        }
    }

    pub const fn data(crc: u32) -> ChunkEntry {
        ChunkEntry {
            zero: false,
            crc,
            inherited: false,
        }
    }

    pub const fn inherited(crc: u32) -> ChunkEntry {
        ChunkEntry {
            zero: false,
            crc,
            inherited: true,
        }
    }
}

/// Everything in `state.bin` except the VM state blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub chunk_size: u64,
    pub image_len: u64,
    pub regions: Vec<RegionEntry>,
    pub chunks: Vec<ChunkEntry>,
    /// An incremental snapshot's parent (version 2).
    pub parent: Option<ParentRef>,
}

/// Where chunk `index` lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPos {
    pub region: usize,
    pub guest_addr: u64,
    pub file_offset: u64,
}

impl Header {
    /// Location of every chunk, in chunk order.
    pub fn chunk_positions(&self) -> impl Iterator<Item = ChunkPos> + '_ {
        let cs = self.chunk_size;
        self.regions.iter().enumerate().flat_map(move |(i, r)| {
            (0..r.len / cs).map(move |k| ChunkPos {
                region: i,
                guest_addr: r.guest_addr + k * cs,
                file_offset: r.file_offset + k * cs,
            })
        })
    }

    /// Populated (non-hole) bytes of the image.
    pub fn data_bytes(&self) -> u64 {
        self.chunks.iter().filter(|c| !c.zero).count() as u64 * self.chunk_size
    }

    /// Checks the invariants the decoder relies on; used by both sides so
    /// the writer can never produce a file the reader refuses.
    pub fn validate(&self) -> Result<(), String> {
        let cs = self.chunk_size;
        if !cs.is_power_of_two() || cs < 4096 {
            return Err(format!("chunk size {cs:#x} is not a power of two >= 4096"));
        }
        if self.regions.is_empty() || self.regions.len() > MAX_REGIONS as usize {
            return Err(format!("{} regions", self.regions.len()));
        }
        let mut chunks = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.len == 0 || r.len % cs != 0 || r.guest_addr % cs != 0 || r.file_offset % cs != 0 {
                return Err(format!(
                    "region {i} (guest {:#x}, len {:#x}, file offset {:#x}) is not chunk aligned",
                    r.guest_addr, r.len, r.file_offset
                ));
            }
            let file_end = r.file_offset.checked_add(r.len);
            if r.guest_addr.checked_add(r.len).is_none() || file_end.is_none() {
                return Err(format!("region {i} wraps around"));
            }
            if file_end.is_some_and(|e| e > self.image_len) {
                return Err(format!(
                    "region {i} ends at {:#x}, past the image length {:#x}",
                    r.file_offset + r.len,
                    self.image_len
                ));
            }
            chunks += r.len / cs;
        }
        for (what, key) in [
            (
                "guest",
                (|r: &RegionEntry| r.guest_addr) as fn(&RegionEntry) -> u64,
            ),
            ("file", |r: &RegionEntry| r.file_offset),
        ] {
            let mut v: Vec<(u64, u64)> = self.regions.iter().map(|r| (key(r), r.len)).collect();
            v.sort_unstable();
            if v.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
                return Err(format!("regions overlap in {what} ranges"));
            }
        }
        if chunks != self.chunks.len() as u64 {
            return Err(format!(
                "{} chunks listed, regions hold {chunks}",
                self.chunks.len()
            ));
        }
        if self.chunks.iter().any(|c| c.zero && c.crc != 0) {
            return Err("a zero chunk carries a checksum".into());
        }
        if self.chunks.iter().any(|c| c.zero && c.inherited) {
            return Err("a zero chunk is marked inherited".into());
        }
        match &self.parent {
            None if self.chunks.iter().any(|c| c.inherited) => {
                return Err("chunks are inherited but there is no parent".into())
            }
            Some(p) if p.path.is_empty() || p.path.len() > MAX_PARENT_PATH as usize => {
                return Err(format!("parent path of {} bytes", p.path.len()))
            }
            _ => {}
        }
        Ok(())
    }
}

/// crc32c (hardware-accelerated where the CPU has SSE 4.2).
pub fn checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// `checksum` of a chunk fed in pieces: `checksum_append(checksum(a), b)
/// == checksum(a ++ b)`, starting from 0.
pub fn checksum_append(crc: u32, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, bytes)
}

/// Serialises a state file. The header must be valid (`Header::validate`).
pub fn encode(header: &Header, blob: &[u8]) -> Vec<u8> {
    let c = header.chunks.len();
    let parent_len = header.parent.as_ref().map_or(0, |p| 16 + p.path.len());
    let len = PREAMBLE
        + 24
        + 24 * header.regions.len()
        + 8
        + 5 * c
        + parent_len
        + 12
        + blob.len()
        + TRAILER;
    let version = if header.parent.is_some() {
        FORMAT_VERSION_DIFF
    } else {
        FORMAT_VERSION
    };
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
    out.extend_from_slice(&header.chunk_size.to_le_bytes());
    out.extend_from_slice(&header.image_len.to_le_bytes());
    out.extend_from_slice(&(header.regions.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for r in &header.regions {
        out.extend_from_slice(&r.guest_addr.to_le_bytes());
        out.extend_from_slice(&r.len.to_le_bytes());
        out.extend_from_slice(&r.file_offset.to_le_bytes());
    }
    out.extend_from_slice(&(c as u64).to_le_bytes());
    out.extend(
        header
            .chunks
            .iter()
            .map(|ch| match (ch.zero, ch.inherited) {
                (true, _) => FLAG_ZERO,
                (false, true) => FLAG_PARENT,
                (false, false) => FLAG_DATA,
            }),
    );
    for ch in &header.chunks {
        out.extend_from_slice(&ch.crc.to_le_bytes());
    }
    if let Some(p) = &header.parent {
        out.extend_from_slice(&p.state_crc.to_le_bytes());
        out.extend_from_slice(&p.state_len.to_le_bytes());
        out.extend_from_slice(&(p.path.len() as u32).to_le_bytes());
        out.extend_from_slice(p.path.as_bytes());
    }
    out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(blob).to_le_bytes());
    out.extend_from_slice(blob);
    let crc = checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len(), len);
    out
}

/// Why a state file was refused (the reader adds the path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    BadMagic,
    UnsupportedVersion(u32),
    Truncated { actual: u64, expected: u64 },
    TrailingData { actual: u64, expected: u64 },
    Checksum { stored: u32, computed: u32 },
    BlobChecksum { stored: u32, computed: u32 },
    Malformed(String),
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], DecodeError> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            return Err(DecodeError::Malformed(format!(
                "{what} needs {n} bytes, {left} left"
            )));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Parses and checks a whole state file: magic, version, length, file
/// checksum, then every field. Never panics, whatever the input; allocates
/// no more than the input's size.
pub fn decode(buf: &[u8]) -> Result<(Header, Vec<u8>), DecodeError> {
    let actual = buf.len() as u64;
    if buf.len() < 8 || buf[..8] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if buf.len() < 12 {
        return Err(DecodeError::Truncated {
            actual,
            expected: PREAMBLE as u64,
        });
    }
    let version = le_u32(&buf[8..12]);
    if version != FORMAT_VERSION && version != FORMAT_VERSION_DIFF {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    if buf.len() < PREAMBLE + TRAILER {
        return Err(DecodeError::Truncated {
            actual,
            expected: (PREAMBLE + TRAILER) as u64,
        });
    }
    let mut c = Cursor { buf, pos: 12 };
    if c.u32("reserved")? != 0 {
        return Err(DecodeError::Malformed(
            "reserved preamble field is not 0".into(),
        ));
    }
    let expected = c.u64("file length")?;
    if actual < expected {
        return Err(DecodeError::Truncated { actual, expected });
    }
    if actual > expected {
        return Err(DecodeError::TrailingData { actual, expected });
    }
    let body_end = buf.len() - TRAILER;
    let stored = le_u32(&buf[body_end..]);
    let computed = checksum(&buf[..body_end]);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    let mut c = Cursor {
        buf: &buf[..body_end],
        pos: PREAMBLE,
    };
    let chunk_size = c.u64("chunk size")?;
    let image_len = c.u64("image length")?;
    let nregions = c.u32("region count")?;
    if nregions == 0 || nregions > MAX_REGIONS {
        return Err(DecodeError::Malformed(format!(
            "region count {nregions} (1..={MAX_REGIONS})"
        )));
    }
    if c.u32("reserved")? != 0 {
        return Err(DecodeError::Malformed(
            "reserved header field is not 0".into(),
        ));
    }
    let mut regions = Vec::with_capacity(nregions as usize);
    for _ in 0..nregions {
        regions.push(RegionEntry {
            guest_addr: c.u64("region")?,
            len: c.u64("region")?,
            file_offset: c.u64("region")?,
        });
    }
    let nchunks = c.u64("chunk count")?;
    let flags = c.take(nchunks, "chunk flags")?;
    let crcs = c.take(nchunks.saturating_mul(4), "chunk checksums")?;
    let mut chunks = Vec::with_capacity(flags.len());
    for (i, (&f, crc)) in flags.iter().zip(crcs.chunks_exact(4)).enumerate() {
        let crc = le_u32(crc);
        chunks.push(match f {
            FLAG_DATA => ChunkEntry::data(crc),
            FLAG_ZERO => ChunkEntry {
                crc,
                ..ChunkEntry::zero()
            },
            FLAG_PARENT if version == FORMAT_VERSION_DIFF => ChunkEntry::inherited(crc),
            other => {
                return Err(DecodeError::Malformed(format!(
                    "chunk {i} has unknown flags {other:#04x}"
                )))
            }
        });
    }
    let parent = if version == FORMAT_VERSION_DIFF {
        let state_crc = c.u32("parent content id")?;
        let state_len = c.u64("parent state length")?;
        let plen = c.u32("parent path length")?;
        if plen == 0 || plen > MAX_PARENT_PATH {
            return Err(DecodeError::Malformed(format!(
                "parent path length {plen} (1..={MAX_PARENT_PATH})"
            )));
        }
        let path = std::str::from_utf8(c.take(u64::from(plen), "parent path")?)
            .map_err(|_| DecodeError::Malformed("parent path is not UTF-8".into()))?
            .to_string();
        Some(ParentRef {
            path,
            state_crc,
            state_len,
        })
    } else {
        None
    };
    let blob_len = c.u64("blob length")?;
    let blob_crc = c.u32("blob checksum")?;
    let blob = c.take(blob_len, "VM state blob")?;
    if c.pos != body_end {
        return Err(DecodeError::Malformed(format!(
            "{} unexplained bytes after the blob",
            body_end - c.pos
        )));
    }
    let computed = checksum(blob);
    if computed != blob_crc {
        return Err(DecodeError::BlobChecksum {
            stored: blob_crc,
            computed,
        });
    }
    let header = Header {
        chunk_size,
        image_len,
        regions,
        chunks,
        parent,
    };
    header.validate().map_err(DecodeError::Malformed)?;
    Ok((header, blob.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_in_pieces_equals_checksum_of_the_whole() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (a, b) = data.split_at(4096);
        assert_eq!(checksum_append(checksum_append(0, a), b), checksum(&data));
        assert_eq!(checksum_append(checksum(a), b), checksum(&data));
    }

    fn sample() -> Header {
        Header {
            chunk_size: 4096,
            image_len: 3 * 4096,
            regions: vec![
                RegionEntry {
                    guest_addr: 0,
                    len: 2 * 4096,
                    file_offset: 0,
                },
                RegionEntry {
                    guest_addr: 1 << 32,
                    len: 4096,
                    file_offset: 2 * 4096,
                },
            ],
            chunks: vec![ChunkEntry::data(7), ChunkEntry::zero(), ChunkEntry::data(9)],
            parent: None,
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let h = sample();
        h.validate().unwrap();
        let bytes = encode(&h, b"vcpu state");
        let (h2, blob) = decode(&bytes).unwrap();
        assert_eq!(h2, h);
        assert_eq!(blob, b"vcpu state");
        let pos: Vec<_> = h.chunk_positions().map(|p| p.guest_addr).collect();
        assert_eq!(pos, vec![0, 4096, 1 << 32]);
    }

    #[test]
    fn an_incremental_header_round_trips_as_version_2() {
        let mut h = sample();
        h.chunks[2] = ChunkEntry::inherited(9);
        h.parent = Some(ParentRef {
            path: "snap-000001".into(),
            state_crc: 0xdead_beef,
            state_len: 4242,
        });
        h.validate().unwrap();
        let bytes = encode(&h, b"blob");
        assert_eq!(le_u32(&bytes[8..12]), FORMAT_VERSION_DIFF);
        let (h2, blob) = decode(&bytes).unwrap();
        assert_eq!(h2, h);
        assert_eq!(blob, b"blob");
        // A full header stays version 1.
        assert_eq!(le_u32(&encode(&sample(), b"b")[8..12]), FORMAT_VERSION);
        let mut orphan = sample();
        orphan.chunks[0] = ChunkEntry::inherited(7);
        assert_eq!(
            orphan.validate().unwrap_err(),
            "chunks are inherited but there is no parent"
        );
    }

    #[test]
    fn validate_rejects_overlap_and_misalignment() {
        let mut h = sample();
        h.regions[1].file_offset = 4096;
        assert_eq!(h.validate().unwrap_err(), "regions overlap in file ranges");
        let mut h = sample();
        h.regions[0].len = 100;
        assert!(h.validate().unwrap_err().contains("not chunk aligned"));
        let mut h = sample();
        h.chunks.pop();
        assert_eq!(h.validate().unwrap_err(), "2 chunks listed, regions hold 3");
    }
}
