//! The sync phase: `arm` (everything that grows with memory, done while
//! the guest runs) and `begin` (the snapshot's instant, with the writers
//! paused), and the set-up both share.

use super::standby::{Launch, Pending, Standby};
use super::{tear_down, undo_sync, Armed, Engine, Strategy, ARM_STEP_GAP};
use crate::chunk_table::ChunkTable;
use crate::chunk_table::Record;
use crate::error::{Error, Phase};
use crate::eventfd::EventFd;
use crate::fault_handler;
use crate::lazy::EventSink;
use crate::memory::Pagemap;
use crate::metrics::{Counters, HandlerStats, SyncMetrics};
use crate::parent::ParentLink;
use crate::persist::ChunkEntry;
use crate::persist::ImageFile;
use crate::region::{Layout, Region, CHUNK_SIZE, PAGE_SIZE};
use crate::shared::Shared;
use crate::supervisor::Plan;
use crate::sync::lock;
use crate::tracking::DirtyTracker;
use crate::uffd::{RegisterMode, Uffd};
use crate::zero_fill::uffd_features;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

impl Engine {
    /// Maps the VM's staging pool the first time (populated on a thread of
    /// its own once the workers run: staging.rs). A pool that cannot be
    /// had only costs fault latency (faults then write their unit
    /// themselves): logged. Returns how long that took (zero when it
    /// existed already).
    fn start_staging(&self, layout: &Layout) -> Duration {
        let t = Instant::now();
        let fail = self.config.injection.fail_staging;
        match self.config.staging.reserve(layout.total_bytes(), fail) {
            Ok(true) => t.elapsed(),
            Ok(false) => Duration::ZERO,
            Err(e) => {
                tracing::warn!(
                    "snapshot staging pool unavailable ({e}): write faults during snapshots will wait for the disk"
                );
                Duration::ZERO
            }
        }
    }

    /// First half of the sync phase: call with the writers still running,
    /// then pause them and call `begin` with the same image. It allocates
    /// the staging pool the first time, and for async-fork does everything
    /// `begin` would do that grows with memory — registering, and above all
    /// write-protecting every region — while the guest runs. Writes that
    /// land after a chunk was protected and before the pause fault as usual;
    /// the handler lets them through at once (no copy: the fork instant has
    /// not come yet) and notes the chunk, and `begin` protects just those
    /// chunks again. The pause then costs O(chunks written in between), not
    /// O(memory).
    ///
    /// Only the pool for sync-wp (its per-page protection in the pause is
    /// the baseline's cost); nothing for stop-the-world. If `begin` does not
    /// follow (the pause failed), call `disarm`; `begin` with other regions
    /// or another image disarms and takes the full path.
    ///
    /// # Safety
    /// As for `begin`, from this call on.
    pub unsafe fn arm(&self, regions: &[Region], image: &Arc<ImageFile>) -> Result<(), Error> {
        if self.in_progress() {
            return Err(Error::SnapshotInProgress);
        }
        let layout = Layout::new(regions)?;
        match self.config.strategy {
            Strategy::AsyncFork => {}
            Strategy::SyncWp if self.config.hugetlb => return Ok(()),
            Strategy::SyncWp => {
                self.start_staging(&layout);
                return Ok(());
            }
            Strategy::StopTheWorld | Strategy::Fork => return Ok(()),
        }
        let staging_alloc = self.start_staging(&layout);
        let t = Instant::now();
        let (shared, handler, mut m) = self.set_up(layout, image, CHUNK_SIZE, true)?;
        m.staging_alloc = staging_alloc;
        let standby = Standby::spawn(self.config.background_cpus.clone())
            .map_err(|e| tracing::debug!("supervisor starts in the pause instead: {e}"))
            .ok();
        m.arm = t.elapsed();
        *lock(&self.armed) = Some(Armed {
            regions: regions.to_vec(),
            image: image.clone(),
            shared,
            handler,
            sync: m,
            standby,
        });
        Ok(())
    }

    /// Undoes `arm` when no `begin` follows: protections and registrations
    /// gone, handler stopped, the staging pool back. No-op when not armed.
    pub fn disarm(&self) {
        if let Some(a) = lock(&self.armed).take() {
            tear_down(&a.shared, a.handler);
        }
    }

