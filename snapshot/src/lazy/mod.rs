//! Lazy restore: guest RAM is ordinary anonymous memory (the backing a
//! boot gives it), registered with userfaultfd; a chunk's first touch
//! loads it from the snapshot's memory image, and prefetch threads load
//! the rest in the background. Once every data chunk is in, the
//! registration goes and the VM no longer needs the snapshot directory.
//!
//! # How a chunk gets in: UFFDIO_MOVE of a whole huge page
//! The image is read (`O_DIRECT`) into a chunk-aligned staging buffer
//! advised like guest RAM, so with THP the read allocates one huge page;
//! UFFDIO_MOVE then hands that page to guest RAM as one PMD — no copy, and
//! the restored VM keeps the huge pages its next snapshot's pause depends
//! on. UFFDIO_COPY maps 4 KiB pages (a VM restored so snapshots like a
//! THP-off one), and copying then MADV_COLLAPSE costs a second copy into
//! freshly allocated huge pages; `bench/examples/restore_probe.rs` measures
//! the three (docs/journal/2026-12-05-lazy-restore.md). Kernels without
//! UFFDIO_MOVE (< 6.8) get UFFDIO_COPY, with a warning. A move the kernel
//! declines for a moment (EBUSY/EAGAIN: seen in 3 of 5 restores of an
//! 8 GiB guest) is tried again ([`MOVE_ATTEMPTS`]); one still declined
//! is finished with UFFDIO_COPY per 4 KiB page (`chunks_copied_in`).
//!
//! # Invariants
//! - **Nobody sees a chunk before it is checked**: a chunk is read, its
//!   checksum verified, and only then moved in; faulting threads wait
//!   until it is. A corrupt chunk fails the load (`on_error`), and the
//!   threads waiting on it are never woken onto wrong memory.
//! - **A chunk is loaded once**: `NOT_LOADED → LOADING → LOADED` by CAS;
//!   a fault on a chunk being loaded waits for that load's wake.
//! - **Snapshots of a loading VM** (engine `Config::lazy`): the engine
//!   shares this userfaultfd (a range takes one) and gets the faults that
//!   are its business through an [`EventSink`]. Between its `arm` and its
//!   pause every chunk loaded is write-protected as it lands (`tracking`),
//!   like chunks present at `arm`; at the pause [`Loader::freeze`] tells
//!   which chunks were not loaded: their bytes at the snapshot's instant
//!   are the image's, so the snapshot copies them from here, never from
//!   guest RAM (where they may still be unmapped or load later).
//! - The image file is the one validated at open, kept open: deleting or
//!   replacing the directory does not change what loads.

mod buf;
mod sink;
mod source;
mod work;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use self::buf::ChunkBuf;
pub use self::sink::EventSink;
pub use self::source::{ChunkData, ImageSource};
use crate::cpus::CpuSet;
use crate::error::UffdError;
use crate::eventfd::EventFd;
use crate::persist::{SnapshotChain, SnapshotDir};
use crate::region::{Layout, Region, CHUNK_SIZE, PAGE_SIZE};
use crate::sync::lock;
use crate::uffd::{feature, Event, FaultKind, RegisterMode, Uffd};

/// After a load a faulting thread waited for, the prefetch starts no new
/// read for this long, unless it has yielded [`MAX_YIELD`] in a row.
const DEMAND_QUIET: Duration = Duration::from_millis(5);
const MAX_YIELD: Duration = Duration::from_millis(50);

/// Prefetch threads run this much nicer than the VMM's others.
const PREFETCH_NICE_DELTA: i32 = 10;

const NOT_LOADED: u8 = 0;
const LOADING: u8 = 1;
const LOADED: u8 = 2;

/// Why a lazy restore failed. Each names the snapshot and, for memory, the
/// chunk.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot open the memory image of {}: {source}", .dir.display())]
    Open {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {}: cannot read memory chunk {index}: {source}", .dir.display())]
    Read {
        dir: PathBuf,
        index: usize,
        source: std::io::Error,
    },
    #[error(
        "snapshot {}: memory chunk {index} (guest {guest_addr:#x}) is corrupt: checksum {computed:#010x}, expected {expected:#010x}",
        .dir.display()
    )]
    Corrupt {
        dir: PathBuf,
        index: usize,
        guest_addr: u64,
        expected: u32,
        computed: u32,
    },
    #[error("snapshot image has no data chunk {0}")]
    NoSuchChunk(usize),
    #[error("the snapshot's memory layout does not match guest RAM: {0}")]
    Layout(String),
    #[error("restore: {0}")]
    Uffd(#[from] UffdError),
    #[error("cannot start the restore's {what} thread: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot map staging memory for the restore: {0}")]
    Staging(std::io::Error),
    #[error("cannot move chunk {index} into guest RAM: part of it is populated already")]
    Populated { index: usize },
}

