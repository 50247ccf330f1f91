//! The `fork` baseline (DESIGN.md §2: Redis's BGSAVE moved into the
//! hypervisor): while the vCPUs and devices are paused the VMM process
//! forks; the child holds a copy-on-write image of guest RAM as of the fork
//! and writes the snapshot directory from it, then exits. The parent
//! resumes the guest at once and pays for the fork (page-table copy) in the
//! pause, and for copy-on-write faults afterwards.
//!
//! The child writes the same format as `snapshot::write_snapshot`
//! (sparse memory.img, then state.bin, fsyncs, atomic rename) using only
//! plain syscalls and allocation (glibc makes malloc safe after fork);
//! it reports to the parent over a pipe: `ok DATA ZERO STATE` or `err MSG`.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use snapshot::persist::format::{self, ChunkEntry, Header, RegionEntry};
use snapshot::persist::{MEMORY_FILE, STATE_FILE};
use snapshot::{Region, CHUNK_SIZE};

/// What the child reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ForkReport {
    pub image_len: u64,
    pub data_bytes: u64,
    pub zero_chunks: usize,
    pub state_bytes: u64,
}

/// A forked writer: its pid and the read end of its report pipe.
#[derive(Debug)]
pub(super) struct ForkChild {
    pub pid: libc::pid_t,
    report: File,
    /// The child's temp directory, removed here if the child died in it.
    tmp: PathBuf,
}

impl ForkChild {
    /// Blocks until the child exits; its report or why it failed (then
    /// nothing is left behind).
    pub fn wait(self) -> Result<ForkReport, String> {
        let tmp = self.tmp.clone();
        let res = self.wait_inner();
        if res.is_err() {
            let _ = std::fs::remove_dir_all(tmp);
        }
        res
    }

    fn wait_inner(mut self) -> Result<ForkReport, String> {
        let mut text = String::new();
        let _ = self.report.read_to_string(&mut text);
        let mut status = 0;
        // SAFETY: waiting for our own child; `status` is a valid out-pointer.
        let rc = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        if rc < 0 {
            return Err(format!(
                "waitpid of the fork writer: {}",
                io::Error::last_os_error()
            ));
        }
        if libc::WIFSIGNALED(status) {
            return Err(format!(
                "the fork writer was killed by signal {}",
                libc::WTERMSIG(status)
            ));
        }
        let text = text.trim();
        if let Some(msg) = text.strip_prefix("err ") {
            return Err(msg.to_string());
        }
        let mut it = text
            .strip_prefix("ok ")
            .unwrap_or("")
            .split(' ')
            .map(|w| w.parse::<u64>().ok());
        match (
            it.next().flatten(),
            it.next().flatten(),
            it.next().flatten(),
            it.next().flatten(),
        ) {
            (Some(image_len), Some(data_bytes), Some(zero), Some(state_bytes))
                if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 =>
            {
                Ok(ForkReport {
                    image_len,
                    data_bytes,
                    zero_chunks: zero as usize,
                    state_bytes,
                })
            }
            _ => Err(format!(
                "the fork writer failed (status {status:#x}, report {text:?})"
            )),
        }
    }
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Forks a writer of `regions` (guest RAM, paused) and `blob` into `dir`.
/// Call with every vCPU and device paused: the child's memory is the
/// guest's at this instant. `cpus`: where the child runs (`--cpus`
/// background CPUs), off the guest's.
pub(super) fn spawn(
    regions: &[Region],
    blob: &[u8],
    dir: &Path,
    overwrite: bool,
    cpus: Option<&snapshot::CpuSet>,
) -> io::Result<ForkChild> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a usable snapshot path", dir.display()),
        ));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    if !overwrite && std::fs::symlink_metadata(dir).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} already exists", dir.display()),
        ));
    }
    let mut tmp_name = name.to_os_string();
    // Named like the engine's writer's temp dirs, so a leftover gets the
    // same "incomplete snapshot" refusal and stale-dir cleanup.
    tmp_name.push(format!(
        "{}{}-fork",
        snapshot::persist::TMP_INFIX,
        std::process::id()
    ));
    let tmp = parent.join(tmp_name);
    let c_tmp = cstring(&tmp)?;
    let c_dir = cstring(dir)?;
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two fds, owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fork has no memory-safety preconditions; the child below only
    // makes syscalls and allocations (glibc's fork makes malloc usable in
    // the child) and leaves with _exit, never returning into the caller.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        drop(read_end);
        if let Some(cpus) = cpus {
            // Only costs the placement if it fails; the write goes on.
            let _ = cpus.pin_current_thread();
        }
        let mut out = File::from(write_end);
        let res = write_child(regions, blob, &tmp, &c_tmp, &c_dir, parent, overwrite);
        let (msg, code) = match res {
            Ok(r) => (
                format!(
                    "ok {} {} {} {}",
                    r.image_len, r.data_bytes, r.zero_chunks, r.state_bytes
                ),
                0,
            ),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                (format!("err {e}"), 1)
            }
        };
        let _ = out.write_all(msg.as_bytes());
        // SAFETY: _exit ends the child without running the parent's
        // destructors or atexit handlers (which own the parent's state).
        unsafe { libc::_exit(code) };
    }
    drop(write_end);
    Ok(ForkChild {
        pid,
        report: File::from(read_end),
        tmp,
    })
}