    /// The sync phase: the snapshot's instant. Call with every writer of
    /// the regions paused; returns as soon as protection is in place, after
    /// which writers may resume (then call `start_copy`). `image` receives
    /// the memory: it must be as long as the regions together. Nothing here
    /// is proportional to the number of pages; after `arm`, nothing is
    /// proportional to memory at all (stop-the-world writes everything
    /// here: that is the baseline).
    ///
    /// On error nothing is left behind: protections undone, registrations
    /// removed, no thread running.
    ///
    /// # Safety
    /// Each region's host range must be anonymous private memory mapped
    /// read-write, and must stay mapped (not munmapped or remapped) until
    /// `wait()` returns. Other discards must go through `before_discard`.
    pub unsafe fn begin(
        &self,
        regions: &[Region],
        image: &Arc<ImageFile>,
    ) -> Result<SyncMetrics, Error> {
        let t_total = Instant::now();
        let mut current = lock(&self.current);
        if current.is_some() || lock(&self.supervisor).is_some() {
            self.disarm();
            return Err(Error::SnapshotInProgress);
        }
        let armed = lock(&self.armed).take();
        let layout = match Layout::new(regions) {
            Ok(l) => l,
            Err(e) => {
                if let Some(a) = armed {
                    tear_down(&a.shared, a.handler);
                }
                return Err(e);
            }
        };
        if image.len() != layout.total_bytes() {
            if let Some(a) = armed {
                tear_down(&a.shared, a.handler);
            }
            return Err(Error::InvalidConfig(
                "the memory image's length differs from the regions'",
            ));
        }
        let loading = self.config.lazy.as_ref().is_some_and(|l| !l.is_released());
        let unit = match self.config.strategy {
            Strategy::StopTheWorld if loading => {
                return Err(Error::InvalidConfig(
                    "a VM still loading its memory from a snapshot can only be snapshotted with async-fork",
                ))
            }
            Strategy::StopTheWorld => return self.begin_stop_the_world(layout, image, t_total),
            Strategy::SyncWp if self.config.hugetlb => {
                return Err(Error::InvalidConfig(
                    "sync-wp protects 4 KiB pages; hugetlbfs guest RAM has none",
                ))
            }
            Strategy::SyncWp => PAGE_SIZE,
            Strategy::AsyncFork | Strategy::Fork => CHUNK_SIZE,
        };
        let mut written_while_armed = Vec::new();
        let (shared, handler, mut m, standby) = match armed {
            Some(a) if a.regions == regions && Arc::ptr_eq(&a.image, image) => {
                let mut m = SyncMetrics {
                    arm: a.sync.arm,
                    staging_alloc: a.sync.staging_alloc,
                    ..SyncMetrics::default()
                };
                let t = Instant::now();
                let reprotected = a.shared.reprotect_written_while_armed();
                m.write_protect = t.elapsed();
                match reprotected {
                    Ok(list) if !a.shared.is_aborted() => {
                        m.reprotected_chunks = list.len() as u64;
                        written_while_armed = list;
                    }
                    Ok(_) => {
                        tear_down(&a.shared, a.handler);
                        return Err(a.shared.take_error().unwrap_or(Error::Cancelled));
                    }
                    Err(e) => {
                        tear_down(&a.shared, a.handler);
                        return Err(e);
                    }
                }
                a.shared.armed.store(false, Ordering::Release);
                (a.shared, a.handler, m, a.standby)
            }
            other => {
                if let Some(a) = other {
                    tear_down(&a.shared, a.handler);
                }
                let (shared, handler, m) = self.set_up(layout, image, unit, false)?;
                (shared, handler, m, None)
            }
        };

        if let Some(base) = &self.config.diff_base {
            // An incremental snapshot: what was not written since the
            // parent is the parent's.
            if let Err(e) = self.settle_inherited(&shared, base, &written_while_armed) {
                drop(standby);
                tear_down(&shared, handler);
                return Err(e);
            }
        }

        if let Some(p) = &shared.parent {
            // The instant: which chunks are not in guest RAM (their bytes
            // are the parent's). Loads from now on are not protected.
            let _ = p.from_parent.set(p.loader.freeze());
        }

        if self.config.injection.fail_sync {
            drop(standby);
            tear_down(&shared, handler);
            return Err(Error::Injected {
                phase: Phase::Sync,
                what: "sync-phase failure after write-protect".into(),
            });
        }

        let t = Instant::now();
        m.total = t_total.elapsed();
        let plan = Plan {
            workers: if unit == PAGE_SIZE {
                1
            } else {
                self.config.workers
            },
            handler,
            sync: m.clone(),
            resumed: Instant::now(),
        };
        // Handing the plan over wakes the supervisor, which starts the
        // copiers on the background CPUs: done from here, in the pause, the
        // woken threads could take this thread's CPU before it resumes the
        // writers (docs/journal/2026-12-02-thread-start-mmap-lock.md). So the caller
        // starts them once the writers run (`start_copy`); until then the
        // fault handler copies whatever the writers touch.
        let launch: Launch = Box::new((shared.clone(), plan));
        *lock(&self.supervisor) = Some(Pending::Ready(standby, launch));
        m.spawn += t.elapsed();
        m.total = t_total.elapsed();
        *current = Some(shared);
        self.active.store(true, Ordering::Release);
        Ok(m)
    }

