//! Saving memory into the image: what a unit holds (a hole, or data and
//! its checksum) and the writes of its populated pages. Shared by the
//! async-fork paths (`shared.rs`), stop-the-world (in the pause) and the
//! fork baseline's child (`copy_and_write_chunk`), so every mode writes
//! the same bytes the same way.

use std::sync::OnceLock;

pub(crate) use crate::chunk_table::Record;
use crate::memory::{copy_populated, Pagemap};
use crate::persist::format::{checksum, checksum_append};
use crate::persist::{ImageFile, PersistError};
use crate::region::{CHUNK_SIZE, PAGES_PER_CHUNK, PAGE_SIZE, ZERO_PAGE};

/// crc32c of `len` zero bytes (`len` a whole number of pages; a page and a
/// chunk are computed once).
pub(crate) fn zero_crc(len: u64) -> u32 {
    static CRCS: OnceLock<(u32, u32)> = OnceLock::new();
    let pages = |n: u64| (0..n).fold(0, |c, _| checksum_append(c, &ZERO_PAGE));
    let (page, chunk) = *CRCS.get_or_init(|| (checksum(&ZERO_PAGE), pages(PAGES_PER_CHUNK as u64)));
    match len {
        PAGE_SIZE => page,
        CHUNK_SIZE => chunk,
        _ => pages(len / PAGE_SIZE),
    }
}

/// crc32c of `a ++ b` from `crc32c(a)` and `crc32c(b)`, `b` one page long.
/// `crc32c_combine` rebuilds its GF(2) operator on every call (microseconds:
/// seconds for a sync-wp snapshot's 2^18 pages per GiB); the operator for
/// one page of zeros is linear, so it is kept as four byte tables.
pub(crate) fn combine_page(crc1: u32, crc2: u32) -> u32 {
    static TABLES: OnceLock<Box<[[u32; 256]; 4]>> = OnceLock::new();
    let t = TABLES.get_or_init(|| {
        let mut t = Box::new([[0u32; 256]; 4]);
        for (k, table) in t.iter_mut().enumerate() {
            for (b, e) in table.iter_mut().enumerate() {
                *e = crc32c::crc32c_combine((b as u32) << (8 * k), 0, PAGE_SIZE as usize);
            }
        }
        t
    });
    t[0][(crc1 & 0xff) as usize]
        ^ t[1][((crc1 >> 8) & 0xff) as usize]
        ^ t[2][((crc1 >> 16) & 0xff) as usize]
        ^ t[3][(crc1 >> 24) as usize]
        ^ crc2
}

