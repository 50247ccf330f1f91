//! Guest memory for a restored VM: private copies of a saved VM's regions
//! ([`ram_from_copies`]) or a snapshot's memory image mapped lazily
//! ([`ram_from_mapped`]), and the check that it has the saved layout.

use std::sync::Arc;

use snapvm_snapshot::persist::MappedRegion;
use vm_memory::{Bytes, GuestAddress};

use super::{MemoryRegionState, VmStateError};
use crate::memory::GuestRam;

/// Guest RAM holding copies of a saved VM's regions (one `Vec` per region
/// of `layout`, e.g. read out of `Vm::memory()` while paused). The memory
/// is fresh anonymous memory, THP-advised like a booted VM's.
pub fn ram_from_copies(
    layout: &[MemoryRegionState],
    copies: &[Vec<u8>],
) -> Result<GuestRam, VmStateError> {
    if layout.len() != copies.len() {
        return Err(VmStateError::Layout(format!(
            "{} regions in the layout, {} copies",
            layout.len(),
            copies.len()
        )));
    }
    let total: u64 = layout.iter().map(|r| r.len).sum();
    let ram = GuestRam::new(total)?;
    check_layout(&ram, layout)?;
    for (r, copy) in layout.iter().zip(copies) {
        if copy.len() as u64 != r.len {
            return Err(VmStateError::Layout(format!(
                "region at {:#x}: {} bytes saved, {} copied",
                r.guest_addr,
                r.len,
                copy.len()
            )));
        }
        ram.memory()
            .write_slice(copy, GuestAddress(r.guest_addr))
            .map_err(|e| VmStateError::Layout(format!("region at {:#x}: {e}", r.guest_addr)))?;
    }
    Ok(ram)
}

/// Guest RAM directly over a snapshot's mapped memory image (lazy,
/// copy-on-write `MAP_PRIVATE`): pages load on first touch. The mappings
/// live as long as the returned GuestRam. (Such memory is file-backed, so
/// the async-fork engine, which needs anonymous memory, cannot snapshot
/// the restored VM.)
pub fn ram_from_mapped(regions: Vec<MappedRegion>) -> Result<GuestRam, VmStateError> {
    let list: Vec<(u64, *mut u8, usize)> = regions
        .iter()
        .map(|r| (r.guest_addr, r.as_ptr(), r.len()))
        .collect();
    // SAFETY: each MappedRegion is a live read-write MAP_PRIVATE mapping of
    // `len` bytes from mmap (so page aligned), regions are distinct
    // mappings, and they stay mapped until `owner` (which holds them all)
    // is dropped with the last clone of the GuestRam.
    let ram = unsafe { GuestRam::from_host_regions(&list, Arc::new(regions)) }?;
    Ok(ram)
}

pub(crate) fn check_layout(
    ram: &GuestRam,
    layout: &[MemoryRegionState],
) -> Result<(), VmStateError> {
    let have: Vec<MemoryRegionState> = ram
        .regions()
        .iter()
        .map(|r| MemoryRegionState {
            guest_addr: r.guest_addr,
            len: r.len as u64,
        })
        .collect();
    if have != layout {
        return Err(VmStateError::Layout(format!(
            "saved {layout:x?}, given {have:x?}"
        )));
    }
    Ok(())
}
