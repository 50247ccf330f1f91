//! Process signals snapvm turns into flags its owner loop reads: SIGINT
//! and SIGTERM ask for a clean stop (with the API: the socket is removed),
//! SIGUSR1 for a snapshot (`--snapshot-dir`, `--snapshot-every`). The
//! handlers only store to an atomic or write to an eventfd (both
//! async-signal-safe); nothing else runs in signal context.
//!
//! SIGUSR1 wakes its waiter through an eventfd rather than a flag polled on
//! a tick: the snapshot's instant is the pause that the request starts, so
//! a signal must start it at once, not up to a tick later (the 10 ms tick
//! this replaced put writes made after the signal into the snapshot).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

static STOP: AtomicBool = AtomicBool::new(false);
/// SIGUSR1 arrived while nothing takes snapshots on it.
static SNAPSHOT_IGNORED: AtomicBool = AtomicBool::new(false);
/// The eventfd SIGUSR1 writes to (-1 until `install_snapshot`).
static SNAPSHOT_FD: AtomicI32 = AtomicI32::new(-1);
/// Owns that eventfd for the life of the process (a handler may run at any
/// time, so it is never closed).
static SNAPSHOT_EVENT: OnceLock<OwnedFd> = OnceLock::new();

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_snapshot_ignored(_: libc::c_int) {
    SNAPSHOT_IGNORED.store(true, Ordering::SeqCst);
}

extern "C" fn on_snapshot(_: libc::c_int) {
    let fd = SNAPSHOT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `fd` is the eventfd that
        // SNAPSHOT_EVENT keeps open for the life of the process; `one`
        // outlives the call. A full counter (EAGAIN) still reads as "asked",
        // so the result is ignored. errno is saved and restored: the
        // interrupted code may be about to read its own.
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(fd, (&one as *const u64).cast(), 8);
            *libc::__errno_location() = errno;
        }
    }
}

fn install(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler
    // only stores to an atomic (async-signal-safe); SA_RESTART keeps other
    // threads' syscalls from failing with EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// SIGINT and SIGTERM set the stop flag instead of killing the process.
pub fn install_stop() -> io::Result<()> {
    install(libc::SIGINT, on_stop)?;
    install(libc::SIGTERM, on_stop)
}

/// SIGUSR1 is noted and otherwise ignored (see [`take_ignored_snapshot`]):
/// for a VM with nothing that takes snapshots on it, where the default
/// action would end the VM and the data it holds.
pub fn install_snapshot_ignored() -> io::Result<()> {
    install(libc::SIGUSR1, on_snapshot_ignored)
}

/// Whether SIGUSR1 arrived, and was ignored, since the last call.
pub fn take_ignored_snapshot() -> bool {
    SNAPSHOT_IGNORED.swap(false, Ordering::SeqCst)
}

/// Live [`SnapshotSignal`]s: while there is one, SIGUSR1 asks for a
/// snapshot; with none, it is logged and ignored.
static CLAIMS: Mutex<usize> = Mutex::new(0);

/// A snapshot source's claim on SIGUSR1 (the `--snapshot-dir` trigger, a
/// schedule). The first claim makes SIGUSR1 ask for snapshots (a signal
/// sent before does not count); when the last is dropped, SIGUSR1 is
/// logged and ignored again, so a VM whose schedule stopped neither dies
/// of the signal nor swallows it without a word.
#[derive(Debug)]
pub struct SnapshotSignal(());

impl SnapshotSignal {
    pub fn claim() -> io::Result<SnapshotSignal> {
        let mut n = CLAIMS.lock().unwrap_or_else(|p| p.into_inner());
        if *n == 0 {
            install_snapshot()?;
        }
        *n += 1;
        Ok(SnapshotSignal(()))
    }

    /// Waits at most `timeout` for SIGUSR1 (see [`wait_snapshot`]).
    pub fn wait(&self, timeout: Duration) -> bool {
        wait_snapshot(timeout)
    }
}

impl Drop for SnapshotSignal {
    fn drop(&mut self) {
        let mut n = CLAIMS.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            if let Err(e) = install_snapshot_ignored() {
                tracing::warn!("cannot catch SIGUSR1 any more (it will end the VM): {e}");
            }
        }
    }
}

