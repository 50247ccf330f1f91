//! A snapshot directory's life: created before the snapshot's pause,
//! filled while the snapshot runs, committed when it is complete.
//!
//! [`SnapshotWriter::create`] makes `<target>.incomplete-<pid>-<n>` beside
//! the target and a sparse `memory.img` in it (the engine writes guest RAM
//! straight into it, `image.rs`). [`SnapshotWriter::commit`] then fsyncs
//! memory.img, writes state.bin (whose checksum covers the header, every
//! chunk checksum and the VM state), fsyncs it and the directory, renames
//! the directory into place (`RENAME_NOREPLACE`, or `RENAME_EXCHANGE` +
//! removal of the old directory with `overwrite`) and fsyncs the parent:
//! only then is the snapshot durable and done (DESIGN.md §2).
//!
//! A crash at any point leaves either no target or the complete one; a temp
//! dir left by a crash is never mistaken for a snapshot (different name, and
//! its state file is missing). A writer dropped without commit (a failed or
//! cancelled snapshot) removes its temp dir. A temp dir that outlived its
//! process (snapvm was killed mid-write) is removed by the next writer of
//! the same target once that process is gone.

use std::ffi::{CString, OsStr};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::error::PersistError;
use super::format::{self, ChunkEntry, Header, RegionEntry, MEMORY_FILE, STATE_FILE};
use super::image::{ImageFaults, ImageFile};
use crate::finished::Snapshot;
use crate::inject::EnvInjection;
use crate::region::{Region, CHUNK_SIZE};
use std::sync::Arc;

/// How to write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Replace an existing target directory (atomically). Without it an
    /// existing target is refused.
    pub overwrite: bool,
    /// Test hook: after this many bytes of memory image, fail every write
    /// with the given errno (e.g. `libc::ENOSPC`, `libc::EIO`).
    pub fail_after_bytes: Option<(u64, i32)>,
    /// An incremental snapshot: its parent (the chunks it inherits are not
    /// written).
    pub parent: Option<super::format::ParentRef>,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSummary {
    pub path: PathBuf,
    /// Logical size of memory.img.
    pub image_len: u64,
    /// Bytes of the chunks that hold data (2 MiB each).
    pub data_bytes: u64,
    /// Bytes written to memory.img (holes inside partly populated chunks
    /// are not written).
    pub bytes_written: u64,
    /// Chunks stored as holes.
    pub zero_chunks: usize,
    pub state_bytes: u64,
    /// state.bin's trailer crc32c: with `state_bytes`, the content id a
    /// child records for this snapshot as its parent.
    pub state_crc: u32,
    /// `commit` itself: fsync of the image, state.bin, rename, fsyncs.
    pub commit: Duration,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Between the target's name and `<pid>-<n>` in its temp dir's name: says
/// what a leftover is to whoever lists the directory.
pub const TMP_INFIX: &str = ".incomplete-";

/// Removes `<name>.incomplete-<pid>-<n>` dirs in `parent` whose writer
/// process is gone (killed mid-write): they can never complete. Dirs of a
/// live process (this one included) are left alone. Best effort.
fn remove_stale_temps(parent: &Path, name: &OsStr) {
    let mut prefix = name.as_bytes().to_vec();
    prefix.extend_from_slice(TMP_INFIX.as_bytes());
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.as_bytes().strip_prefix(prefix.as_slice()) else {
            continue;
        };
        let pid = rest.split(|&b| b == b'-').next().unwrap_or_default();
        let Some(pid) = std::str::from_utf8(pid)
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::warn!(
                "removed {}: an incomplete snapshot left by snapvm process {pid}, which is gone",
                path.display()
            ),
            Err(e) => tracing::warn!("cannot remove stale {}: {e}", path.display()),
        }
    }
}

/// Removes the temp directory unless disarmed.
#[derive(Debug)]
struct TmpGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn create_file(path: &Path) -> Result<File, PersistError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| PersistError::io(path, "create", e))
}

fn fsync_dir(path: &Path) -> Result<(), PersistError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| PersistError::io(path, "fsync directory", e))
}

fn cstr(p: &Path) -> Result<CString, PersistError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| PersistError::InvalidTarget(p.into()))
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (a, b) = match (cstr(from), cstr(to)) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    // SAFETY: two valid NUL-terminated paths; plain syscall.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A snapshot directory being written (see the module docs).
#[derive(Debug)]
pub struct SnapshotWriter {
    target: PathBuf,
    parent: PathBuf,
    tmp: PathBuf,
    overwrite: bool,
    header: Header,
    image: Arc<ImageFile>,
    guard: TmpGuard,
}