    /// Registers and protects `layout` with a running fault handler: the
    /// part of the sync phase `arm` moves out of the pause. With `armed`,
    /// the handler lets writes through (noting their chunks) until
    /// `Shared::armed` is cleared.
    fn set_up(
        &self,
        layout: Layout,
        image: &Arc<ImageFile>,
        unit: u64,
        armed: bool,
    ) -> Result<(Arc<Shared>, JoinHandle<HandlerStats>, SyncMetrics), Error> {
        let mut m = SyncMetrics::default();
        let pagemap = Pagemap::open()?;
        let sync_err = |source| Error::Uffd {
            phase: Phase::Sync,
            source,
        };
        // A VM still loading from a snapshot: its guest RAM is registered
        // with the loader's uffd already (a range takes one), and the loader
        // hands us the faults that are ours.
        let parent = match &self.config.lazy {
            Some(loader) => {
                let sink = Arc::new(EventSink::new().map_err(|source| Error::Memory {
                    phase: Phase::Sync,
                    op: "eventfd",
                    start: 0,
                    len: 0,
                    source,
                })?);
                loader
                    .attach(sink.clone())
                    .map(|uffd| (uffd, ParentLink::new(loader.clone(), sink)))
            }
            None => None,
        };
        if parent.is_some() && unit != CHUNK_SIZE {
            if let Some(l) = &self.config.lazy {
                l.detach();
            }
            return Err(Error::InvalidConfig(
                "a VM still loading its memory from a snapshot can only be snapshotted with async-fork",
            ));
        }
        let registered_here = parent.is_none();
        // The last snapshot's tracker, if it watched these very regions:
        // its uffd is registered and protects every chunk not written since.
        let handover = match (&self.config.track, &parent) {
            // Another mode needs guest RAM unregistered: tracking ends.
            (Some(slot), _) if unit != CHUNK_SIZE => {
                slot.clear();
                None
            }
            (Some(slot), None) => slot
                .take()
                .filter(|t| t.regions() == layout.regions())
                .map(DirtyTracker::hand_over),
            _ => None,
        };
        let (uffd, parent, dirty_before) = match (parent, handover) {
            (Some((uffd, link)), _) => (uffd, Some(link), None),
            (None, Some(h)) => (h.uffd, None, Some(h.dirty)),
            (None, None) => (
                Arc::new(Uffd::new(uffd_features()).map_err(sync_err)?),
                None,
                None,
            ),
        };
        let detach = |parent: &Option<ParentLink>| {
            if let Some(p) = parent {
                p.loader.detach();
            }
        };

        let t = Instant::now();
        if registered_here && dirty_before.is_none() {
            for (i, r) in layout.regions().iter().enumerate() {
                if let Err(e) = uffd.register(
                    r.host_addr,
                    r.len,
                    RegisterMode::MISSING.union(RegisterMode::WP),
                ) {
                    undo_sync(&uffd, &layout.regions()[..i], true);
                    return Err(sync_err(e));
                }
            }
        } else if let Some(p) = &parent {
            // Chunks that load from now on are protected as they land.
            p.loader.start_tracking();
        }
        m.register = t.elapsed();

        let t = Instant::now();
        let table = ChunkTable::new(layout.total_chunks() * (CHUNK_SIZE / unit) as usize);
        m.table_init = t.elapsed();

        let (nudge, stop) = match (EventFd::new(), EventFd::new()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(source), _) | (_, Err(source)) => {
                undo_sync(&uffd, layout.regions(), registered_here);
                detach(&parent);
                return Err(Error::Memory {
                    phase: Phase::Sync,
                    op: "eventfd",
                    start: 0,
                    len: 0,
                    source,
                });
            }
        };
        let staging = self.config.staging.lend(unit);
        let layout_chunks = layout.total_chunks();
        let shared = Arc::new(Shared {
            layout,
            unit,
            table,
            image: image.clone(),
            pagemap,
            uffd,
            parent,
            hugetlb: self.config.hugetlb,
            thp: self.config.thp,
            tracking: self.config.track.is_some() && unit == CHUNK_SIZE && registered_here,
            track_slot: self.config.track.clone(),
            dirty_after: (0..layout_chunks).map(|_| AtomicBool::new(false)).collect(),
            dirty_before,
            counters: Counters::default(),
            injection: self.config.injection.clone(),
            fault_copies: AtomicUsize::new(0),
            worker_copies: AtomicUsize::new(0),
            aborted: AtomicBool::new(false),
            all_copied: AtomicBool::new(false),
            error: Mutex::new(None),
            handler_nudge: nudge,
            handler_stop: stop,
            armed: AtomicBool::new(armed),
            written_while_armed: Mutex::new(Vec::new()),
            staging,
        });

