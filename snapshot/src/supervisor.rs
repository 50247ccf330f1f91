//! The snapshot's supervisor thread: runs the workers, then either finishes
//! (every unit recorded in the image, unregister) or rolls back (lift every
//! protection), stops the fault handler and hands the result to
//! `Engine::wait`. The image file itself is the caller's: a rolled-back
//! snapshot's directory is removed by whoever created it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::chunk_table::{ChunkState, Copier, Record};
use crate::error::{Error, Phase};
use crate::finished::Snapshot;
use crate::metrics::{Counters, HandlerStats, Metrics, SyncMetrics};
use crate::persist::ChunkEntry;
use crate::shared::Shared;
use crate::worker;

#[derive(Debug)]
pub(crate) struct Plan {
    pub workers: usize,
    pub handler: JoinHandle<HandlerStats>,
    pub sync: SyncMetrics,
    /// When begin() finished (writers resumed).
    pub resumed: Instant,
}

use crate::error::panic_message as panic_msg;

/// `run`, with a panic of the supervisor itself (a bug) turned into a
/// rollback: every protection lifted, registrations gone, the handler told
/// to stop, so no writer stays blocked.
pub(crate) fn run_guarded(shared: Arc<Shared>, plan: Plan) -> Result<Snapshot, Error> {
    let sh = shared.clone();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(shared, plan))) {
        Ok(r) => r,
        Err(p) => {
            sh.fail(Error::Panicked {
                phase: Phase::Worker,
                what: format!("supervisor: {}", panic_msg(p)),
            });
            sh.table.fail_unclaimed();
            for r in sh.layout.regions() {
                let _ = sh.uffd.write_protect(r.host_addr, r.len, false, false);
                let _ = sh.uffd.unregister(r.host_addr, r.len);
            }
            sh.handler_stop.signal();
            Err(sh.take_error().unwrap_or(Error::Cancelled))
        }
    }
}

/// Holds the workers until every one of them has started (see `run`).
#[derive(Default)]
struct StartGate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    arrived: usize,
    open: bool,
}