fn is_all_zero(b: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets
    // the aligned middle part of the slice.
    let (head, mid, tail) = unsafe { b.align_to::<u128>() };
    head.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// The child's work. Errors are strings: they go back over the pipe.
fn write_child(
    regions: &[Region],
    blob: &[u8],
    tmp: &PathBuf,
    c_tmp: &CString,
    c_dir: &CString,
    parent: &Path,
    overwrite: bool,
) -> Result<ForkReport, String> {
    let io_err = |what: &str, p: &Path, e: io::Error| format!("{what} {}: {e}", p.display());
    let _ = std::fs::remove_dir_all(tmp);
    std::fs::create_dir(tmp).map_err(|e| io_err("create directory", tmp, e))?;
    let mem_path = tmp.join(MEMORY_FILE);
    let mem = File::create(&mem_path).map_err(|e| io_err("create", &mem_path, e))?;
    let mut header = Header {
        chunk_size: CHUNK_SIZE,
        image_len: 0,
        regions: Vec::with_capacity(regions.len()),
        chunks: Vec::new(),
    };
    for r in regions {
        header.regions.push(RegionEntry {
            guest_addr: r.guest_addr,
            len: r.len,
            file_offset: header.image_len,
        });
        header.image_len += r.len;
    }
    mem.set_len(header.image_len)
        .map_err(|e| io_err("set length of", &mem_path, e))?;
    let mut data_bytes = 0;
    for (r, entry) in regions.iter().zip(header.regions.clone()) {
        // SAFETY: the child's copy-on-write image of the parent's guest RAM
        // mapping, `len` bytes, readable; nothing else runs in the child.
        let mem_slice =
            unsafe { std::slice::from_raw_parts(r.host_addr as *const u8, r.len as usize) };
        for (k, chunk) in mem_slice.chunks(CHUNK_SIZE as usize).enumerate() {
            if is_all_zero(chunk) {
                header.chunks.push(ChunkEntry { zero: true, crc: 0 });
                continue;
            }
            header.chunks.push(ChunkEntry {
                zero: false,
                crc: format::checksum(chunk),
            });
            mem.write_all_at(chunk, entry.file_offset + k as u64 * CHUNK_SIZE)
                .map_err(|e| io_err("write", &mem_path, e))?;
            data_bytes += CHUNK_SIZE;
        }
    }
    mem.sync_all().map_err(|e| io_err("fsync", &mem_path, e))?;
    drop(mem);
    header.validate()?;
    let state = format::encode(&header, blob);
    let state_path = tmp.join(STATE_FILE);
    std::fs::write(&state_path, &state).map_err(|e| io_err("write", &state_path, e))?;
    File::open(&state_path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("fsync", &state_path, e))?;
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("fsync directory", tmp, e))?;
    let rename = |flags: libc::c_uint| {
        // SAFETY: both are NUL-terminated paths that outlive the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                c_tmp.as_ptr(),
                libc::AT_FDCWD,
                c_dir.as_ptr(),
                flags,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    match rename(libc::RENAME_NOREPLACE) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) && overwrite => {
            rename(libc::RENAME_EXCHANGE).map_err(|e| format!("replace: {e}"))?;
            let _ = std::fs::remove_dir_all(tmp);
        }
        Err(e) => return Err(format!("rename into place: {e}")),
    }
    let _ = File::open(parent).and_then(|f| f.sync_all());
    Ok(ForkReport {
        image_len: header.image_len,
        data_bytes,
        zero_chunks: header.chunks.iter().filter(|c| c.zero).count(),
        state_bytes: state.len() as u64,
    })
}
