//! Dirty tracking between snapshots, for incremental snapshots.
//!
//! After an async-fork snapshot with `Config::track` completes, guest RAM
//! stays registered with its userfaultfd and every chunk the guest did not
//! write since the snapshot's instant stays write-protected (the workers
//! leave protection in place in that mode; only a write lifts it). A
//! [`DirtyTracker`] then owns the uffd: the first write to a protected
//! chunk (or the first touch of a hole) marks the chunk dirty and is let
//! through at once — no copy, one fault per chunk per interval. The next
//! snapshot takes the tracker over (`TrackerSlot`): it only has to protect
//! the dirty chunks again (its `arm` costs O(dirty), not O(memory)), and
//! an incremental snapshot writes just those; the others are the parent's.
//!
//! Why not KVM's dirty log: it costs one write-protect exit per 4 KiB page
//! written per interval (512 per chunk) and maps guest RAM with 4 KiB
//! pages while on, and it does not see the VMM's own writes into guest
//! memory (the vsock device's); write protection at the PMD costs one fault
//! per chunk, keeps the huge mappings, sees every writer, and reuses the
//! engine's own machinery. Measured side by side on a guest writing
//! steadily (`bench/examples/dirty_log_probe.rs`,
//! docs/journal/2026-12-05-dirty-tracking.md); the tracker's cost on the KV
//! guest is in docs/BENCHMARKS.md ("Incremental snapshots and dirty
//! tracking").
//!
//! Invariant: a chunk not marked dirty has the bytes it had at the last
//! snapshot's instant — it has been write-protected (or, for a hole,
//! MISSING-registered) without interruption since then.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::eventfd::EventFd;
use crate::region::{Layout, Region, CHUNK_SIZE, PAGE_SIZE};
use crate::sync::lock;
use crate::uffd::{Event, FaultKind, Uffd};
use crate::zero_fill::ZeroFill;

/// Guest RAM being watched for writes between snapshots.
#[derive(Debug)]
pub struct DirtyTracker {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    uffd: Arc<Uffd>,
    layout: Layout,
    hugetlb: bool,
    thp: bool,
    dirty: Vec<AtomicBool>,
    stop: EventFd,
}

/// What a snapshot takes over from a tracker.
#[derive(Debug)]
pub(crate) struct Handover {
    pub uffd: Arc<Uffd>,
    /// Per chunk: written since the last snapshot's instant (these are
    /// the chunks without write protection).
    pub dirty: Vec<bool>,
}

impl DirtyTracker {
    /// Watches `layout` through `uffd` (registered MISSING|WP, every chunk
    /// but those in `dirty` protected).
    pub(crate) fn start(
        uffd: Arc<Uffd>,
        layout: Layout,
        dirty: Vec<bool>,
        hugetlb: bool,
        thp: bool,
    ) -> std::io::Result<DirtyTracker> {
        let inner = Arc::new(Inner {
            uffd,
            layout,
            hugetlb,
            thp,
            dirty: dirty.into_iter().map(AtomicBool::new).collect(),
            stop: EventFd::new()?,
        });
        let i = inner.clone();
        let thread = std::thread::Builder::new()
            .name("snap-dirty".into())
            .spawn(move || i.serve())?;
        Ok(DirtyTracker {
            inner,
            thread: Some(thread),
        })
    }

    /// The regions it watches.
    pub fn regions(&self) -> &[Region] {
        self.inner.layout.regions()
    }

    /// Chunks written since the last snapshot's instant.
    pub fn dirty_chunks(&self) -> usize {
        self.inner
            .dirty
            .iter()
            .filter(|d| d.load(Ordering::Relaxed))
            .count()
    }

    pub fn chunk_count(&self) -> usize {
        self.inner.dirty.len()
    }

    /// Stops watching and hands the uffd (still registered, protections
    /// as they are) and the dirty set to the next snapshot. Faults queued
    /// meanwhile stay queued for its handler.
    pub(crate) fn hand_over(mut self) -> Handover {
        self.stop_thread();
        let dirty = self
            .inner
            .dirty
            .iter()
            .map(|d| d.load(Ordering::Acquire))
            .collect();
        Handover {
            uffd: self.inner.uffd.clone(),
            dirty,
        }
    }

    fn stop_thread(&mut self) {
        if let Some(t) = self.thread.take() {
            self.inner.stop.signal();
            let _ = t.join();
        }
    }
}

impl Drop for DirtyTracker {
    /// Tracking off: every protection lifted and the registration gone
    /// (which wakes anyone still blocked). Not after `hand_over`.
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_thread();
            for r in self.inner.layout.regions() {
                let _ = self
                    .inner
                    .uffd
                    .write_protect(r.host_addr, r.len, false, false);
                let _ = self.inner.uffd.unregister(r.host_addr, r.len);
            }
        }
    }
}

impl Inner {
    fn serve(&self) {
        let mut events = Vec::with_capacity(64);
        let mut zero = ZeroFill::new(&self.uffd, self.thp, self.hugetlb);
        loop {
            let [_, stopped] =
                crate::uffd::wait_readable([self.uffd.as_raw_fd(), self.stop.as_raw_fd()]);
            if stopped {
                return;
            }
            events.clear();
            if self.uffd.read_events(&mut events).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            for ev in &events {
                if let Event::PageFault { address, kind } = *ev {
                    self.fault(address, kind, &mut zero);
                }
            }
        }
    }

    /// Marks the chunk dirty first, then lets the write through: a chunk
    /// is never writable without being marked.
    fn fault(&self, address: u64, kind: FaultKind, zero: &mut ZeroFill) {
        let page = address & !(PAGE_SIZE - 1);
        let Some(i) = self.layout.chunk_of_host(address) else {
            let _ = self.uffd.wake(page, PAGE_SIZE);
            return;
        };
        self.dirty[i].store(true, Ordering::Release);
        let chunk = self.layout.chunk(i).host_addr;
        let done = match kind {
            FaultKind::WriteProtect => self
                .uffd
                .write_protect(chunk, CHUNK_SIZE, false, false)
                .is_ok(),
            FaultKind::Missing { write } => zero.resolve(&self.uffd, address, chunk, write),
        };
        if !done {
            let _ = self.uffd.wake(page, PAGE_SIZE);
        }
    }
}

/// A VM's tracker between its snapshots: the engine of each snapshot
/// takes it (if it still fits the regions) and puts the next one back.
#[derive(Debug, Default)]
pub struct TrackerSlot(Mutex<Option<DirtyTracker>>);

impl TrackerSlot {
    pub fn new() -> TrackerSlot {
        TrackerSlot::default()
    }

    /// Whether writes are being tracked now.
    pub fn is_tracking(&self) -> bool {
        lock(&self.0).is_some()
    }

    /// Chunks written since the last snapshot, while tracking.
    pub fn dirty_chunks(&self) -> Option<usize> {
        lock(&self.0).as_ref().map(DirtyTracker::dirty_chunks)
    }

    /// Stops tracking (protections lifted, guest RAM unregistered): before
    /// anything else that needs guest RAM unregistered.
    pub fn clear(&self) {
        drop(lock(&self.0).take());
    }

    pub(crate) fn take(&self) -> Option<DirtyTracker> {
        lock(&self.0).take()
    }

    pub(crate) fn put(&self, t: DirtyTracker) {
        *lock(&self.0) = Some(t);
    }
}