impl StartGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A worker, done starting up, waits for the others.
    fn arrive_and_wait(&self) {
        let mut st = self.lock();
        st.arrived += 1;
        self.cv.notify_all();
        while !st.open {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until `n` workers arrived, then lets them all go.
    fn open_when_arrived(&self, n: usize) {
        let mut st = self.lock();
        while st.arrived < n {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.open = true;
        self.cv.notify_all();
    }
}

/// Starts `n` workers and lets them copy once every one has started up.
/// On a spawn failure the snapshot fails (the workers started see it and
/// leave).
///
/// Starting a thread maps memory (its stack; in the thread, the signal
/// stack and, at its first allocation, a malloc arena: mmap_lock taken
/// for writing each time). A worker already writing (its O_DIRECT pins
/// guest pages with mmap_lock held for reading) would make those wait,
/// and every later reader — the fault handler's pagemap read, the vCPUs'
/// own page faults — queue behind them. So no worker starts before every
/// one has started up.
fn start_workers(shared: &Arc<Shared>, n: usize) -> Vec<JoinHandle<()>> {
    let gate = Arc::new(StartGate::default());
    let mut workers = Vec::with_capacity(n);
    for w in 0..n {
        let sh = shared.clone();
        let g = gate.clone();
        match std::thread::Builder::new()
            .name(format!("snap-worker-{w}"))
            .spawn(move || {
                // This thread's first allocation creates its malloc
                // arena (mmap): have it now, before the gate.
                drop(std::hint::black_box(Vec::<u8>::with_capacity(64)));
                g.arrive_and_wait();
                worker::run(sh)
            }) {
            Ok(h) => workers.push(h),
            Err(source) => {
                shared.fail(Error::Spawn {
                    phase: Phase::Worker,
                    name: format!("snap-worker-{w}"),
                    source,
                });
                break;
            }
        }
    }
    // The pool's filler is the last thread this snapshot creates, before
    // anyone populates or pins memory (staging.rs).
    if let Some(st) = &shared.staging {
        st.start_filling();
    }
    gate.open_when_arrived(workers.len());
    workers
}

pub(crate) fn run(shared: Arc<Shared>, plan: Plan) -> Result<Snapshot, Error> {
    let workers = start_workers(&shared, plan.workers);
    for h in workers {
        if let Err(p) = h.join() {
            shared.fail(Error::ThreadPanicked(panic_msg(p)));
        }
    }

    let table = &shared.table;
    if !shared.is_aborted() {
        // Workers have claimed every unit they could; wait for the ones the
        // fault path or a hook is still saving. A unit left Protected can
        // only mean no worker ran: save it here rather than hang.
        for i in 0..table.len() {
            match table.state(i) {
                ChunkState::Copying => {
                    table.wait_settled(i);
                }
                ChunkState::Protected if table.try_claim(i) => {
                    shared.save_units(&[i], Copier::Worker);
                }
                _ => {}
            }
        }
        // Every unit is settled, so no fault fills a slot any more: write
        // out what is still staged.
        while shared.drain_one() {}
    }
    let copy_total = plan.resumed.elapsed();

    if shared.is_aborted() {
        // Rollback: nobody starts a new copy, then every remaining
        // protection goes (one ioctl per region), waking blocked writers.
        table.fail_unclaimed();
        shared.lift_all_protection();
    } else {
        shared.all_copied.store(true, Ordering::Release);
    }

    // Unregistering drops MISSING mode (first touches go back to the kernel)
    // and wakes any thread still parked on a missing page. Tracking writes,
    // a successful snapshot keeps the registration for its tracker.
    let t = Instant::now();
    let tracking = shared.tracking && !shared.is_aborted();
    if tracking {
        // (The tracker is started once the handler stopped reading.)
    } else if let Err(source) = shared.release_regions() {
        if !shared.is_aborted() {
            shared.fail(Error::Uffd {
                phase: Phase::Worker,
                source,
            });
        }
        // Last resort so no writer stays blocked.
        shared.lift_all_protection();
    }
    let finish = t.elapsed();

    shared.handler_stop.signal();
    let stats = match plan.handler.join() {
        Ok(s) => s,
        Err(p) => {
            shared.fail(Error::ThreadPanicked(panic_msg(p)));
            HandlerStats::new()
        }
    };
    let tracking = tracking && start_tracker(&shared);
    if let Some(p) = &shared.parent {
        // The loader serves every fault again (and may finish its load).
        p.loader.detach();
    }

    if shared.is_aborted() {
        return Err(shared.take_error().unwrap_or(Error::Cancelled));
    }
    let chunks = chunk_entries(&shared)?;
    let c = &shared.counters;
    let staging = shared.staging.as_ref();
    let metrics = Metrics {
        sync: plan.sync,
        copy_total,
        finish,
        unit_size: shared.unit,
        chunks_total: chunks.len(),
        chunks_by_workers: Counters::get(&c.by_workers),
        chunks_by_fault_path: Counters::get(&c.by_fault_path),
        chunks_by_hook: Counters::get(&c.by_hook),
        chunks_staged: Counters::get(&c.staged),
        direct_fault_writes: Counters::get(&c.direct_fault_writes),
        zero_chunks: chunks.iter().filter(|c| c.zero).count() as u64,
        chunks_from_parent: Counters::get(&c.from_parent),
        chunks_inherited: Counters::get(&c.inherited),
        tracking,
        bytes_written: Counters::get(&c.bytes_written),
        wp_faults: stats.wp_faults,
        missing_faults: stats.missing_faults,
        fault_latency: crate::metrics::LatencySummary::of(&stats.latency_ns),
        staging_bytes: staging.map_or(0, |s| s.bytes()),
        staging_peak_bytes: staging.map_or(0, |s| s.peak_bytes()),
        workers: plan.workers,
        direct_io: shared.image.is_direct(),
    };
    Ok(Snapshot {
        layout: shared.layout.clone(),
        chunks,
        metrics,
    })
}

/// Hands guest RAM, still registered and protected where unwritten since
/// the instant, to a `DirtyTracker` in the engine's slot. Without one (a
/// thread that cannot start) tracking ends: registrations go.
fn start_tracker(shared: &Shared) -> bool {
    let Some(slot) = &shared.track_slot else {
        let _ = shared.release_regions();
        return false;
    };
    let dirty = shared
        .dirty_after
        .iter()
        .map(|d| d.load(Ordering::Acquire))
        .collect();
    match crate::tracking::DirtyTracker::start(
        shared.uffd.clone(),
        shared.layout.clone(),
        dirty,
        shared.hugetlb,
        shared.thp,
    ) {
        Ok(t) => {
            slot.put(t);
            true
        }
        Err(e) => {
            tracing::warn!("dirty tracking off (cannot start its thread: {e}); the next snapshot is a full one");
            shared.lift_all_protection();
            let _ = shared.release_regions();
            false
        }
    }
}

/// Each 2 MiB chunk's entry for the state file, from its units' records:
/// a hole if every unit is, else data with the chunk's crc32c (the units'
/// crcs combined in order; a hole unit counts as zero bytes).
fn chunk_entries(shared: &Shared) -> Result<Vec<ChunkEntry>, Error> {
    let per = shared.units_per_chunk();
    let table = &shared.table;
    let zero_unit = crate::save::zero_crc(shared.unit);
    let mut out = Vec::with_capacity(table.len() / per);
    for ch in 0..table.len() / per {
        if per == 1 {
            if let Some(Record::Inherited(c)) = table.recorded(ch) {
                out.push(ChunkEntry::inherited(c));
                continue;
            }
        }
        let mut crc = 0u32;
        let mut data = false;
        for u in ch * per..(ch + 1) * per {
            let unit_crc = match table.recorded(u) {
                Some(Record::Zero) => zero_unit,
                Some(Record::Data(c)) => {
                    data = true;
                    c
                }
                None | Some(Record::Inherited(_)) => {
                    return Err(Error::ThreadPanicked(format!(
                        "unit {u} was never saved (a bug); snapshot rolled back"
                    )))
                }
            };
            crc = if u == ch * per {
                unit_crc
            } else {
                // Units smaller than a chunk are pages (sync-wp).
                crate::save::combine_page(crc, unit_crc)
            };
        }
        out.push(if data {
            ChunkEntry::data(crc)
        } else {
            ChunkEntry::zero()
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::StartGate;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn workers_start_together_once_all_arrived() {
        let gate = Arc::new(StartGate::default());
        let started = Arc::new(AtomicUsize::new(0));
        let spawn = |gate: &Arc<StartGate>, started: &Arc<AtomicUsize>| {
            let (g, s) = (gate.clone(), started.clone());
            std::thread::spawn(move || {
                g.arrive_and_wait();
                s.fetch_add(1, Ordering::SeqCst);
            })
        };
        let first = spawn(&gate, &started);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            started.load(Ordering::SeqCst),
            0,
            "ran before the gate opened"
        );
        let second = spawn(&gate, &started);
        gate.open_when_arrived(2);
        first.join().unwrap();
        second.join().unwrap();
        assert_eq!(started.load(Ordering::SeqCst), 2);
        // Open stays open, and a gate with no workers opens at once.
        gate.arrive_and_wait();
        StartGate::default().open_when_arrived(0);
    }
}
