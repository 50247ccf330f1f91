//! Streaming write-out of the memory image.
//!
//! Written naively, a multi-GiB image piles up as dirty page cache that the
//! kernel's flusher threads write back later in bursts, at normal priority,
//! on whatever core is free — on a 2-core host that is the vCPU's core, and
//! the guest stalls (docs/journal/2026-12-01-8g-write-behind.md). Instead, each chunk's writeback is started at once from the
//! writing thread (which runs at the snapshot's background priority), and
//! once more than `window` bytes are in flight the oldest range is waited
//! for and dropped from the page cache: dirty memory stays bounded, the
//! flushers have nothing to do, and the image does not push the guest's
//! memory out of the host's cache. The final fsync still makes it durable.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// Bytes allowed between "writeback started" and "written and dropped".
pub(crate) const DEFAULT_WINDOW: u64 = 64 << 20;

#[derive(Debug)]
pub(crate) struct WriteBehind {
    fd: RawFd,
    window: u64,
    in_flight: VecDeque<(u64, u64)>,
    in_flight_bytes: u64,
    /// Off when the file system does not support sync_file_range.
    enabled: bool,
}

fn sync_range(fd: RawFd, off: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: plain syscall on an fd the caller keeps open; no pointers.
    let rc = unsafe { libc::sync_file_range(fd, off as i64, len as i64, flags) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl WriteBehind {
    /// `file` must stay open for as long as this is used.
    pub(crate) fn new(file: &File, window: u64) -> WriteBehind {
        WriteBehind {
            fd: file.as_raw_fd(),
            window,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            enabled: true,
        }
    }

    /// Records that `len` bytes at `off` were just written: starts their
    /// writeback, and finishes the oldest ranges beyond the window.
    pub(crate) fn written(&mut self, off: u64, len: u64) -> io::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        match sync_range(self.fd, off, len, libc::SYNC_FILE_RANGE_WRITE) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::ESPIPE | libc::ENOSYS)
                ) =>
            {
                self.enabled = false;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        self.in_flight.push_back((off, len));
        self.in_flight_bytes += len;
        while self.in_flight_bytes > self.window {
            self.retire_oldest()?;
        }
        Ok(())
    }

    fn retire_oldest(&mut self) -> io::Result<()> {
        let Some((off, len)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        self.in_flight_bytes -= len;
        sync_range(
            self.fd,
            off,
            len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )?;
        // SAFETY: plain syscall on an open fd; advisory only.
        unsafe { libc::posix_fadvise(self.fd, off as i64, len as i64, libc::POSIX_FADV_DONTNEED) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn write_through(dir: &std::path::Path) {
        let path = dir.join("img");
        let f = File::create(&path).expect("create");
        let mut wb = WriteBehind::new(&f, 1 << 20);
        let chunk = 1u64 << 20;
        for i in 0..5u8 {
            let buf = vec![i + 1; chunk as usize];
            f.write_all_at(&buf, u64::from(i) * chunk).expect("write");
            wb.written(u64::from(i) * chunk, chunk)
                .expect("write behind");
            assert!(wb.in_flight_bytes <= 1 << 20, "window respected");
        }
        f.sync_all().expect("fsync");
        let back = std::fs::read(&path).expect("read back");
        assert_eq!(back.len(), 5 << 20);
        for (i, c) in back.chunks(chunk as usize).enumerate() {
            assert!(c.iter().all(|&b| b == i as u8 + 1), "chunk {i} intact");
        }
    }

    #[test]
    fn bounded_write_behind_keeps_every_byte_on_a_disk_fs() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        write_through(dir.path());
    }

    #[test]
    fn bounded_write_behind_keeps_every_byte_on_tmpfs() {
        let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        write_through(dir.path());
    }
}