fn is_all_zero(b: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets
    // the aligned middle part of the slice.
    let (head, mid, tail) = unsafe { b.align_to::<u128>() };
    head.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// What a unit holds, from its pages: `pop` marks the populated ones
/// (never-touched pages read as zero and are not read). A unit whose
/// populated pages hold only zeros is a hole too.
///
/// # Safety
/// `base` must be readable for `pop.len()` pages where `pop` is true, and
/// not written meanwhile.
pub(crate) unsafe fn examine(base: *const u8, pop: &[bool]) -> Record {
    if !pop.iter().any(|&p| p) {
        return Record::Zero;
    }
    let page = PAGE_SIZE as usize;
    let mut crc = 0u32;
    let mut i = 0;
    while i < pop.len() {
        if !pop[i] {
            crc = checksum_append(crc, &ZERO_PAGE);
            i += 1;
            continue;
        }
        let start = i;
        while i < pop.len() && pop[i] {
            i += 1;
        }
        // SAFETY: pages start..i are populated and readable (contract).
        let run = unsafe { std::slice::from_raw_parts(base.add(start * page), (i - start) * page) };
        crc = checksum_append(crc, run);
    }
    if crc == zero_crc(pop.len() as u64 * PAGE_SIZE) {
        // Likely all zero (touched but never written, e.g. a zeroed heap):
        // check, and keep it a hole if so.
        let zero = pop.iter().enumerate().filter(|(_, &p)| p).all(|(k, _)| {
            // SAFETY: page k is populated and readable (contract).
            is_all_zero(unsafe { std::slice::from_raw_parts(base.add(k * page), page) })
        });
        if zero {
            return Record::Zero;
        }
    }
    Record::Data(crc)
}

/// Writes the pages marked in `write` (of the chunk at host `host`) to the
/// image at `image_offset` + their offset, one write per run of adjacent
/// pages. Returns the bytes written.
///
/// # Safety
/// The marked pages must be readable and not written until this returns.
pub(crate) unsafe fn write_runs(
    image: &ImageFile,
    host: u64,
    image_offset: u64,
    write: &[bool; PAGES_PER_CHUNK],
) -> Result<u64, PersistError> {
    let mut written = 0;
    let mut i = 0;
    while i < PAGES_PER_CHUNK {
        if !write[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < PAGES_PER_CHUNK && write[i] {
            i += 1;
        }
        let off = start as u64 * PAGE_SIZE;
        let len = (i - start) as u64 * PAGE_SIZE;
        // SAFETY: forwarded from this function's contract.
        unsafe { image.write_from((host + off) as *const u8, len as usize, image_offset + off) }?;
        written += len;
    }
    Ok(written)
}

/// A 2 MiB, page-aligned buffer for `copy_and_write_chunk`.
#[derive(Debug)]
pub struct Bounce {
    map: crate::memory::Mapping,
}

impl Bounce {
    pub fn new() -> Result<Bounce, crate::Error> {
        let map = crate::memory::Mapping::new(CHUNK_SIZE)?;
        map.populate(0, CHUNK_SIZE, crate::Phase::Worker)?;
        Ok(Bounce { map })
    }
}

/// Saves one chunk by copying it first: its populated pages (per
/// `pagemap`) into `bounce`, then the whole chunk from there to the image
/// if it holds data. Returns what the image holds for it.
///
/// For the fork baseline's child: its view of guest RAM is copy-on-write
/// shared with the running VM, and an `O_DIRECT` write straight from such
/// pages makes the kernel unshare (copy) every one of them first (measured:
/// 1 GiB written from a forked child grew the host's anonymous memory by
/// 0.8-1 GiB), so the child goes through one 2 MiB buffer instead.
///
/// # Safety
/// The chunk at `host` must be mapped and not written meanwhile.
pub unsafe fn copy_and_write_chunk(
    image: &ImageFile,
    pagemap: &Pagemap,
    bounce: &mut Bounce,
    host: u64,
    image_offset: u64,
) -> Result<Record, crate::Error> {
    let pop = pagemap.populated(host, PAGES_PER_CHUNK, crate::Phase::Worker)?;
    if !pop.iter().any(|&p| p) {
        return Ok(Record::Zero);
    }
    let dst = bounce.map.ptr(0);
    // SAFETY: the chunk is mapped and still (contract); the bounce buffer
    // is 2 MiB and ours alone (&mut).
    unsafe { copy_populated(&pop, host, dst, PAGES_PER_CHUNK, true) };
    let all = [true; PAGES_PER_CHUNK];
    // SAFETY: the whole buffer is readable and written by nobody else.
    let rec = unsafe { examine(dst, &all) };
    if rec != Record::Zero {
        // SAFETY: as above.
        unsafe { image.write_from(dst, CHUNK_SIZE as usize, image_offset) }.map_err(|source| {
            crate::Error::Write {
                phase: crate::Phase::Worker,
                source,
            }
        })?;
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::format::checksum;

    #[test]
    fn combine_page_equals_the_crc_of_the_concatenation() {
        let mut data = vec![0u8; 3 * PAGE_SIZE as usize];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 131 % 251) as u8;
        }
        let page = PAGE_SIZE as usize;
        let mut crc = checksum(&data[..page]);
        for p in 1..3 {
            crc = combine_page(crc, checksum(&data[p * page..(p + 1) * page]));
        }
        assert_eq!(crc, checksum(&data));
        for x in [0u32, 1, 0xdead_beef, u32::MAX] {
            assert_eq!(
                combine_page(x, 7),
                crc32c::crc32c_combine(x, 7, page),
                "{x:#x}"
            );
        }
    }

    #[test]
    fn examine_tells_holes_zero_pages_and_data() {
        let mut buf = vec![0u8; 3 * PAGE_SIZE as usize + 4096];
        let off = buf.as_ptr().align_offset(4096);
        let base = buf[off..].as_mut_ptr();
        // SAFETY: 3 pages inside `buf`.
        let rec = |pop: &[bool]| unsafe { examine(base, pop) };
        assert_eq!(rec(&[false, false, false]), Record::Zero);
        assert_eq!(rec(&[true, false, true]), Record::Zero, "zero bytes");
        // SAFETY: in bounds of page 2.
        unsafe { *base.add(2 * 4096 + 5) = 9 };
        let mut want = vec![0u8; 3 * 4096];
        want[2 * 4096 + 5] = 9;
        assert_eq!(rec(&[true, false, true]), Record::Data(checksum(&want)));
        assert_eq!(
            rec(&[false, true, false]),
            Record::Zero,
            "unpopulated pages are never read"
        );
        let z: Vec<u8> = vec![0; CHUNK_SIZE as usize];
        assert_eq!(zero_crc(CHUNK_SIZE), checksum(&z));
        assert_eq!(zero_crc(PAGE_SIZE), checksum(&z[..4096]));
    }
}