impl SnapshotWriter {
    /// Creates the temp directory and an empty, sparse memory.img sized
    /// for `regions` (laid out back to back in this order, as the engine
    /// numbers chunks). Refuses an existing target unless
    /// `opts.overwrite`. Nothing is visible at `target` until `commit`.
    pub fn create(
        target: &Path,
        regions: &[Region],
        opts: &WriteOptions,
    ) -> Result<SnapshotWriter, PersistError> {
        let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
            return Err(PersistError::InvalidTarget(target.into()));
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        match std::fs::symlink_metadata(target) {
            Ok(_) if !opts.overwrite => return Err(PersistError::TargetExists(target.into())),
            Ok(m) if !m.is_dir() => return Err(PersistError::TargetNotDirectory(target.into())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(PersistError::io(target, "stat", e)),
        }
        let mut header = Header {
            chunk_size: CHUNK_SIZE,
            image_len: 0,
            regions: Vec::with_capacity(regions.len()),
            chunks: Vec::new(),
            parent: opts.parent.clone(),
        };
        for r in regions {
            header.regions.push(RegionEntry {
                guest_addr: r.guest_addr,
                len: r.len,
                file_offset: header.image_len,
            });
            header.image_len = header.image_len.saturating_add(r.len);
        }
        let chunks = (header.image_len / CHUNK_SIZE) as usize;
        header.chunks = vec![ChunkEntry::zero(); chunks];
        header.validate().map_err(PersistError::InvalidSnapshot)?;
        let env = EnvInjection::next_persist()
            .map_err(PersistError::Injection)?
            .unwrap_or_default();
        remove_stale_temps(parent, name);

        let mut tmp_name = name.to_os_string();
        tmp_name.push(format!(
            "{TMP_INFIX}{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = parent.join(tmp_name);
        DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(|e| PersistError::io(&tmp, "create directory", e))?;
        let guard = TmpGuard {
            path: tmp.clone(),
            armed: true,
        };
        let faults = ImageFaults {
            fail_after_bytes: opts.fail_after_bytes.or(env.fail_after_bytes),
            write_delay_ms: env.chunk_delay_ms,
        };
        let image = ImageFile::create(&tmp.join(MEMORY_FILE), header.image_len, faults)?;
        Ok(SnapshotWriter {
            target: target.into(),
            parent: parent.into(),
            tmp,
            overwrite: opts.overwrite,
            header,
            image: Arc::new(image),
            guard,
        })
    }

    /// The memory image the engine writes into.
    pub fn image(&self) -> &Arc<ImageFile> {
        &self.image
    }

    /// Where the directory is being written (removed unless committed).
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Completes the snapshot: the chunk entries of `snap` (which the
    /// engine wrote into this writer's image) and the VMM's `vm_state`
    /// go into state.bin; everything is fsync'd and the directory renamed
    /// into place, then the parent fsync'd. Returns once the snapshot is
    /// durable. On error nothing is left behind and an existing target is
    /// untouched.
    pub fn commit(self, snap: &Snapshot, vm_state: &[u8]) -> Result<WriteSummary, PersistError> {
        self.commit_chunks(snap.chunks(), vm_state)
    }

    /// `commit` for an image filled without the engine (the fork
    /// baseline's child): `chunks` in image order.
    pub fn commit_chunks(
        mut self,
        chunks: &[ChunkEntry],
        vm_state: &[u8],
    ) -> Result<WriteSummary, PersistError> {
        let t0 = Instant::now();
        if chunks.len() != self.header.chunks.len() {
            return Err(PersistError::InvalidSnapshot(format!(
                "{} chunk entries for an image of {} chunks",
                chunks.len(),
                self.header.chunks.len()
            )));
        }
        self.header.chunks = chunks.to_vec();
        self.header
            .validate()
            .map_err(PersistError::InvalidSnapshot)?;
        self.image.sync()?;

        // state.bin last: its presence with a valid checksum marks completeness.
        let state = format::encode(&self.header, vm_state);
        let state_path = self.tmp.join(STATE_FILE);
        let f = create_file(&state_path)?;
        f.write_all_at(&state, 0)
            .map_err(|e| PersistError::io(&state_path, "write", e))?;
        f.sync_all()
            .map_err(|e| PersistError::io(&state_path, "fsync", e))?;
        drop(f);
        fsync_dir(&self.tmp)?;

        let (tmp, target) = (&self.tmp, &self.target);
        match renameat2(tmp, target, libc::RENAME_NOREPLACE) {
            Ok(()) => self.guard.armed = false,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && self.overwrite => {
                // Swap atomically; the old snapshot is now at `tmp` and goes
                // with the guard, below.
                renameat2(tmp, target, libc::RENAME_EXCHANGE)
                    .map_err(|e| PersistError::io(target, "replace", e))?;
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                return Err(PersistError::TargetExists(target.clone()))
            }
            Err(e) => return Err(PersistError::io(target, "rename into place", e)),
        }
        let old = std::mem::replace(
            &mut self.guard,
            TmpGuard {
                path: PathBuf::new(),
                armed: false,
            },
        );
        drop(old);
        fsync_dir(&self.parent)?;
        Ok(WriteSummary {
            path: self.target.clone(),
            image_len: self.header.image_len,
            data_bytes: self.header.data_bytes(),
            // Another process's writes (the fork baseline's child) are
            // not in this process's counter: the file's blocks tell.
            bytes_written: match self.image.bytes_written() {
                0 => self.image.allocated_bytes(),
                n => n,
            },
            zero_chunks: self.header.chunks.iter().filter(|c| c.zero).count(),
            state_bytes: state.len() as u64,
            state_crc: state
                .get(state.len().saturating_sub(4)..)
                .map_or(0, |t| u32::from_le_bytes([t[0], t[1], t[2], t[3]])),
            commit: t0.elapsed(),
        })
    }
}