impl LoadError {
    fn open(dir: &std::path::Path, source: std::io::Error) -> LoadError {
        LoadError::Open {
            dir: dir.into(),
            source,
        }
    }
}

/// Tries of a huge-page move the kernel refuses for a moment (EBUSY or
/// EAGAIN; see `Inner::move_chunk`), with pauses from
/// [`MOVE_FIRST_PAUSE`] doubling between them (1.55 ms in all), before the
/// chunk is copied in 4 KiB pages instead.
pub const MOVE_ATTEMPTS: u32 = 6;
const MOVE_FIRST_PAUSE: Duration = Duration::from_micros(50);

/// How a lazy restore runs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Guest RAM is THP-advised: stage chunks in huge pages.
    pub huge_pages: bool,
    /// Guest RAM is hugetlbfs: chunks are copied in whole (UFFDIO_MOVE
    /// does not take hugetlbfs; a copy fills one huge page).
    pub hugetlb: bool,
    /// Background threads reading the image (0: only faults load).
    pub prefetch_threads: usize,
    /// Where the prefetch threads run (None: anywhere).
    pub cpus: Option<CpuSet>,
    /// Guest addresses the guest will touch first when it resumes (its
    /// stacks, code, page tables, device rings: the VMM can tell from the
    /// saved state): their chunks are prefetched before the rest.
    pub hot: Vec<u64>,
    /// Test hook: the moves of the first `n` chunks answer EBUSY every
    /// time, as the kernel sometimes does for longer than the loader
    /// retries (see `work.rs`).
    pub busy_moves: usize,
    /// Test hook: the first move of the next `n` chunks answers EBUSY
    /// once (the kernel's usual case: a retry moves it).
    pub busy_once_moves: usize,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            huge_pages: true,
            hugetlb: false,
            prefetch_threads: 2,
            cpus: None,
            hot: Vec::new(),
            busy_moves: 0,
            busy_once_moves: 0,
        }
    }
}

/// Where a lazy restore stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadState {
    /// Chunks are still coming in.
    Loading,
    /// Every data chunk is in guest RAM; the image is no longer used.
    Done,
    /// A chunk could not be loaded; the VM must stop (see the error).
    Failed,
}

impl LoadState {
    pub fn name(self) -> &'static str {
        match self {
            LoadState::Loading => "loading",
            LoadState::Done => "done",
            LoadState::Failed => "failed",
        }
    }
}

/// Progress of a lazy restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProgress {
    pub state: LoadState,
    /// Data chunks loaded, of `chunks_total` (holes are not counted).
    pub chunks_loaded: u64,
    pub chunks_total: u64,
    /// Chunks loaded because a thread touched them first.
    pub chunks_on_demand: u64,
    /// Chunks copied in 4 KiB pages because the kernel would not move
    /// their huge page (they lose it; the data is the same).
    pub chunks_copied_in: u64,
    /// Moves the kernel refused for a moment (EBUSY/EAGAIN) and the
    /// loader tried again.
    pub moves_retried: u64,
    pub bytes_read: u64,
    /// Since the start, or until done.
    pub elapsed: Duration,
    /// The failure, once failed.
    pub error: Option<String>,
}

/// How chunks are handed to guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hand {
    Move,
    Copy,
}

type OnError = Box<dyn Fn(String) + Send + Sync>;

/// A lazy restore in progress (or done) for one VM's guest RAM.
pub struct Loader {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("dir", &self.inner.source.dir())
            .field("progress", &self.progress())
            .finish()
    }
}

struct Attach {
    sink: Option<Arc<EventSink>>,
    released: bool,
}

