//! Guest RAM: anonymous host memory, 2 MiB aligned and advised for THP, so
//! that one 2 MiB guest chunk is one host PMD entry (what the snapshot engine
//! write-protects with userfaultfd) and one stage-2 huge mapping in KVM.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::layout::{self, HUGE_PAGE_SIZE};

/// Errors while setting up guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest RAM: {source}")]
    Mmap { size: u64, source: std::io::Error },
    #[error("cannot wrap guest RAM for vm-memory: {0}")]
    Region(String),
    #[error("cannot register KVM memory slot {slot} ({size} bytes at {gpa:#x}): {source}")]
    Memslot {
        slot: u32,
        gpa: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
    #[error("guest RAM size {0} bytes does not fit in this host's address space")]
    TooBig(u64),
    #[error(
        "--hugepages hugetlbfs needs {needed} free 2 MiB huge pages for {size} bytes of guest RAM, and {free} are free: reserve them first (as root: sysctl vm.nr_hugepages={wanted})"
    )]
    HugePages {
        size: u64,
        needed: u64,
        free: u64,
        wanted: u64,
    },
}

/// One host mapping backing one guest RAM region. Owns the mapping: it is
/// unmapped when the last [`GuestRam`] clone goes away.
#[derive(Debug)]
struct HostMapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain anonymous memory; the pointer is only an
// address, and all accesses go through vm-memory's volatile accessors or
// through KVM / the snapshot engine, which synchronise by themselves.
unsafe impl Send for HostMapping {}
// SAFETY: see above.
unsafe impl Sync for HostMapping {}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` is exactly the range we mapped in
        // `map_aligned` and no vm-memory region built on it outlives us
        // (GuestRam keeps this mapping alive as long as its memory).
        unsafe {
            libc::munmap(self.addr.cast(), self.len);
        }
    }
}

/// Where one guest RAM region lives in the host: what the snapshot engine
/// needs to write-protect and copy it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRegion {
    /// KVM memslot number.
    pub slot: u32,
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Host virtual address of the first byte.
    pub host_addr: usize,
    /// Length in bytes (a multiple of 2 MiB).
    pub len: usize,
}

/// Guest RAM: the vm-memory view plus the host mappings behind it.
#[derive(Clone, Debug)]
pub struct GuestRam {
    // Field order matters: the vm-memory view must drop before the mappings.
    mem: GuestMemoryMmap,
    regions: Vec<HostRegion>,
    /// A restored VM's memory still loading from its snapshot (or done);
    /// goes before the mappings it loads into.
    loader: Option<Arc<snapvm_snapshot::lazy::Loader>>,
    _mappings: Arc<Vec<HostMapping>>,
    /// Owner of memory this GuestRam does not map itself (see
    /// [`GuestRam::from_host_regions`]).
    _external: Option<Arc<dyn std::fmt::Debug + Send + Sync>>,
    backing: PageBacking,
}

impl GuestRam {
    /// Allocates `size` bytes (already rounded to 2 MiB) laid out around the
    /// MMIO hole, advised for transparent huge pages.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::with_backing(size, PageBacking::Huge)
    }

    /// As [`GuestRam::new`] with an explicit page backing (`--hugepages`).
    pub fn with_backing(size: u64, backing: PageBacking) -> Result<Self, MemoryError> {
        if backing == PageBacking::Huge && thp_mode().as_deref() == Some("never") {
            tracing::warn!(
                "transparent huge pages are off on this host (transparent_hugepage=never): guest RAM gets 4 KiB pages and snapshots pause longer; reserve huge pages and use --hugepages hugetlbfs, or enable THP (madvise)"
            );
        }
        let mut mappings = Vec::new();
        let mut regions = Vec::new();
        let mut vm_regions = Vec::new();
        for (slot, range) in layout::ram_ranges(size).into_iter().enumerate() {
            let len = usize::try_from(range.len).map_err(|_| MemoryError::TooBig(size))?;
            let mapping = match backing {
                PageBacking::HugeTlb => map_hugetlb(len)?,
                _ => map_aligned(len, backing).map_err(|source| MemoryError::Mmap {
                    size: range.len,
                    source,
                })?,
            };
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            let flags = match backing {
                PageBacking::HugeTlb => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                _ => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            };
            // SAFETY: `mapping` is a live mapping of `len` bytes with these
            // protections and flags, and it outlives the region (see the
            // field order of GuestRam).
            let mmap = unsafe { MmapRegion::build_raw(mapping.addr, len, prot, flags) }
                .map_err(|e| MemoryError::Region(e.to_string()))?;
            let region =
                GuestRegionMmap::new(mmap, GuestAddress(range.start)).ok_or_else(|| {
                    MemoryError::Region(format!("region at {:#x} overflows", range.start))
                })?;
            regions.push(HostRegion {
                slot: slot as u32,
                guest_addr: range.start,
                host_addr: mapping.addr as usize,
                len,
            });
            vm_regions.push(region);
            mappings.push(mapping);
        }
        let mem = GuestMemoryMmap::from_regions(vm_regions)
            .map_err(|e| MemoryError::Region(e.to_string()))?;
        Ok(GuestRam {
            mem,
            regions,
            _mappings: Arc::new(mappings),
            _external: None,
            loader: None,
            backing,
        })
    }

    /// Guest RAM over memory mapped by someone else, e.g. a snapshot's
    /// memory image (`MAP_PRIVATE` of a file) for restore. `regions` are
    /// `(guest_addr, host_addr, len)`; `owner` keeps the mappings alive and
    /// is dropped with the last clone of this GuestRam. Memslots are numbered
    /// in `regions` order.
    ///
    /// # Safety
    /// Each host range must be mapped readable and writable, page aligned,
    /// not aliased by other guest RAM, and stay mapped as long as `owner`
    /// lives.
    pub unsafe fn from_host_regions(
        regions: &[(u64, *mut u8, usize)],
        owner: Arc<dyn std::fmt::Debug + Send + Sync>,
    ) -> Result<Self, MemoryError> {
        let mut host = Vec::with_capacity(regions.len());
        let mut vm_regions = Vec::with_capacity(regions.len());
        for (slot, &(guest_addr, addr, len)) in regions.iter().enumerate() {
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            // SAFETY: the caller guarantees a live read-write mapping of
            // `len` bytes at `addr` that outlives `owner`, which we keep.
            let mmap = unsafe { MmapRegion::build_raw(addr, len, prot, libc::MAP_PRIVATE) }
                .map_err(|e| MemoryError::Region(e.to_string()))?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(guest_addr)).ok_or_else(|| {
                MemoryError::Region(format!("region at {guest_addr:#x} overflows"))
            })?;
            host.push(HostRegion {
                slot: slot as u32,
                guest_addr,
                host_addr: addr as usize,
                len,
            });
            vm_regions.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(vm_regions)
            .map_err(|e| MemoryError::Region(e.to_string()))?;
        Ok(GuestRam {
            mem,
            regions: host,
            _mappings: Arc::new(Vec::new()),
            _external: Some(owner),
            loader: None,
            backing: PageBacking::Small,
        })
    }

    /// How the host backs this RAM (`--hugepages`).
    pub fn backing(&self) -> PageBacking {
        self.backing
    }

    /// The vm-memory view, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Restore: the memory loads lazily through `loader` (which must have
    /// registered exactly these regions).
    pub fn set_loader(&mut self, loader: Arc<snapvm_snapshot::lazy::Loader>) {
        self.loader = Some(loader);
    }

    /// The lazy load of a restored VM's memory, if it was restored.
    pub fn loader(&self) -> Option<&Arc<snapvm_snapshot::lazy::Loader>> {
        self.loader.as_ref()
    }

    /// Whether the RAM is snapvm's own anonymous memory (not memory mapped
    /// by someone else, e.g. a restored snapshot's image file): the
    /// snapshot engine needs anonymous memory.
    pub fn is_anonymous(&self) -> bool {
        self._external.is_none()
    }

    /// Host location of every RAM region.
    pub fn regions(&self) -> &[HostRegion] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.len as u64).sum()
    }

    /// Registers every region as a KVM memslot.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for r in &self.regions {
            let region = kvm_userspace_memory_region {
                slot: r.slot,
                flags: 0,
                guest_phys_addr: r.guest_addr,
                memory_size: r.len as u64,
                userspace_addr: r.host_addr as u64,
            };
            // SAFETY: the host range is a live mapping owned by `self`, and
            // the VM (which owns a clone of this GuestRam) does not outlive it.
            unsafe { vm.set_user_memory_region(region) }.map_err(|source| {
                MemoryError::Memslot {
                    slot: r.slot,
                    gpa: r.guest_addr,
                    size: r.len as u64,
                    source,
                }
            })?;
        }
        Ok(())
    }
}

/// How guest RAM is backed in the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PageBacking {
    /// `MADV_HUGEPAGE`: transparent huge pages (one 2 MiB chunk = one PMD).
    #[default]
    Huge,
    /// `MADV_NOHUGEPAGE`: 4 KiB pages only, like an ordinary process heap
    /// (what the fork baseline copies page table by page table).
    Small,
    /// 2 MiB pages from the hugetlbfs pool (`MAP_HUGETLB`), reserved when
    /// the VM starts: huge pages on hosts that run with THP off.
    HugeTlb,
}

impl PageBacking {
    /// `true` for [`PageBacking::Huge`].
    pub fn from_hugepages(on: bool) -> Self {
        if on {
            PageBacking::Huge
        } else {
            PageBacking::Small
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PageBacking::Huge => "huge",
            PageBacking::Small => "4k",
            PageBacking::HugeTlb => "hugetlbfs",
        }
    }

    /// What `GET /vm/config`, metrics and logs call it.
    pub fn label(self) -> &'static str {
        match self {
            PageBacking::Huge => "thp",
            PageBacking::Small => "4k",
            PageBacking::HugeTlb => "hugetlbfs",
        }
    }

    /// Whether a 2 MiB chunk of guest RAM is one host page table entry.
    pub fn is_huge(self) -> bool {
        self != PageBacking::Small
    }
}

/// Transparent huge pages as the host has them: `always`, `madvise` or
/// `never` (None if the host does not say).
pub fn thp_mode() -> Option<String> {
    let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    let start = s.find('[')?;
    let end = s[start..].find(']')?;
    Some(s[start + 1..start + end].to_string())
}

/// Huge pages nobody has reserved (`HugePages_Free` minus
/// `HugePages_Rsvd`) and the default huge page size in bytes, from
/// /proc/meminfo.
fn hugetlb_free() -> (u64, u64) {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (
        field("HugePages_Free:").saturating_sub(field("HugePages_Rsvd:")),
        field("Hugepagesize:") * 1024,
    )
}

/// Maps `len` bytes of hugetlbfs memory (2 MiB pages, aligned by the
/// kernel), reserving the pages now: a pool too small fails here with a
/// message saying what to reserve, never with a SIGBUS in the guest later.
fn map_hugetlb(len: usize) -> Result<HostMapping, MemoryError> {
    const MAP_HUGE_2MB: i32 = 21 << libc::MAP_HUGE_SHIFT;
    let size = len as u64;
    let needed = size.div_ceil(HUGE_PAGE_SIZE);
    let (free, page) = hugetlb_free();
    let short = |free: u64| MemoryError::HugePages {
        size,
        needed,
        free,
        wanted: needed.saturating_sub(free) + hugetlb_total(),
    };
    if page != 0 && page != HUGE_PAGE_SIZE {
        tracing::debug!("default huge page size is {page} bytes; asking for 2 MiB pages");
    }
    if free < needed {
        return Err(short(free));
    }
    // SAFETY: an anonymous private hugetlb mapping at a kernel-chosen
    // address; no existing memory is affected. Checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | MAP_HUGE_2MB,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOMEM) {
            return Err(short(hugetlb_free().0));
        }
        return Err(MemoryError::Mmap { size, source: e });
    }
    Ok(HostMapping {
        addr: p.cast(),
        len,
    })
}

/// `HugePages_Total` from /proc/meminfo.
fn hugetlb_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Total:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Maps `len` bytes of anonymous memory at a 2 MiB aligned address: map
/// `len + 2 MiB`, then trim the unaligned head and the tail.
fn map_aligned(len: usize, backing: PageBacking) -> std::io::Result<HostMapping> {
    let align = HUGE_PAGE_SIZE as usize;
    let total = len
        .checked_add(align)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: anonymous private mapping at a kernel-chosen address; no
    // existing memory is affected. The result is checked below.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = (start + align - 1) & !(align - 1);
    let head = aligned - start;
    let tail = total - head - len;
    // SAFETY: both ranges lie inside the mapping we just created and nothing
    // references them.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    let addr = aligned as *mut u8;
    let (advice, name) = match backing {
        PageBacking::Huge => (libc::MADV_HUGEPAGE, "MADV_HUGEPAGE"),
        PageBacking::Small | PageBacking::HugeTlb => (libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE"),
    };
    // SAFETY: advice on our own mapping; failure only means no THP (e.g.
    // THP disabled on the host), which is slower but correct.
    let rc = unsafe { libc::madvise(addr.cast(), len, advice) };
    if rc != 0 {
        tracing::warn!(
            "madvise({name}) failed: {}; guest RAM page size is the host's default",
            std::io::Error::last_os_error()
        );
    }
    Ok(HostMapping { addr, len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn ram_is_aligned_and_usable() {
        let ram = GuestRam::new(8 << 20).unwrap();
        assert_eq!(ram.regions().len(), 1);
        assert_eq!(ram.regions()[0].host_addr % (2 << 20), 0);
        assert_eq!(ram.size(), 8 << 20);
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let v: u32 = ram.memory().read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
        assert!(ram.memory().read_obj::<u32>(GuestAddress(8 << 20)).is_err());
    }

    /// `AnonHugePages` (KiB) of the smaps entry containing `addr`.
    fn anon_huge_kib(addr: usize) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = (a..b).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("AnonHugePages:") {
                    return v.trim().trim_end_matches("kB").trim().parse().ok();
                }
            }
        }
        None
    }

    #[test]
    fn small_backing_has_no_huge_pages() {
        let ram = GuestRam::with_backing(16 << 20, PageBacking::Small).unwrap();
        let r = ram.regions()[0];
        // SAFETY: the region is 16 MiB of our own read-write memory.
        unsafe { std::ptr::write_bytes(r.host_addr as *mut u8, 1, r.len) };
        assert_eq!(anon_huge_kib(r.host_addr), Some(0));
    }

    #[test]
    fn big_ram_has_two_regions_around_the_hole() {
        // MAP_NORESERVE: nothing is touched, so this costs no host memory.
        let ram = GuestRam::new(5 << 30).unwrap();
        let r = ram.regions();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].guest_addr, 4 << 30);
        assert_eq!(r[1].len, 2 << 30);
        assert_eq!(r[1].host_addr % (2 << 20), 0);
        assert!(ram.memory().find_region(GuestAddress(3 << 30)).is_none());
        assert!(ram.memory().find_region(GuestAddress(4 << 30)).is_some());
    }
}
