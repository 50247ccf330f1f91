//! The `fork` baseline (DESIGN.md §2: Redis's BGSAVE moved into the
//! hypervisor): while the vCPUs and devices are paused the VMM process
//! forks; the child holds a copy-on-write image of guest RAM as of the fork
//! and writes it into the snapshot's memory image, then exits. The parent
//! resumes the guest at once and pays for the fork (page-table copy) in the
//! pause, and for copy-on-write faults afterwards; it commits the snapshot
//! (state file, rename) once the child is done, as for the engine's modes.
//!
//! The child writes through the same image file and chunk code as the
//! engine (`snapvm_snapshot::save::copy_and_write_chunk`, with a bounce buffer:
//! see there why), using only syscalls and allocation (glibc makes malloc
//! safe after fork). It reports each chunk's entry over a pipe: `OK`, then
//! 5 bytes per chunk (flag, crc32c little-endian), or `ER` and a message.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

use snapvm_snapshot::persist::ChunkEntry;
use snapvm_snapshot::save::{copy_and_write_chunk, Bounce};
use snapvm_snapshot::{ImageFile, Pagemap, Record, Region, CHUNK_SIZE};

/// A forked writer: its pid and the read end of its report pipe.
#[derive(Debug)]
pub(super) struct ForkChild {
    pub pid: libc::pid_t,
    report: File,
}

impl ForkChild {
    /// Blocks until the child exits; the chunk entries it wrote, or why it
    /// failed.
    pub fn wait(mut self, chunks: usize) -> Result<Vec<ChunkEntry>, String> {
        let mut bytes = Vec::new();
        let _ = self.report.read_to_end(&mut bytes);
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
        if let Some(msg) = bytes.strip_prefix(b"ER") {
            return Err(String::from_utf8_lossy(msg).into_owned());
        }
        let exited_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        match bytes.strip_prefix(b"OK") {
            Some(body) if exited_ok && body.len() == chunks * 5 => Ok(body
                .chunks_exact(5)
                .map(|e| {
                    let crc = u32::from_le_bytes([e[1], e[2], e[3], e[4]]);
                    if e[0] == 1 {
                        ChunkEntry::zero()
                    } else {
                        ChunkEntry::data(crc)
                    }
                })
                .collect()),
            _ => Err(format!(
                "the fork writer failed (status {status:#x}, a report of {} bytes)",
                bytes.len()
            )),
        }
    }
}

/// Forks a writer of `regions` (guest RAM, paused) into `image`. Call with
/// every vCPU and device paused: the child's memory is the guest's at this
/// instant. `cpus`: where the child runs (`--cpus` background CPUs).
pub(super) fn spawn(
    regions: &[Region],
    image: &ImageFile,
    cpus: Option<&snapvm_snapshot::CpuSet>,
) -> io::Result<ForkChild> {
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
        let (msg, code) = match write_child(regions, image) {
            Ok(entries) => {
                let mut msg = b"OK".to_vec();
                for e in entries {
                    msg.push(u8::from(e.zero));
                    msg.extend_from_slice(&e.crc.to_le_bytes());
                }
                (msg, 0)
            }
            Err(e) => (format!("ER{e}").into_bytes(), 1),
        };
        let _ = out.write_all(&msg);
        // SAFETY: _exit ends the child without running the parent's
        // destructors or atexit handlers (which own the parent's state).
        unsafe { libc::_exit(code) };
    }
    drop(write_end);
    Ok(ForkChild {
        pid,
        report: File::from(read_end),
    })
}

/// The child's work: every chunk of every region into the image, then an
/// fsync (the parent commits). Errors are strings: they go over the pipe.
fn write_child(regions: &[Region], image: &ImageFile) -> Result<Vec<ChunkEntry>, String> {
    let pagemap = Pagemap::open().map_err(|e| e.to_string())?;
    let mut bounce = Bounce::new().map_err(|e| e.to_string())?;
    let mut entries = Vec::new();
    let mut offset = 0u64;
    for r in regions {
        for k in 0..r.len / CHUNK_SIZE {
            // SAFETY: the child's copy-on-write view of the parent's guest
            // RAM, mapped for the region's length; nothing else runs in the
            // child, so nothing writes it.
            let rec = unsafe {
                copy_and_write_chunk(
                    image,
                    &pagemap,
                    &mut bounce,
                    r.host_addr + k * CHUNK_SIZE,
                    offset,
                )
            }
            .map_err(|e| e.to_string())?;
            entries.push(match rec {
                Record::Zero => ChunkEntry::zero(),
                Record::Data(crc) => ChunkEntry::data(crc),
                // (The fork baseline writes every chunk: never inherited.)
                Record::Inherited(crc) => ChunkEntry::inherited(crc),
            });
            offset += CHUNK_SIZE;
        }
    }
    image.sync().map_err(|e| e.to_string())?;
    Ok(entries)
}