        // The handler runs before anything is protected: with `armed` the
        // writers are running and fault as soon as protection lands.
        let t = Instant::now();
        let sh = shared.clone();
        let handler = match std::thread::Builder::new()
            .name("snap-faults".into())
            .spawn(move || fault_handler::run(sh))
        {
            Ok(h) => h,
            Err(source) => {
                undo_sync(&shared.uffd, shared.layout.regions(), registered_here);
                if let Some(p) = &shared.parent {
                    p.loader.stop_tracking();
                    p.loader.detach();
                }
                return Err(Error::Spawn {
                    phase: Phase::Sync,
                    name: "snap-faults".into(),
                    source,
                });
            }
        };
        m.spawn = t.elapsed();

        let t = Instant::now();
        if let Some(dirty) = &shared.dirty_before {
            // Taken over from a tracker: only what was written since the
            // last snapshot lacks protection.
            let list: Vec<usize> = (0..dirty.len()).filter(|&i| dirty[i]).collect();
            // Armed, in steps as below: one call over all of them stalled
            // an 8 GiB guest writing everywhere for the whole call (3 ms).
            let protected = if armed {
                let step = (self.config.arm_step.max(1)).div_ceil(CHUNK_SIZE) * CHUNK_SIZE;
                shared.protect_chunks_stepped(&list, step, ARM_STEP_GAP)
            } else {
                shared.protect_chunks(&list)
            };
            if let Err(e) = protected {
                tear_down(&shared, handler);
                return Err(e);
            }
            m.write_protect = t.elapsed();
            return Ok((shared, handler, m));
        }
        // Whole chunks, so a step never splits a huge page's protection.
        let step = (self.config.arm_step.max(1)).div_ceil(CHUNK_SIZE) * CHUNK_SIZE;
        for r in shared.layout.regions() {
            // Async-fork: one call per region, or per ARM_STEP when armed
            // ahead of the pause. Sync-wp: one per page, as QEMU's
            // background-snapshot pays it.
            let mut at = r.host_addr;
            while at < r.host_addr + r.len {
                let len = if unit == PAGE_SIZE {
                    PAGE_SIZE
                } else if armed {
                    if at > r.host_addr {
                        std::thread::sleep(ARM_STEP_GAP);
                    }
                    step.min(r.host_addr + r.len - at)
                } else {
                    r.len
                };
                if let Err(e) = shared.uffd.write_protect(at, len, true, false) {
                    tear_down(&shared, handler);
                    return Err(sync_err(e));
                }
                at += len;
            }
        }
        m.write_protect = t.elapsed();
        Ok((shared, handler, m))
    }

    /// An incremental snapshot, in the pause: every chunk not written since
    /// the parent (per the tracker that ran since, and what was written
    /// while armed) is settled as the parent's — inherited, or a hole.
    fn settle_inherited(
        &self,
        shared: &Shared,
        base: &[ChunkEntry],
        written_while_armed: &[usize],
    ) -> Result<(), Error> {
        let Some(dirty) = &shared.dirty_before else {
            return Err(Error::InvalidConfig(
                "an incremental snapshot needs the writes since its parent tracked: take a full snapshot first",
            ));
        };
        if base.len() != dirty.len() || shared.unit != CHUNK_SIZE {
            return Err(Error::InvalidConfig(
                "the parent snapshot's memory layout differs from this VM's",
            ));
        }
        let mut written = dirty.clone();
        for &i in written_while_armed {
            if let Some(w) = written.get_mut(i) {
                *w = true;
            }
        }
        for (i, (e, w)) in base.iter().zip(&written).enumerate() {
            if *w {
                continue;
            }
            let rec = if e.zero {
                Record::Zero
            } else {
                Record::Inherited(e.crc)
            };
            shared.table.pre_settle(i, rec);
            Counters::add(&shared.counters.inherited, 1);
        }
        Ok(())
    }
}
