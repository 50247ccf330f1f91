//! Writing a finished `Snapshot` into a snapshot directory, atomically.
//!
//! Everything goes into `<target>.incomplete-<pid>-<n>` beside the target: first
//! memory.img (sparse: set_len, then only non-zero chunks written), fsync,
//! then state.bin (whose checksum covers the header, every chunk checksum and
//! the VM state), fsync, fsync of the directory, and only then a rename into
//! place (`RENAME_NOREPLACE`, or `RENAME_EXCHANGE` + removal of the old
//! directory with `overwrite`), and an fsync of the parent. A crash at any
//! point leaves either no target or the complete one; a temp dir left by a
//! crash is never mistaken for a snapshot (different name, and its state
//! file is missing or fails its checksum). On error the temp dir is removed.
//! A temp dir that outlived its writer (snapvm was killed mid-write) is
//! removed by the next write to the same target once that process is gone.

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
use super::write_behind::{self, WriteBehind};
use crate::inject::EnvInjection;
use crate::snapshot::Snapshot;

/// How to write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Replace an existing target directory (atomically). Without it an
    /// existing target is refused.
    pub overwrite: bool,
    /// Test hook: after this many bytes of file data, fail the next write
    /// with the given errno (e.g. `libc::ENOSPC`, `libc::EIO`).
    pub fail_after_bytes: Option<(u64, i32)>,
}

