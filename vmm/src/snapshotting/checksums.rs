//! Test hooks that compare a snapshot with the guest memory it was taken
//! of, bit for bit: chunk checksums of guest RAM taken in the pause, and of
//! a snapshot directory's image.

use std::path::Path;

use snapvm_snapshot::{Region, CHUNK_SIZE};

/// crc32c of every 2 MiB chunk of `regions`' host memory, in order, as the
/// snapshot image holds it: pages never touched count as zero and are not
/// read — after `Engine::arm` guest RAM is registered for first-touch
/// faults, and reading 100 k untouched pages one handler round trip at a
/// time took seconds in the pause. Call only while nothing writes the
/// memory. A pagemap failure is reported as no checksums.
pub(super) fn checksum_chunks(regions: &[Region]) -> Option<Vec<u32>> {
    const PAGES: usize = (CHUNK_SIZE / snapvm_snapshot::PAGE_SIZE) as usize;
    static ZERO: [u8; snapvm_snapshot::PAGE_SIZE as usize] =
        [0; snapvm_snapshot::PAGE_SIZE as usize];
    let pagemap = snapvm_snapshot::Pagemap::open()
        .map_err(|e| tracing::warn!("chunk checksums: {e}"))
        .ok()?;
    let mut out = Vec::new();
    for r in regions {
        let mut at = r.host_addr;
        while at < r.host_addr + r.len {
            let pages =
                (((r.host_addr + r.len - at) / snapvm_snapshot::PAGE_SIZE) as usize).min(PAGES);
            let populated = pagemap
                .populated(at, pages, snapvm_snapshot::Phase::Sync)
                .map_err(|e| tracing::warn!("chunk checksums: {e}"))
                .ok()?;
            let mut crc = 0u32;
            for (p, &present) in populated.iter().take(pages).enumerate() {
                let page = at + p as u64 * snapvm_snapshot::PAGE_SIZE;
                let bytes: &[u8] = if present {
                    // SAFETY: the page lies in live guest RAM (the VM owns
                    // the mapping and outlives this call), is populated (so
                    // reading it does not fault), and the vCPUs are paused.
                    unsafe {
                        std::slice::from_raw_parts(
                            page as *const u8,
                            snapvm_snapshot::PAGE_SIZE as usize,
                        )
                    }
                } else {
                    &ZERO
                };
                crc = snapvm_snapshot::persist::format::checksum_append(crc, bytes);
            }
            out.push(crc);
            at += pages as u64 * snapvm_snapshot::PAGE_SIZE;
        }
    }
    Some(out)
}

/// crc32c of every 2 MiB chunk of an opened snapshot's memory (via
/// `map_all`), in image order: compare with
/// [`SnapshotHandle::sync_checksums`].
pub fn snapshot_checksums(dir: &Path) -> Result<Vec<u32>, snapvm_snapshot::PersistError> {
    let opened = snapvm_snapshot::SnapshotDir::open(dir)?;
    let mut out = Vec::new();
    for m in opened.map_all()? {
        out.extend(
            m.as_slice()
                .chunks(CHUNK_SIZE as usize)
                .map(snapvm_snapshot::persist::format::checksum),
        );
    }
    Ok(out)
}