struct Inner {
    source: ImageSource,
    layout: Layout,
    uffd: Arc<Uffd>,
    hand: Hand,
    /// `LoadOptions::busy_moves` and `busy_once_moves` left to inject.
    busy_moves: AtomicUsize,
    busy_once_moves: AtomicUsize,
    moves_retried: AtomicU64,
    /// Chunks copied in because the kernel would not move them.
    copied_in: AtomicU64,
    hugetlb: bool,
    state: Vec<AtomicU8>,
    data_total: u64,
    data_loaded: AtomicU64,
    on_demand: AtomicU64,
    bytes_read: AtomicU64,
    started: Instant,
    finished: Mutex<Option<Duration>>,
    /// Between a snapshot's `arm` and its pause: chunks loaded meanwhile
    /// are write-protected as they land. Loads hold it shared across
    /// move + protect, so `start_tracking` / `freeze` see whole loads.
    tracking: RwLock<bool>,
    attach: Mutex<Attach>,
    error: Mutex<Option<String>>,
    on_error: OnError,
    stop: AtomicBool,
    stop_evt: EventFd,
    /// Prefetch order: the hot chunks, then every chunk in address order.
    order: Vec<usize>,
    /// How many of `order` are hot: loaded at once; the rest waits for
    /// [`Loader::start_prefetch`] (so the VM's build and its first steps
    /// do not compete with the bulk of the reads).
    hot_len: usize,
    go: Mutex<bool>,
    go_cv: Condvar,
    next: AtomicUsize,
    /// Loads a faulting thread waits for, in flight: the prefetch starts no
    /// new read meanwhile, so a fault's read does not queue behind it.
    demand: AtomicUsize,
    /// When the last such load ended (ns since `started`).
    last_demand_ns: AtomicU64,
}

/// What one attempt to load a chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Loaded,
    /// Another thread is loading it (its wake releases the faulters).
    Busy,
    AlreadyLoaded,
    Failed,
}

