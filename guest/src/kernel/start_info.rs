//! The PVH `hvm_start_info` handed over by the loader (EBX at entry).
//!
//! Nothing in it is trusted: every address is checked against the memory
//! we can read (the identity map) before it is dereferenced, counts are
//! clamped, and what we need is copied into a [`BootInfo`] owned by the
//! kernel, so the loader's copies may be overwritten by the heap later.

use core::mem::size_of;

/// `hvm_start_info.magic`.
const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Memory map type for usable RAM (e820 numbering).
pub const MEMMAP_TYPE_RAM: u32 = 1;
/// Most memory map entries we keep.
pub const MAX_MEMMAP: usize = 128;
/// Longest command line we keep.
pub const MAX_CMDLINE: usize = 2048;

/// `struct hvm_start_info` (version >= 1).
#[repr(C)]
#[derive(Clone, Copy)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// `struct hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

/// What the kernel keeps from the start info.
pub struct BootInfo {
    memmap: [MemmapEntry; MAX_MEMMAP],
    memmap_len: usize,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
}

/// Why the start info was rejected.
#[derive(Clone, Copy)]
pub enum StartInfoError {
    BadAddress(u64),
    BadMagic(u32),
}

impl core::fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadAddress(addr) => write!(f, "not in mapped memory: {addr:#x}"),
            Self::BadMagic(magic) => write!(f, "bad magic {magic:#x}"),
        }
    }
}

impl BootInfo {
    pub const fn empty() -> Self {
        Self {
            memmap: [MemmapEntry {
                addr: 0,
                size: 0,
                kind: 0,
                reserved: 0,
            }; MAX_MEMMAP],
            memmap_len: 0,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
        }
    }

    /// Reads the start info at physical address `paddr`. Parts that are
    /// out of range are dropped (empty memory map or command line) rather
    /// than failing the boot; only an unreadable or unrecognised header is
    /// an error.
    pub fn parse(paddr: u64, readable_end: u64) -> Result<Self, StartInfoError> {
        if !readable(paddr, size_of::<HvmStartInfo>() as u64, readable_end) {
            return Err(StartInfoError::BadAddress(paddr));
        }
        // SAFETY: the range was checked to lie in identity-mapped memory;
        // read_unaligned because the loader promises no alignment we rely on.
        let info = unsafe { (paddr as *const HvmStartInfo).read_unaligned() };
        if info.magic != START_INFO_MAGIC {
            return Err(StartInfoError::BadMagic(info.magic));
        }
        let mut boot = Self::empty();
        // Version 0 has no memory map fields.
        if info.version >= 1 {
            boot.read_memmap(info.memmap_paddr, info.memmap_entries, readable_end);
        }
        boot.read_cmdline(info.cmdline_paddr, readable_end);
        Ok(boot)
    }

    fn read_memmap(&mut self, paddr: u64, entries: u32, readable_end: u64) {
        let count = (entries as usize).min(MAX_MEMMAP);
        let bytes = (count * size_of::<MemmapEntry>()) as u64;
        if count == 0 || !readable(paddr, bytes, readable_end) {
            return;
        }
        let table = paddr as *const MemmapEntry;
        for i in 0..count {
            // SAFETY: entry i lies inside the checked range.
            self.memmap[i] = unsafe { table.add(i).read_unaligned() };
        }
        self.memmap_len = count;
    }

    fn read_cmdline(&mut self, paddr: u64, readable_end: u64) {
        if paddr == 0 || paddr >= readable_end {
            return;
        }
        let limit = ((readable_end - paddr) as usize).min(MAX_CMDLINE);
        let mut len = 0;
        while len < limit {
            // SAFETY: paddr + len < readable_end, identity-mapped memory.
            let byte = unsafe { ((paddr as usize + len) as *const u8).read_volatile() };
            if byte == 0 {
                break;
            }
            self.cmdline[len] = byte;
            len += 1;
        }
        self.cmdline_len = len;
    }

    pub fn memmap(&self) -> &[MemmapEntry] {
        &self.memmap[..self.memmap_len]
    }

    /// The command line; if it is not UTF-8, the valid prefix.
    pub fn cmdline(&self) -> &str {
        let bytes = &self.cmdline[..self.cmdline_len];
        match core::str::from_utf8(bytes) {
            Ok(s) => s,
            // valid_up_to() is the length of the longest valid prefix.
            Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        }
    }

    /// Usable RAM regions.
    pub fn ram(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.memmap()
            .iter()
            .filter(|e| e.kind == MEMMAP_TYPE_RAM && e.size > 0)
            .map(|e| (e.addr, e.addr.saturating_add(e.size)))
    }

    /// Total usable RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram().map(|(start, end)| end - start).sum()
    }

    /// End of the highest RAM region.
    pub fn ram_end(&self) -> u64 {
        self.ram().map(|(_, end)| end).max().unwrap_or(0)
    }
}

/// Whether `[addr, addr + len)` is non-null and inside the identity map.
fn readable(addr: u64, len: u64, readable_end: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|end| end <= readable_end)
}
