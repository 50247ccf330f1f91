//! A thin wrapper over the `userfaultfd(2)` ioctls.
//!
//! Why not the `userfaultfd` crate: it generates its bindings with bindgen at
//! build time, which needs libclang on every machine that builds snapvm (CI
//! included). The ABI we need is six small `repr(C)` structs and a handful of
//! ioctl numbers that the kernel guarantees stable, so we spell them out here
//! from `include/uapi/linux/userfaultfd.h` and call them with `libc`.
//!
//! Why the constants are ours and not `libc`'s: the installed headers are older
//! than the running kernel (6.18) and lack `UFFD_FEATURE_WP_UNPOPULATED`,
//! `UFFD_FEATURE_WP_ASYNC`, ... which we want to at least probe for.
//!
//! The descriptor is created **without** `UFFD_USER_MODE_ONLY`: KVM touches
//! guest memory from kernel mode (get_user_pages on a stage-2 fault), and a
//! user-mode-only uffd makes those faults fail, which surfaces as `KVM_RUN`
//! returning EFAULT (DESIGN.md §3). That needs root (or
//! `vm.unprivileged_userfaultfd=1`), which is the deployment we target.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::error::UffdError;

const UFFD_API: u64 = 0xAA;
const UFFDIO: u64 = 0xAA;

// _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x00,
    std::mem::size_of::<UffdioRegister>(),
);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x03,
    std::mem::size_of::<UffdioCopy>(),
);
const UFFDIO_ZEROPAGE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x04,
    std::mem::size_of::<UffdioZeropage>(),
);
const UFFDIO_WRITEPROTECT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x06,
    std::mem::size_of::<UffdioWriteprotect>(),
);
const UFFDIO_MOVE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x05,
    std::mem::size_of::<UffdioMove>(),
);
/// `/dev/userfaultfd` ioctl that hands out a new uffd (kernel >= 6.1).
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

/// Feature bits of `uffdio_api.features` (uapi/linux/userfaultfd.h).
pub mod feature {
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    pub const EVENT_FORK: u64 = 1 << 1;
    pub const EVENT_REMAP: u64 = 1 << 2;
    pub const EVENT_REMOVE: u64 = 1 << 3;
    pub const MISSING_HUGETLBFS: u64 = 1 << 4;
    pub const MISSING_SHMEM: u64 = 1 << 5;
    pub const EVENT_UNMAP: u64 = 1 << 6;
    pub const SIGBUS: u64 = 1 << 7;
    pub const THREAD_ID: u64 = 1 << 8;
    pub const MINOR_HUGETLBFS: u64 = 1 << 9;
    pub const MINOR_SHMEM: u64 = 1 << 10;
    pub const EXACT_ADDRESS: u64 = 1 << 11;
    pub const WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    pub const WP_UNPOPULATED: u64 = 1 << 13;
    pub const POISON: u64 = 1 << 14;
    pub const WP_ASYNC: u64 = 1 << 15;
    pub const MOVE: u64 = 1 << 16;