/// SIGUSR1 asks for a snapshot (see [`wait_snapshot`]). A signal that
/// arrived before (while another handler was installed) does not count.
fn install_snapshot() -> io::Result<()> {
    if SNAPSHOT_EVENT.get().is_none() {
        // SAFETY: eventfd(2) takes no pointers; a non-negative result is a
        // new descriptor this process owns alone.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created above and is owned by nothing else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Two racing installers: the loser's descriptor is dropped (closed)
        // and the handler keeps using the winner's.
        let kept = SNAPSHOT_EVENT.get_or_init(|| owned).as_raw_fd();
        SNAPSHOT_FD.store(kept, Ordering::SeqCst);
    }
    install(libc::SIGUSR1, on_snapshot)?;
    // A signal sent while nobody was waiting (a schedule that has since
    // stopped) must not start the next schedule with a snapshot.
    wait_snapshot(Duration::ZERO);
    Ok(())
}

/// Whether a stop was asked since the last call.
pub fn take_stop() -> bool {
    STOP.swap(false, Ordering::SeqCst)
}

/// Waits at most `timeout` for SIGUSR1; returns whether one arrived since
/// the last call (several count as one). Returns at once if one is
/// pending, false at once before the first [`SnapshotSignal::claim`].
fn wait_snapshot(timeout: Duration) -> bool {
    let Some(event) = SNAPSHOT_EVENT.get() else {
        return false;
    };
    let fd = event.as_raw_fd();
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd that outlives the call. EINTR (a
    // signal, maybe this one) just ends the wait early; the read below
    // decides.
    unsafe { libc::poll(&mut pfd, 1, ms) };
    let mut count: u64 = 0;
    // SAFETY: reads 8 bytes into `count` from a non-blocking eventfd; no
    // pending signal reads as EAGAIN.
    let n = unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
    n == 8 && count > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn raise_usr1() {
        // SAFETY: raise(3) takes no pointers; a handler is installed.
        assert_eq!(unsafe { libc::raise(libc::SIGUSR1) }, 0);
    }

    /// The only test in this binary that raises SIGUSR1: a handler is
    /// installed first (the default action would end the test process).
    #[test]
    fn sigusr1_wakes_its_claimant_at_once_and_is_ignored_without_one() {
        install_snapshot_ignored().expect("install the ignoring handler");
        raise_usr1();
        assert!(take_ignored_snapshot(), "noted while nobody claims it");
        assert!(!take_ignored_snapshot());

        let signal = SnapshotSignal::claim().expect("claim SIGUSR1");
        // Nothing pending: the wait runs out.
        assert!(!signal.wait(Duration::ZERO));
        // A signal raised while nobody waits is kept for the next wait.
        raise_usr1();
        assert!(signal.wait(Duration::ZERO));
        assert!(!signal.wait(Duration::ZERO), "one signal, one snapshot");
        // Two before a wait count as one.
        raise_usr1();
        raise_usr1();
        assert!(signal.wait(Duration::ZERO));
        assert!(!signal.wait(Duration::ZERO));
        assert!(
            !take_ignored_snapshot(),
            "claimed signals are not 'ignored'"
        );

        // A waiter blocked on a long timeout is woken by a signal from
        // another thread, not by the timeout.
        let sender = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            // SAFETY: kill(2) with this process's own pid; no pointers.
            unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
        });
        let started = Instant::now();
        assert!(signal.wait(Duration::from_secs(600)));
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "woken by the signal, not by the 600 s timeout"
        );
        sender.join().expect("sender thread");

        // Two claims: the signal asks for snapshots until the last goes.
        let second = SnapshotSignal::claim().expect("second claim");
        drop(signal);
        raise_usr1();
        assert!(second.wait(Duration::ZERO));
        drop(second);
        // None left: noted and ignored again, and a signal sent meanwhile
        // does not start the next claimant with a snapshot.
        raise_usr1();
        assert!(take_ignored_snapshot());
        let again = SnapshotSignal::claim().expect("claim again");
        assert!(!again.wait(Duration::ZERO));
    }
}
