//! A snapshot in flight or finished: its state, progress, metrics, and the
//! cancel that rolls it back. Cheap to clone; shared by whoever started the
//! snapshot and the snapshot thread that finishes it.

pub(super) use snapvm_snapshot::sync::lock;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use snapvm_snapshot::{Engine, ImageFile};

use super::metrics::SnapshotMetrics;
use super::request::SnapshotError;

/// Where a snapshot is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotState {
    /// Its instant has passed (the guest runs again); memory is being
    /// written to the image.
    Copying,
    /// Memory written; making it durable (fsync, state file, rename).
    Persisting,
    /// Durable, at its final path.
    Done,
    Failed(String),
}

impl SnapshotState {
    pub fn is_finished(&self) -> bool {
        matches!(self, SnapshotState::Done | SnapshotState::Failed(_))
    }

    pub fn name(&self) -> &'static str {
        match self {
            SnapshotState::Copying => "copying",
            SnapshotState::Persisting => "persisting",
            SnapshotState::Done => "done",
            SnapshotState::Failed(_) => "failed",
        }
    }
}

/// Live progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotProgress {
    pub state: SnapshotState,
    /// Copy units saved (2 MiB chunks; 4 KiB pages for sync-wp); zero for
    /// the fork baseline, whose child does not report them.
    pub chunks_done: usize,
    pub chunks_total: usize,
    /// Bytes of memory in the image so far.
    pub bytes_written: u64,
    /// Bytes of guest memory the image holds (its length).
    pub image_len: u64,
}

/// Who writes the memory of a snapshot in flight.
#[derive(Debug, Clone)]
pub(super) enum Copier {
    Engine(Arc<Engine>),
    /// The `fork` baseline's writer process.
    Fork(libc::pid_t),
}

#[derive(Debug)]
pub(super) struct Inner {
    pub state: SnapshotState,
    pub metrics: SnapshotMetrics,
}

#[derive(Debug)]
pub(super) struct Tracker {
    pub dir: PathBuf,
    /// The image being written, for progress; let go (closing the file)
    /// once the snapshot ends, as the registry keeps handles for good.
    pub image: Mutex<Option<Arc<ImageFile>>>,
    pub image_len: u64,
    pub copier: Mutex<Option<Copier>>,
    pub inner: Mutex<Inner>,
    pub changed: Condvar,
    pub checksums: OnceLock<Vec<u32>>,
    pub t_request: Instant,
}

/// A snapshot begun by [`super::Snapshotter::take`].
#[derive(Debug, Clone)]
pub struct SnapshotHandle {
    pub(super) t: Arc<Tracker>,
}

impl SnapshotHandle {
    pub(super) fn new(
        dir: PathBuf,
        image: Arc<ImageFile>,
        metrics: SnapshotMetrics,
        t_request: Instant,
    ) -> SnapshotHandle {
        SnapshotHandle {
            t: Arc::new(Tracker {
                dir,
                image_len: image.len(),
                image: Mutex::new(Some(image)),
                copier: Mutex::new(None),
                inner: Mutex::new(Inner {
                    state: SnapshotState::Copying,
                    metrics,
                }),
                changed: Condvar::new(),
                checksums: OnceLock::new(),
                t_request,
            }),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.t.dir
    }

    pub fn state(&self) -> SnapshotState {
        lock(&self.t.inner).state.clone()
    }

    pub fn progress(&self) -> SnapshotProgress {
        let state = self.state();
        let image = lock(&self.t.image).clone();
        let mut p = SnapshotProgress {
            state,
            chunks_done: 0,
            chunks_total: 0,
            bytes_written: image.as_ref().map_or(0, |i| i.bytes_written()),
            image_len: self.t.image_len,
        };
        match lock(&self.t.copier).as_ref() {
            Some(Copier::Engine(e)) => {
                if let Some(live) = e.progress() {
                    p.chunks_done = live.chunks_done;
                    p.chunks_total = live.chunks_total;
                    p.bytes_written = live.bytes_written;
                }
            }
            // The child's counters are its own: the file tells.
            Some(Copier::Fork(_)) => {
                p.bytes_written = image.as_ref().map_or(0, |i| i.allocated_bytes())
            }
            None => {}
        }
        let inner = lock(&self.t.inner);
        if let Some(m) = &inner.metrics.engine {
            let units =
                (m.chunks_total as u64 * snapvm_snapshot::CHUNK_SIZE / m.unit_size) as usize;
            p.chunks_done = units;
            p.chunks_total = units;
            p.bytes_written = m.bytes_written;
        } else if let Some(w) = &inner.metrics.persist {
            p.bytes_written = w.bytes_written;
        }
        p
    }

    /// Cancels the snapshot while its memory is being written: the engine
    /// rolls back (protections lifted, the VM untouched) or the fork child
    /// is killed, and the snapshot ends as failed with nothing left on
    /// disk. Too late once persisting has begun (an error, nothing
    /// changes).
    pub fn cancel(&self) -> Result<(), SnapshotError> {
        if self.state() != SnapshotState::Copying {
            return Err(SnapshotError::Invalid(format!(
                "snapshot {} is {}: too late to cancel",
                self.t.dir.display(),
                self.state().name()
            )));
        }
        let copier = lock(&self.t.copier).clone();
        match copier {
            None => Err(SnapshotError::Invalid(
                "the snapshot has not started copying".into(),
            )),
            Some(Copier::Engine(e)) => e.cancel().map_err(SnapshotError::Engine),
            Some(Copier::Fork(pid)) => {
                // SAFETY: signalling our own child (not yet reaped: the
                // snapshot thread reaps it), no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                Ok(())
            }
        }
    }

    /// Metrics so far (complete once finished).
    pub fn metrics(&self) -> SnapshotMetrics {
        lock(&self.t.inner).metrics.clone()
    }

    /// Blocks until the snapshot is durable (Ok) or failed.
    pub fn wait(&self) -> Result<SnapshotMetrics, SnapshotError> {
        self.wait_timeout(Duration::MAX)
            .unwrap_or_else(|| Err(SnapshotError::Failed("wait timed out".into())))
    }

    /// As [`Self::wait`], giving up (None) after `timeout`.
    pub fn wait_timeout(
        &self,
        timeout: Duration,
    ) -> Option<Result<SnapshotMetrics, SnapshotError>> {
        let deadline = Instant::now().checked_add(timeout);
        let mut inner = lock(&self.t.inner);
        loop {
            match &inner.state {
                SnapshotState::Done => return Some(Ok(inner.metrics.clone())),
                SnapshotState::Failed(why) => return Some(Err(SnapshotError::Failed(why.clone()))),
                _ => {}
            }
            let left = match deadline {
                Some(d) => d.checked_duration_since(Instant::now())?,
                None => Duration::from_secs(3600),
            };
            inner = match self.t.changed.wait_timeout(inner, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// With [`super::SnapshotRequest::capture_checksums`]: crc32c of every
    /// 2 MiB chunk of guest RAM taken while paused, regions in order (the
    /// order of the snapshot image).
    pub fn sync_checksums(&self) -> Option<&[u32]> {
        self.t.checksums.get().map(Vec::as_slice)
    }

    pub(super) fn set_state(&self, state: SnapshotState) {
        if state.is_finished() {
            // Nothing to follow any more: the image file and the engine go.
            lock(&self.t.image).take();
            lock(&self.t.copier).take();
        }
        lock(&self.t.inner).state = state;
        self.t.changed.notify_all();
    }
}