    /// Names for the report of what a kernel offers.
    pub const NAMES: &[(u64, &str)] = &[
        (PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
        (EVENT_FORK, "EVENT_FORK"),
        (EVENT_REMAP, "EVENT_REMAP"),
        (EVENT_REMOVE, "EVENT_REMOVE"),
        (MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
        (MISSING_SHMEM, "MISSING_SHMEM"),
        (EVENT_UNMAP, "EVENT_UNMAP"),
        (SIGBUS, "SIGBUS"),
        (THREAD_ID, "THREAD_ID"),
        (MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
        (MINOR_SHMEM, "MINOR_SHMEM"),
        (EXACT_ADDRESS, "EXACT_ADDRESS"),
        (WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
        (WP_UNPOPULATED, "WP_UNPOPULATED"),
        (POISON, "POISON"),
        (WP_ASYNC, "WP_ASYNC"),
        (MOVE, "MOVE"),
    ];
}

/// Registration modes (`uffdio_register.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterMode(u64);

impl RegisterMode {
    /// Faults on pages with no page-table entry (first touch) come to us.
    pub const MISSING: RegisterMode = RegisterMode(1 << 0);
    /// Writes to write-protected pages come to us.
    pub const WP: RegisterMode = RegisterMode(1 << 1);

    pub const fn union(self, other: RegisterMode) -> RegisterMode {
        RegisterMode(self.0 | other.0)
    }
    pub const fn bits(self) -> u64 {
        self.0
    }
}

const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg`: 32 bytes, an event byte and a 24-byte union. We only
/// decode the pagefault arm; other events are reported as `Event::Other`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioMove>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);

/// What kind of fault a thread took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// A write to a write-protected page.
    WriteProtect,
    /// A first touch of a page with no page-table entry; `write` tells
    /// whether the access was a write (else a read).
    Missing { write: bool },
}

/// One event read from the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread is blocked on `address` (page aligned) until we wake it.
    PageFault { address: u64, kind: FaultKind },
    /// An event we did not ask for (fork/remap/remove/unmap), by number.
    Other(u8),
}

/// An open userfaultfd with its API handshake done.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

impl Uffd {
    /// Opens a descriptor (non-blocking, close-on-exec, kernel faults
    /// included) and negotiates `features`. Fails if the kernel lacks any
    /// requested feature.
    pub fn new(features: u64) -> Result<Uffd, UffdError> {
        let fd = open_raw()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `fd` is a fresh userfaultfd; `api` is a live, correctly
        // sized `struct uffdio_api` that the kernel reads and writes.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if rc != 0 {
            return Err(UffdError::Api {
                features,
                source: last_err(),
            });
        }
        Ok(Uffd {
            fd,
            features: api.features,
        })
    }

    /// The features this kernel offers (handshake with none requested on a
    /// throwaway descriptor: the kernel answers with everything it knows).
    pub fn available_features() -> Result<u64, UffdError> {
        let u = Uffd::new(0)?;
        Ok(u.features)
    }

    /// Features the kernel reported in the handshake.
    pub fn features(&self) -> u64 {
        self.features
    }

    fn range_ioctl<T>(
        &self,
        op: &'static str,
        req: u64,
        arg: &mut T,
        start: u64,
        len: u64,
    ) -> Result<(), UffdError> {
        // SAFETY: `arg` is a live `repr(C)` struct of exactly the size encoded
        // in `req` (checked by the const asserts above); the kernel only
        // reads/writes within it. Address ranges are validated by the kernel.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
        if rc != 0 {
            return Err(UffdError::Range {
                op,
                start,
                len,
                source: last_err(),
            });
        }
        Ok(())
    }

    /// Registers `[start, start+len)` for the given modes.
    pub fn register(&self, start: u64, len: u64, mode: RegisterMode) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: mode.bits(),
            ioctls: 0,
        };
        self.range_ioctl("register", UFFDIO_REGISTER, &mut reg, start, len)
    }

    /// Unregisters the range; the kernel wakes threads blocked on missing
    /// faults there and clears write-protect bits.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut r = UffdioRange { start, len };
        self.range_ioctl("unregister", UFFDIO_UNREGISTER, &mut r, start, len)
    }

    /// Sets (`protect`) or clears write protection. Clearing wakes threads
    /// blocked in the range unless `dont_wake`.
    pub fn write_protect(
        &self,
        start: u64,
        len: u64,
        protect: bool,
        dont_wake: bool,
    ) -> Result<(), UffdError> {
        let mut mode = 0;
        if protect {
            mode |= UFFDIO_WRITEPROTECT_MODE_WP;
        }
        if dont_wake {
            mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode,
        };
        let op = if protect {
            "write-protect"
        } else {
            "write-unprotect"
        };
        self.range_ioctl(op, UFFDIO_WRITEPROTECT, &mut wp, start, len)
    }

    /// Wakes threads blocked on faults in the range.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut r = UffdioRange { start, len };
        self.range_ioctl("wake", UFFDIO_WAKE, &mut r, start, len)
    }

    /// Resolves a missing fault by mapping the shared zero page (reads).
    /// `Ok(false)` if the page was already populated (EEXIST: a racing fault
    /// won), which callers treat as resolved but must still wake.
    pub fn zeropage(&self, start: u64, len: u64, dont_wake: bool) -> Result<bool, UffdError> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: if dont_wake {
                UFFDIO_ZEROPAGE_MODE_DONTWAKE
            } else {
                0
            },
            zeropage: 0,
        };
        match self.range_ioctl("zeropage", UFFDIO_ZEROPAGE, &mut z, start, len) {
            Ok(()) => Ok(true),
            Err(UffdError::Range { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Resolves a missing fault by copying `len` bytes from `src` (our own
    /// memory) into the registered range at `dst`. `Ok(false)` on EEXIST.
    ///
    /// `src` must point to `len` readable bytes; the kernel reads it with
    /// copy_from_user, so a bad pointer is an EFAULT, not memory unsafety.
    pub fn copy(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
        dont_wake: bool,
    ) -> Result<bool, UffdError> {
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode: if dont_wake {
                UFFDIO_COPY_MODE_DONTWAKE
            } else {
                0
            },
            copy: 0,
        };
        match self.range_ioctl("copy", UFFDIO_COPY, &mut c, dst, len) {
            Ok(()) => Ok(true),
            Err(UffdError::Range { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Resolves a missing fault by moving `len` bytes of our own anonymous
    /// memory at `src` into the registered range at `dst` (UFFDIO_MOVE,
    /// Linux >= 6.8, feature [`feature::MOVE`]): the pages themselves
    /// change owner, no copy. A PMD-mapped huge page moves as one when
    /// both ends are 2 MiB aligned and `len` covers it, so guest RAM keeps
    /// its huge pages. `src` is left unmapped. `Ok(false)` on EEXIST.
    ///
    /// The kernel checks both ranges (EFAULT/EINVAL on bad ones), so a
    /// wrong address is an error, not memory unsafety; the caller must not
    /// keep references into `src`.
    pub fn move_pages(
        &self,
        dst: u64,
        src: u64,
        len: u64,
        dont_wake: bool,
    ) -> Result<bool, UffdError> {
        self.move_pages_counted(dst, src, len, dont_wake).1
    }

    /// As [`Uffd::move_pages`], also returning how many bytes from the
    /// start of the range the kernel moved before it failed (0 on success
    /// or when it moved nothing): a retry goes on from there.
    pub fn move_pages_counted(
        &self,
        dst: u64,
        src: u64,
        len: u64,
        dont_wake: bool,
    ) -> (u64, Result<bool, UffdError>) {
        let mut m = UffdioMove {
            dst,
            src,
            len,
            mode: if dont_wake {
                UFFDIO_MOVE_MODE_DONTWAKE
            } else {
                0
            },
            moved: 0,
        };
        match self.range_ioctl("move", UFFDIO_MOVE, &mut m, dst, len) {
            Ok(()) => (0, Ok(true)),
            Err(e) => {
                // On failure the kernel leaves the bytes it moved in `moved`
                // (or the negative error when it moved none).
                let moved = u64::try_from(m.moved).unwrap_or(0).min(len);
                match e {
                    UffdError::Range { ref source, .. }
                        if source.raw_os_error() == Some(libc::EEXIST) =>
                    {
                        (moved, Ok(false))
                    }
                    e => (moved, Err(e)),
                }
            }
        }
    }

    /// Reads the events queued now (non-blocking). Returns an empty vector
    /// when there are none. Use `poll` on `as_raw_fd()` to wait.
    pub fn read_events(&self, out: &mut Vec<Event>) -> Result<(), UffdError> {
        const BATCH: usize = 64;
        let mut buf = [UffdMsg {
            event: 0,
            reserved1: 0,
            reserved2: 0,
            reserved3: 0,
            arg: [0; 3],
        }; BATCH];
        // SAFETY: `buf` is a writable array of BATCH `uffd_msg`s; the kernel
        // writes whole messages (32 bytes each) up to the length we pass.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                std::mem::size_of_val(&buf),
            )
        };
        if n < 0 {
            let e = last_err();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
                _ => Err(UffdError::Read(e)),
            };
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        for m in &buf[..count] {
            if m.event == UFFD_EVENT_PAGEFAULT {
                let flags = m.arg[0];
                let address = m.arg[1];
                let kind = if flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
                    FaultKind::WriteProtect
                } else {
                    FaultKind::Missing {
                        write: flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                    }
                };
                out.push(Event::PageFault { address, kind });
            } else {
                out.push(Event::Other(m.event));
            }
        }
        Ok(())
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Opens a raw uffd: the syscall first, `/dev/userfaultfd` as the fallback
/// (a seccomp profile or a kernel built without the syscall may refuse it).
fn open_raw() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: plain syscall with integer flags; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: the kernel just gave us this descriptor; we own it alone.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let syscall_err = last_err();
    let path = c"/dev/userfaultfd";
    // SAFETY: `path` is a valid NUL-terminated string.
    let dev = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev < 0 {
        return Err(UffdError::Create {
            syscall: syscall_err,
            dev: last_err(),
        });
    }
    // SAFETY: `dev` is a descriptor we just opened and own alone.
    let dev = unsafe { OwnedFd::from_raw_fd(dev) };
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument and
    // returns a new descriptor.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(UffdError::Create {
            syscall: syscall_err,
            dev: last_err(),
        });
    }
    // SAFETY: fresh descriptor from the kernel, owned by us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Human-readable names of the feature bits set in `bits`.
pub fn feature_names(bits: u64) -> Vec<&'static str> {
    feature::NAMES
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// Blocks until at least one of `fds` is readable and says which are.
/// EINTR (and any other poll error, impossible with valid fds) polls again:
/// the serving threads that wait here must not leave while faulting
/// threads may still be blocked on them.
pub(crate) fn wait_readable<const N: usize>(fds: [RawFd; N]) -> [bool; N] {
    let mut polled = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `polled` is a live array of N pollfds.
        let rc = unsafe { libc::poll(polled.as_mut_ptr(), N as libc::nfds_t, -1) };
        if rc > 0 {
            return polled.map(|p| p.revents != 0);
        }
    }
}
