//! Host memory helpers: the destination ("the snapshot VM's memory") and the
//! pool that keeps one ready between snapshots, the pagemap reader that tells populated pages from never-touched ones, and the
//! chunk copy itself.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Phase};
use crate::region::{CHUNK_SIZE, PAGES_PER_CHUNK, PAGE_SIZE};

/// `MADV_POPULATE_WRITE` (Linux 5.14); not in every libc version we build with.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// An anonymous private mapping, 2 MiB aligned, THP-advised, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    base: *mut u8,
    len: usize,
    map_base: *mut libc::c_void,
    map_len: usize,
    /// May hold bytes of an earlier snapshot (false: untouched or populated
    /// by `DestPool::prepare`, so it reads as zero).
    dirty: bool,
}

// SAFETY: the mapping is plain memory owned by this struct; concurrent access
// is coordinated by the chunk table (one writer per chunk, readers after the
// snapshot completes).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(crate) fn new(len: u64) -> Result<Mapping, Error> {
        let map_len = (len + CHUNK_SIZE) as usize;
        // SAFETY: anonymous private mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Memory {
                phase: Phase::Sync,
                op: "mmap destination",
                start: 0,
                len,
                source: io::Error::last_os_error(),
            });
        }
        // Over-map by one chunk and align up so THP can back every chunk.
        let base = ((p as usize + CHUNK_SIZE as usize - 1) & !(CHUNK_SIZE as usize - 1)) as *mut u8;
        // SAFETY: advising a range inside our own mapping. Failure (THP
        // disabled) only costs speed, so the result is ignored on purpose.
        unsafe { libc::madvise(base.cast(), len as usize, libc::MADV_HUGEPAGE) };
        Ok(Mapping {
            base,
            len: len as usize,
            map_base: p,
            map_len,
            dirty: false,
        })
    }

    /// Start of `[offset, ..)` inside the mapping.
    pub(crate) fn ptr(&self, offset: u64) -> *mut u8 {
        debug_assert!(offset <= self.len as u64);
        // SAFETY: offset is within the mapping (callers index by chunk).
        unsafe { self.base.add(offset as usize) }
    }

    pub(crate) fn populate(&self, offset: u64, len: u64, phase: Phase) -> Result<(), Error> {
        debug_assert!(offset + len <= self.len as u64);
        // SAFETY: range inside our mapping.
        let rc = unsafe {
            libc::madvise(
                self.base.add(offset as usize).cast(),
                len as usize,
                MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            return Err(Error::Memory {
                phase,
                op: "populate destination",
                start: offset,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; nothing else refers to
        // it (the owning Destination or pool is going away).
        unsafe { libc::munmap(self.map_base, self.map_len) };
    }
}

/// Cancellation and progress of a destination preparation, shared with
/// whoever watches it.
#[derive(Debug, Default)]
pub struct PrepareControl {
    /// Set to stop between chunks (the preparation then fails as
    /// `Error::Cancelled` and keeps nothing).
    pub cancel: AtomicBool,
    /// Bytes populated so far.
    pub done: AtomicU64,
    /// Bytes the preparation will populate (set once it knows).
    pub total: AtomicU64,
}

/// Destination memory kept ready between snapshots (see "Destination
/// preparation" in engine.rs): populated ahead of time by `prepare`, and/or
/// handed back by a dropped `Destination` when the engine keeps it. Memory
/// that stays mapped in this process stays backed by the outer host; memory
/// that is freed is reported back to it and is slow to touch again.
#[derive(Debug, Default)]
pub struct DestPool {
    slot: Mutex<Option<Mapping>>,
}

impl DestPool {
    fn lock(&self) -> MutexGuard<'_, Option<Mapping>> {
        match self.slot.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Makes a destination of at least `len` bytes ready now: mapped and
    /// populated (allocated and zeroed by the kernel) chunk by chunk. A kept
    /// mapping that is large enough is reused (only its missing chunks cost
    /// anything). On error nothing is kept (the memory goes back to the
    /// kernel) and the next snapshot populates as it copies.
    pub fn prepare(&self, len: u64, fail_at: Option<u64>) -> Result<(), Error> {
        let len = len.div_ceil(CHUNK_SIZE) * CHUNK_SIZE;
        let offsets: Vec<u64> = (0..len / CHUNK_SIZE).map(|c| c * CHUNK_SIZE).collect();
        self.prepare_chunks(len, &offsets, fail_at, &PrepareControl::default())
    }

    /// As [`Self::prepare`], populating only the chunks at `offsets` (the
    /// rest of the mapping stays unbacked: it costs nothing until a copier
    /// needs it). `fail_at` counts positions in `offsets`. Checks
    /// `control.cancel` between chunks and counts populated bytes in
    /// `control.done`.
    pub fn prepare_chunks(
        &self,
        len: u64,
        offsets: &[u64],
        fail_at: Option<u64>,
        control: &PrepareControl,
    ) -> Result<(), Error> {
        let len = len.div_ceil(CHUNK_SIZE) * CHUNK_SIZE;
        let m = match self.lock().take() {
            Some(m) if m.len as u64 >= len => m,
            _ => Mapping::new(len)?,
        };
        for (i, &off) in offsets.iter().enumerate() {
            if control.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            if off + CHUNK_SIZE > len {
                return Err(Error::InvalidConfig(
                    "chunk to prepare lies outside the destination",
                ));
            }
            if fail_at == Some(i as u64) {
                return Err(Error::Memory {
                    phase: Phase::Prepare,
                    op: "populate destination (injected)",
                    start: off,
                    len: CHUNK_SIZE,
                    source: io::Error::from_raw_os_error(libc::ENOMEM),
                });
            }
            m.populate(off, CHUNK_SIZE, Phase::Prepare)?;
            control.done.fetch_add(CHUNK_SIZE, Ordering::Relaxed);
        }
        self.put(m);
        Ok(())
    }

    /// Bytes of destination mapping kept (mapped; populated where used).
    pub fn kept_bytes(&self) -> u64 {
        self.lock().as_ref().map_or(0, |m| m.len as u64)
    }

    /// Gives the kept mapping back to the kernel.
    pub fn release(&self) {
        drop(self.lock().take());
    }

    fn take(&self) -> Option<Mapping> {
        self.lock().take()
    }

    /// Keeps `m` unless a larger mapping is kept already.
    fn put(&self, m: Mapping) {
        let mut slot = self.lock();
        match slot.as_ref() {
            Some(old) if old.len >= m.len => drop(m),
            _ => *slot = Some(m),
        }
    }
}

/// The snapshot VM's memory: a 2 MiB aligned, THP-advised anonymous mapping,
/// either fresh or taken from the engine's `DestPool`.
///
/// A fresh one is mapped with MAP_NORESERVE and never touched up front:
/// mapping is O(1), and chunks that were never populated in the source are
/// never populated here either, so they cost no memory (peak extra memory =
/// populated chunks). A pooled one may hold an earlier snapshot's bytes
/// (`stale`): `copy_unit` then zeroes what it does not copy.
#[derive(Debug)]
pub struct Destination {
    map: Option<Mapping>,
    len: usize,
    stale: bool,
    /// Mapped fresh for this snapshot (not taken from the pool): its first
    /// touch of every chunk is slow (see staging.rs).
    fresh: bool,
    /// A copier populated (and so wrote) some chunk.
    written: AtomicBool,
    keep: bool,
    pool: Arc<DestPool>,
    /// Test hook (`FaultInjection::fail_populate_at`): the n-th populate
    /// fails with ENOMEM.
    fail_populate_at: Option<usize>,
    populates: AtomicUsize,
}

impl Destination {
    /// Takes the pool's mapping if it is large enough (O(1): a prepared or
    /// kept destination is ready), else maps a fresh one. On drop the
    /// mapping goes back to the pool if `keep`, or if this snapshot never
    /// wrote to it (a sync-phase failure must not throw a prepared
    /// destination away); otherwise it is unmapped.
    pub fn from_pool(pool: &Arc<DestPool>, len: u64, keep: bool) -> Result<Destination, Error> {
        let (map, fresh) = match pool.take() {
            Some(m) if m.len as u64 >= len => (m, false),
            // Too small (the VM grew since): give it back to the kernel.
            Some(_) | None => (Mapping::new(len)?, true),
        };
        Ok(Destination {
            stale: map.dirty,
            fresh,
            map: Some(map),
            len: len as usize,
            written: AtomicBool::new(false),
            keep,
            pool: pool.clone(),
            fail_populate_at: None,
            populates: AtomicUsize::new(0),
        })
    }

    /// Makes the n-th (0-based) `populate` fail with ENOMEM, as a real
    /// allocation failure would (test hook).
    pub fn inject_populate_failure(&mut self, at: Option<usize>) {
        self.fail_populate_at = at;
    }

    fn map(&self) -> &Mapping {
        match &self.map {
            Some(m) => m,
            None => unreachable!("destination mapping is only taken in drop"),
        }
    }

    pub fn ptr(&self, offset: u64) -> *mut u8 {
        debug_assert!(offset <= self.len as u64);
        self.map().ptr(offset)
    }

    /// Mapped for this snapshot rather than prepared or kept: nothing in it
    /// is backed yet.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// Whether the memory may hold bytes of an earlier snapshot.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Allocates (and zeroes, in the kernel) the pages of one chunk now, so a
    /// later copy runs at warm speed and an out-of-memory shows up here as an
    /// error instead of a SIGBUS/OOM kill inside memcpy. Nearly free on a
    /// prepared (already populated) destination.
    pub fn populate(&self, offset: u64, len: u64, phase: Phase) -> Result<(), Error> {
        if let Some(at) = self.fail_populate_at {
            if self.populates.fetch_add(1, Ordering::Relaxed) == at {
                return Err(Error::Memory {
                    phase,
                    op: "populate destination (injected)",
                    start: offset,
                    len,
                    source: io::Error::from_raw_os_error(libc::ENOMEM),
                });
            }
        }
        self.written.store(true, Ordering::Relaxed);
        self.map().populate(offset, len, phase)
    }

    /// Makes `[offset, +len)` read as zero on a stale destination by giving
    /// the pages back (a zero chunk then costs no memory, as on a fresh one).
    pub fn discard(&self, offset: u64, len: u64, phase: Phase) -> Result<(), Error> {
        // SAFETY: range inside our mapping, owned by the caller's claim.
        let rc =
            unsafe { libc::madvise(self.ptr(offset).cast(), len as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(Error::Memory {
                phase,
                op: "discard stale destination",
                start: offset,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The whole image as bytes. Only sound once no copier writes any more
    /// (the snapshot is complete), which `Snapshot` guarantees.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is readable for `len` bytes and outlives `self`.
        unsafe { std::slice::from_raw_parts(self.map().base, self.len) }
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        let written = *self.written.get_mut();
        if let Some(mut m) = self.map.take() {
            if self.keep || !written {
                m.dirty |= written;
                self.pool.put(m);
            }
            // Otherwise the Mapping's own drop unmaps it.
        }
    }
}

/// Reads `/proc/self/pagemap` to learn which pages of a chunk have a page
/// table entry (present or swapped). Pages without one were never touched
/// (or discarded): they read as zero at the fork and, with MODE_MISSING
/// registered, nobody can populate them without going through our handler.
/// 1.8 µs per chunk measured (examples/uffd_probe.rs).
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;

impl Pagemap {
    pub fn open() -> Result<Pagemap, Error> {
        File::open("/proc/self/pagemap")
            .map(|file| Pagemap { file })
            .map_err(|source| Error::Memory {
                phase: Phase::Sync,
                op: "open /proc/self/pagemap",
                start: 0,
                len: 0,
                source,
            })
    }

    /// Bitmap of populated pages of the `pages` (<= PAGES_PER_CHUNK) pages
    /// at host `addr`; entries past `pages` are false.
    pub fn populated(
        &self,
        addr: u64,
        pages: usize,
        phase: Phase,
    ) -> Result<[bool; PAGES_PER_CHUNK], Error> {
        let mut raw = [0u8; PAGES_PER_CHUNK * 8];
        let raw = &mut raw[..pages * 8];
        self.file
            .read_exact_at(raw, addr / PAGE_SIZE * 8)
            .map_err(|source| Error::Memory {
                phase,
                op: "read pagemap",
                start: addr,
                len: pages as u64 * PAGE_SIZE,
                source,
            })?;
        let mut out = [false; PAGES_PER_CHUNK];
        for (i, e) in raw.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(e);
            let v = u64::from_ne_bytes(b);
            out[i] = v & (PM_PRESENT | PM_SWAP) != 0;
        }
        Ok(out)
    }
}

/// Copies the populated pages of one copy unit (`pages` pages: a chunk, or
/// one page for the sync-wp baseline) from `src` to `dst` (which reads as
/// zero where nothing is copied). Returns whether the unit had no populated
/// page (zero), and the bytes copied.
///
/// Never-touched pages are *not read*: with MODE_MISSING registered, reading
/// one would trap into our own handler (and deadlock a copier that is the
/// handler). Their zero is already in `dst`.
///
/// # Safety
/// `src` and `dst` must each point to `pages * PAGE_SIZE` (<= CHUNK_SIZE)
/// bytes of mapped memory; no other thread writes `dst`'s unit or `src`'s
/// unit meanwhile (the unit is claimed, and write-protected or paused).
pub unsafe fn copy_unit(
    pagemap: &Pagemap,
    dest: &Destination,
    src: u64,
    dst_offset: u64,
    pages: usize,
    phase: Phase,
) -> Result<(bool, u64), Error> {
    let pop = pagemap.populated(src, pages, phase)?;
    if !pop.iter().any(|&p| p) {
        if dest.is_stale() {
            dest.discard(dst_offset, pages as u64 * PAGE_SIZE, phase)?;
        }
        return Ok((true, 0));
    }
    dest.populate(dst_offset, pages as u64 * PAGE_SIZE, phase)?;
    // SAFETY: forwarded from this function's contract; the destination
    // unit is mapped for `pages` pages.
    let copied = unsafe { copy_populated(&pop, src, dest.ptr(dst_offset), pages, dest.is_stale()) };
    Ok((false, copied))
}

/// Copies the runs of pages marked in `pop` (of `pages`) from `src` to
/// `dst`; with `zero_gaps` the unmarked pages of `dst` are zeroed (it may
/// hold older bytes), else left as they are (they read as zero already).
/// Returns the bytes copied.
///
/// # Safety
/// As for [`copy_unit`], with `dst` the start of the unit's destination.
pub(crate) unsafe fn copy_populated(
    pop: &[bool; PAGES_PER_CHUNK],
    src: u64,
    dst: *mut u8,
    pages: usize,
    zero_gaps: bool,
) -> u64 {
    let mut copied = 0u64;
    let mut i = 0;
    while i < pages {
        if !pop[i] {
            if zero_gaps {
                // SAFETY: in bounds of the claimed unit (see below).
                unsafe {
                    dst.add(i * PAGE_SIZE as usize)
                        .write_bytes(0, PAGE_SIZE as usize)
                };
            }
            i += 1;
            continue;
        }
        let start = i;
        while i < pages && pop[i] {
            i += 1;
        }
        let off = start * PAGE_SIZE as usize;
        let n = (i - start) * PAGE_SIZE as usize;
        // SAFETY: per the function contract both ranges are mapped, in bounds
        // (off + n <= pages * PAGE_SIZE) and not written concurrently.
        unsafe {
            std::ptr::copy_nonoverlapping((src as usize + off) as *const u8, dst.add(off), n)
        };
        copied += n as u64;
    }
    copied
}