/// Reported after each chunk and at the end (`bytes_done == bytes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteProgress {
    /// Memory (non-hole chunks as flagged by the engine) plus VM state.
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSummary {
    pub path: PathBuf,
    /// Logical size of memory.img.
    pub image_len: u64,
    /// Bytes actually written to memory.img (non-zero chunks).
    pub data_bytes: u64,
    /// Chunks stored as holes (engine-flagged zero, or found all-zero).
    pub zero_chunks: usize,
    pub state_bytes: u64,
    pub elapsed: Duration,
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

/// Counts file bytes for the failure hook.
struct Budget {
    written: u64,
    fail: Option<(u64, i32)>,
}

impl Budget {
    fn write_at(&mut self, f: &File, buf: &[u8], off: u64) -> io::Result<()> {
        if let Some((after, errno)) = self.fail {
            if self.written + buf.len() as u64 > after {
                let n = (after - self.written.min(after)) as usize;
                f.write_all_at(&buf[..n], off)?;
                self.written += n as u64;
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        f.write_all_at(buf, off)?;
        self.written += buf.len() as u64;
        Ok(())
    }
}

fn is_all_zero(b: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets
    // the aligned middle part of the slice.
    let (head, mid, tail) = unsafe { b.align_to::<u128>() };
    head.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
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

/// The header describing `snap` (chunk checksums filled in by the writer).
fn layout_header(snap: &Snapshot) -> Header {
    let cs = crate::region::CHUNK_SIZE;
    let regions = snap
        .layout
        .regions()
        .iter()
        .enumerate()
        .map(|(i, r)| RegionEntry {
            guest_addr: r.guest_addr,
            len: r.len,
            file_offset: snap.layout.first_chunk(i) as u64 * cs,
        })
        .collect();
    Header {
        chunk_size: cs,
        image_len: snap.layout.total_bytes(),
        regions,
        chunks: vec![ChunkEntry { zero: true, crc: 0 }; snap.chunk_count()],
    }
}

/// Writes `snap` and the VMM's `vm_state` blob as a snapshot directory at
/// `target`. Refuses an existing target unless `opts.overwrite`. Calls
/// `progress` after every chunk. On error nothing is left behind (neither
/// the target nor the temp directory), and an existing target is untouched.
pub fn write_snapshot(
    snap: &Snapshot,
    vm_state: &[u8],
    target: &Path,
    opts: &WriteOptions,
    progress: &mut dyn FnMut(WriteProgress),
) -> Result<WriteSummary, PersistError> {
    let t0 = Instant::now();
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

    let mut header = layout_header(snap);
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
    let mut guard = TmpGuard {
        path: tmp.clone(),
        armed: true,
    };
    let mut budget = Budget {
        written: 0,
        fail: opts.fail_after_bytes.or(env.fail_after_bytes),
    };

    // memory.img: sparse, holes for zero chunks.
    let cs = header.chunk_size;
    let mem_path = tmp.join(MEMORY_FILE);
    let mem = create_file(&mem_path)?;
    mem.set_len(header.image_len)
        .map_err(|e| PersistError::io(&mem_path, "set length of", e))?;
    let total =
        (snap.zero_chunks().iter().filter(|z| !**z).count() as u64) * cs + vm_state.len() as u64;
    let mut done = 0u64;
    let mut data_bytes = 0u64;
    let image = snap.image();
    let mut behind = WriteBehind::new(&mem, write_behind::DEFAULT_WINDOW);
    for (i, pos) in header.clone().chunk_positions().enumerate() {
        if snap.chunk_is_zero(i) {
            continue;
        }
        let src_off = i as u64 * cs;
        let bytes = &image[src_off as usize..(src_off + cs) as usize];
        if !is_all_zero(bytes) {
            header.chunks[i] = ChunkEntry {
                zero: false,
                crc: format::checksum(bytes),
            };
            budget
                .write_at(&mem, bytes, pos.file_offset)
                .map_err(|e| PersistError::io(&mem_path, "write", e))?;
            behind
                .written(pos.file_offset, cs)
                .map_err(|e| PersistError::io(&mem_path, "write back", e))?;
            data_bytes += cs;
            if env.chunk_delay_ms > 0 {
                std::thread::sleep(Duration::from_millis(env.chunk_delay_ms));
            }
        }
        done += cs;
        progress(WriteProgress {
            bytes_done: done,
            bytes_total: total,
        });
    }
    mem.sync_all()
        .map_err(|e| PersistError::io(&mem_path, "fsync", e))?;
    drop(mem);

    // state.bin last: its presence with a valid checksum marks completeness.
    let state = format::encode(&header, vm_state);
    let state_path = tmp.join(STATE_FILE);
    let f = create_file(&state_path)?;
    budget
        .write_at(&f, &state, 0)
        .map_err(|e| PersistError::io(&state_path, "write", e))?;
    f.sync_all()
        .map_err(|e| PersistError::io(&state_path, "fsync", e))?;
    drop(f);
    fsync_dir(&tmp)?;

    match renameat2(&tmp, target, libc::RENAME_NOREPLACE) {
        Ok(()) => guard.armed = false,
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) && opts.overwrite => {
            // Swap atomically; the old snapshot is now at `tmp` and goes
            // with the guard.
            renameat2(&tmp, target, libc::RENAME_EXCHANGE)
                .map_err(|e| PersistError::io(target, "replace", e))?;
        }
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            return Err(PersistError::TargetExists(target.into()))
        }
        Err(e) => return Err(PersistError::io(target, "rename into place", e)),
    }
    drop(guard);
    fsync_dir(parent)?;
    done += vm_state.len() as u64;
    progress(WriteProgress {
        bytes_done: done,
        bytes_total: total,
    });
    Ok(WriteSummary {
        path: target.into(),
        image_len: header.image_len,
        data_bytes,
        zero_chunks: header.chunks.iter().filter(|c| c.zero).count(),
        state_bytes: state.len() as u64,
        elapsed: t0.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_handles_unaligned_edges() {
        let mut v = vec![0u8; 1000];
        assert!(is_all_zero(&v[3..997]));
        v[3] = 1;
        assert!(!is_all_zero(&v[3..997]));
        v[3] = 0;
        v[996] = 1;
        assert!(!is_all_zero(&v[3..997]));
        assert!(is_all_zero(&v[3..996]));
    }
}
