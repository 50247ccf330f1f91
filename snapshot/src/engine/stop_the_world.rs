//! The stop-the-world baseline (Firecracker, Cloud Hypervisor): `begin`
//! writes every populated page to the image with the VM paused.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{standby::Pending, Engine};
use crate::error::{Error, Phase};
use crate::finished::Snapshot;
use crate::memory::Pagemap;
use crate::metrics::{Metrics, SyncMetrics};
use crate::persist::{ChunkEntry, ImageFile};
use crate::region::{Layout, CHUNK_SIZE, PAGES_PER_CHUNK};
use crate::save::{examine, write_runs, Record};
use crate::sync::lock;

impl Engine {
    /// Stop-the-world: write every populated page to the image now, with
    /// `workers` threads (this one included), while the caller keeps
    /// writers paused.
    pub(super) fn begin_stop_the_world(
        &self,
        layout: Layout,
        image: &Arc<ImageFile>,
        t_total: Instant,
    ) -> Result<SyncMetrics, Error> {
        let mut m = SyncMetrics::default();
        let pagemap = Pagemap::open()?;
        let n = layout.total_chunks();
        let t = Instant::now();
        let records: Vec<Mutex<Option<Record>>> = (0..n).map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let bytes = AtomicU64::new(0);
        let error: Mutex<Option<Error>> = Mutex::new(None);
        let failed = AtomicBool::new(false);
        let copier = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n || failed.load(Ordering::Relaxed) {
                return;
            }
            let res = if self.config.injection.fail_worker_copy_at == Some(i) {
                Err(Error::Injected {
                    phase: Phase::Worker,
                    what: format!("stop-the-world copy failure at chunk {i}"),
                })
            } else {
                let loc = layout.chunk(i);
                // A panic (a bug) fails this snapshot instead of the
                // caller, which holds the VM paused.
                crate::recover::catching(Phase::Sync, || {
                    let pop = pagemap.populated(loc.host_addr, PAGES_PER_CHUNK, Phase::Sync)?;
                    // SAFETY: chunk i is this thread's alone (claimed
                    // through `next`); the caller keeps every writer paused
                    // during begin() and the regions mapped (begin's
                    // contract), so its populated pages are readable and
                    // still.
                    let rec = unsafe { examine(loc.host_addr as *const u8, &pop) };
                    if rec == Record::Zero {
                        return Ok((rec, 0));
                    }
                    // SAFETY: as above.
                    let written =
                        unsafe { write_runs(image, loc.host_addr, loc.image_offset, &pop) }
                            .map_err(|source| Error::Write {
                                phase: Phase::Sync,
                                source,
                            })?;
                    Ok((rec, written))
                })
            };
            match res {
                Ok((rec, b)) => {
                    *lock(&records[i]) = Some(rec);
                    bytes.fetch_add(b, Ordering::Relaxed);
                }
                Err(e) => {
                    lock(&error).get_or_insert(e);
                    failed.store(true, Ordering::Relaxed);
                    return;
                }
            }
        };
        let workers = self.config.workers.min(n).max(1);
        std::thread::scope(|s| {
            for w in 1..workers {
                // A helper that cannot be spawned only costs speed: this
                // thread copies too.
                let _ = std::thread::Builder::new()
                    .name(format!("snap-stw-{w}"))
                    .spawn_scoped(s, copier);
            }
            copier();
        });
        m.copy = t.elapsed();
        if let Some(e) = lock(&error).take() {
            return Err(e);
        }
        if self.config.injection.fail_sync {
            return Err(Error::Injected {
                phase: Phase::Sync,
                what: "sync-phase failure after the copy".into(),
            });
        }
        m.total = t_total.elapsed();
        let chunks: Vec<ChunkEntry> = records
            .into_iter()
            .map(
                |r| match r.into_inner().unwrap_or_else(|p| p.into_inner()) {
                    Some(Record::Data(crc)) => ChunkEntry::data(crc),
                    _ => ChunkEntry::zero(),
                },
            )
            .collect();
        let metrics = Metrics {
            sync: m.clone(),
            copy_total: Duration::ZERO,
            finish: Duration::ZERO,
            unit_size: CHUNK_SIZE,
            chunks_total: n,
            chunks_by_workers: n as u64,
            chunks_by_fault_path: 0,
            chunks_by_hook: 0,
            chunks_staged: 0,
            direct_fault_writes: 0,
            zero_chunks: chunks.iter().filter(|c| c.zero).count() as u64,
            chunks_from_parent: 0,
            chunks_inherited: 0,
            tracking: false,
            bytes_written: bytes.into_inner(),
            wp_faults: 0,
            missing_faults: 0,
            fault_latency: Default::default(),
            staging_bytes: 0,
            staging_peak_bytes: 0,
            workers,
            direct_io: image.is_direct(),
        };
        *lock(&self.supervisor) = Some(Pending::Done(Box::new(Snapshot {
            layout,
            chunks,
            metrics,
        })));
        Ok(m)
    }
}