impl Loader {
    /// Registers guest RAM (`regions`, in the image's chunk order: the
    /// order the snapshot was taken with) and starts serving its faults
    /// from `snap`'s memory image, then prefetching. Call before anything
    /// touches guest RAM. `on_error` is called once if a chunk cannot be
    /// loaded (the VM must then stop: its faulting threads stay blocked).
    pub fn start(
        chain: &SnapshotChain,
        regions: &[Region],
        opts: LoadOptions,
        on_error: impl Fn(String) + Send + Sync + 'static,
    ) -> Result<Loader, LoadError> {
        let source = ImageSource::new(chain)?;
        let layout = Layout::new(regions).map_err(|e| LoadError::Layout(e.to_string()))?;
        check_layout(&layout, &source, chain.top())?;
        let available = Uffd::available_features().unwrap_or(0);
        let hand = if opts.hugetlb {
            Hand::Copy
        } else if available & feature::MOVE != 0 {
            Hand::Move
        } else {
            tracing::warn!(
                "this kernel has no UFFDIO_MOVE (Linux 6.8+): restored memory loads into 4 KiB pages, so the restored VM loses its huge pages"
            );
            Hand::Copy
        };
        let features =
            feature::PAGEFAULT_FLAG_WP | if hand == Hand::Move { feature::MOVE } else { 0 };
        let uffd = Arc::new(Uffd::new(features)?);
        for (i, r) in layout.regions().iter().enumerate() {
            if let Err(e) = uffd.register(
                r.host_addr,
                r.len,
                RegisterMode::MISSING.union(RegisterMode::WP),
            ) {
                for r in &layout.regions()[..i] {
                    let _ = uffd.unregister(r.host_addr, r.len);
                }
                return Err(e.into());
            }
        }
        let n = layout.total_chunks();
        let mut order: Vec<usize> = opts
            .hot
            .iter()
            .filter_map(|&g| chunk_of_guest(&layout, g))
            .collect();
        let mut seen = vec![false; n];
        order.retain(|&c| !std::mem::replace(&mut seen[c], true));
        let hot_len = order.len();
        order.extend((0..n).filter(|&c| !seen[c]));
        let inner = Arc::new(Inner {
            data_total: source.data_chunks() as u64,
            source,
            layout,
            uffd,
            hand,
            busy_moves: AtomicUsize::new(opts.busy_moves),
            busy_once_moves: AtomicUsize::new(opts.busy_once_moves),
            moves_retried: AtomicU64::new(0),
            copied_in: AtomicU64::new(0),
            hugetlb: opts.hugetlb,
            state: (0..n).map(|_| AtomicU8::new(NOT_LOADED)).collect(),
            data_loaded: AtomicU64::new(0),
            on_demand: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            started: Instant::now(),
            finished: Mutex::new(None),
            tracking: RwLock::new(false),
            attach: Mutex::new(Attach {
                sink: None,
                released: false,
            }),
            error: Mutex::new(None),
            on_error: Box::new(on_error),
            stop: AtomicBool::new(false),
            stop_evt: EventFd::new().map_err(LoadError::Staging)?,
            order,
            hot_len,
            go: Mutex::new(false),
            go_cv: Condvar::new(),
            next: AtomicUsize::new(0),
            demand: AtomicUsize::new(0),
            last_demand_ns: AtomicU64::new(0),
        });
        let loader = Loader {
            inner: inner.clone(),
            threads: Mutex::new(Vec::new()),
        };
        let handler_buf = ChunkBuf::new(opts.huge_pages).map_err(LoadError::Staging)?;
        let h = inner.clone();
        let t = std::thread::Builder::new()
            .name("restore-faults".into())
            .spawn(move || h.serve_faults(handler_buf))
            .map_err(|source| LoadError::Spawn {
                what: "fault",
                source,
            })?;
        lock(&loader.threads).push(t);
        // An image without data is loaded already.
        inner.check_done();
        for k in 0..opts.prefetch_threads {
            let buf = match ChunkBuf::new(opts.huge_pages) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("restore prefetch thread {k} not started: {e}");
                    break;
                }
            };
            let p = inner.clone();
            let cpus = opts.cpus.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("restore-fetch-{k}"))
                .spawn(move || {
                    if let Some(c) = cpus {
                        if let Err(e) = c.pin_current_thread() {
                            tracing::debug!("restore prefetch not kept on CPUs {c}: {e}");
                        }
                    }
                    // The guest (and its faults) first: the bulk of the
                    // reads takes what CPU they leave.
                    if let Err(e) = crate::priority::adjust_current_thread(PREFETCH_NICE_DELTA) {
                        tracing::debug!("restore prefetch keeps normal priority: {e}");
                    }
                    p.prefetch(buf)
                });
            match spawned {
                Ok(t) => lock(&loader.threads).push(t),
                // Faults still load everything; only speed is lost.
                Err(e) => tracing::warn!("restore prefetch thread {k} not started: {e}"),
            }
        }
        Ok(loader)
    }

    /// Lets the prefetch go past the hot chunks: call once the guest runs
    /// (or now, for a VM that stays paused).
    pub fn start_prefetch(&self) {
        *lock(&self.inner.go) = true;
        self.inner.go_cv.notify_all();
    }

    pub fn progress(&self) -> LoadProgress {
        let i = &self.inner;
        let error = lock(&i.error).clone();
        let finished = *lock(&i.finished);
        let state = if error.is_some() {
            LoadState::Failed
        } else if finished.is_some() {
            LoadState::Done
        } else {
            LoadState::Loading
        };
        LoadProgress {
            state,
            chunks_loaded: i.data_loaded.load(Ordering::Acquire),
            chunks_total: i.data_total,
            chunks_on_demand: i.on_demand.load(Ordering::Relaxed),
            chunks_copied_in: i.copied_in.load(Ordering::Relaxed),
            moves_retried: i.moves_retried.load(Ordering::Relaxed),
            bytes_read: i.bytes_read.load(Ordering::Relaxed),
            elapsed: finished.unwrap_or_else(|| i.started.elapsed()),
            error,
        }
    }

    /// The snapshot directory the memory comes from.
    pub fn dir(&self) -> &std::path::Path {
        self.inner.source.dir()
    }

    /// Whether guest RAM no longer depends on the image (every data chunk
    /// is in and the registration is gone).
    pub fn is_released(&self) -> bool {
        lock(&self.inner.attach).released
    }

    /// For a snapshot engine: routes the faults that are not loads to
    /// `sink` and returns the userfaultfd guest RAM is registered with, or
    /// None when the load is over (guest RAM is ordinary again: the engine
    /// registers its own). Until [`Loader::detach`] the registration stays.
    pub fn attach(&self, sink: Arc<EventSink>) -> Option<Arc<Uffd>> {
        let mut a = lock(&self.inner.attach);
        if a.released {
            return None;
        }
        a.sink = Some(sink);
        Some(self.inner.uffd.clone())
    }

    /// Ends [`Loader::attach`]; a finished load releases guest RAM now.
    pub fn detach(&self) {
        let sink = lock(&self.inner.attach).sink.take();
        if let Some(sink) = sink {
            // Faults passed on after the engine stopped reading: ours now.
            let mut left = Vec::new();
            sink.take(&mut left);
            for ev in left {
                if let Event::PageFault { address, kind } = ev {
                    if let Some(i) = self.inner.layout.chunk_of_host(address) {
                        self.inner.settle_loaded(i, address, kind);
                    }
                }
            }
        }
        self.inner.check_done();
    }

    /// A snapshot is armed: from now on chunks are write-protected as they
    /// load (call before the engine protects guest RAM).
    pub fn start_tracking(&self) {
        *self
            .inner
            .tracking
            .write()
            .unwrap_or_else(|p| p.into_inner()) = true;
    }

    /// The snapshot's instant (writers paused): stops tracking and returns,
    /// per chunk, whether it was NOT in guest RAM — its bytes at this
    /// instant are the image's.
    pub fn freeze(&self) -> Vec<bool> {
        let mut g = self
            .inner
            .tracking
            .write()
            .unwrap_or_else(|p| p.into_inner());
        *g = false;
        self.inner
            .state
            .iter()
            .map(|s| s.load(Ordering::Acquire) != LOADED)
            .collect()
    }

    /// Stops tracking without a snapshot (its arm was undone).
    pub fn stop_tracking(&self) {
        *self
            .inner
            .tracking
            .write()
            .unwrap_or_else(|p| p.into_inner()) = false;
    }

    /// The image, for a snapshot that copies chunks not yet loaded.
    pub fn source(&self) -> &ImageSource {
        &self.inner.source
    }

    /// Stops loading and lets go of guest RAM without waiting for any
    /// thread (so it may be called from `on_error`): unregistering wakes
    /// every thread blocked on it, and what was not loaded then reads as
    /// zero. Only for a VM already told to stop — after a failed load, the
    /// threads blocked on the bad chunk must return for the VM to stop,
    /// and a vCPU told to stop does not enter the guest again.
    pub fn let_go(&self) {
        let i = &self.inner;
        i.stop.store(true, Ordering::Release);
        i.stop_evt.signal();
        *lock(&i.go) = true;
        i.go_cv.notify_all();
        let mut a = lock(&i.attach);
        if !a.released {
            a.released = true;
            for r in i.layout.regions() {
                let _ = i.uffd.unregister(r.host_addr, r.len);
            }
        }
    }

    /// [`Loader::let_go`], then waits for the loader's threads: for a VM
    /// being torn down.
    pub fn shutdown(&self) {
        self.let_go();
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The chunk holding guest address `g`, if guest RAM has it.
fn chunk_of_guest(layout: &Layout, g: u64) -> Option<usize> {
    let (k, r) = layout
        .regions()
        .iter()
        .enumerate()
        .find(|(_, r)| g >= r.guest_addr && g < r.guest_addr + r.len)?;
    Some(layout.first_chunk(k) + ((g - r.guest_addr) / CHUNK_SIZE) as usize)
}

fn check_layout(
    layout: &Layout,
    source: &ImageSource,
    snap: &SnapshotDir,
) -> Result<(), LoadError> {
    if source.chunk_size() != CHUNK_SIZE {
        return Err(LoadError::Layout(format!(
            "the image uses {} byte chunks, this snapvm {CHUNK_SIZE}",
            source.chunk_size()
        )));
    }
    let h = snap.header();
    if h.regions.len() != layout.regions().len() {
        return Err(LoadError::Layout(format!(
            "{} regions saved, {} in guest RAM",
            h.regions.len(),
            layout.regions().len()
        )));
    }
    for (saved, r) in h.regions.iter().zip(layout.regions()) {
        if saved.guest_addr != r.guest_addr || saved.len != r.len {
            return Err(LoadError::Layout(format!(
                "saved region {:#x}+{:#x}, guest RAM has {:#x}+{:#x}",
                saved.guest_addr, saved.len, r.guest_addr, r.len
            )));
        }
    }
    Ok(())
}
