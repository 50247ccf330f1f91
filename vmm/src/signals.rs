//! Process signals snapvm turns into flags its owner loop reads: SIGINT
//! and SIGTERM ask for a clean stop (with the API: the socket is removed),
//! SIGUSR1 for a snapshot (`--snapshot-dir`). The handlers only store to an
//! atomic (async-signal-safe); nothing runs in signal context.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static SNAPSHOT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_snapshot(_: libc::c_int) {
    SNAPSHOT.store(true, Ordering::SeqCst);
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

/// SIGUSR1 sets the snapshot flag.
pub fn install_snapshot() -> io::Result<()> {
    install(libc::SIGUSR1, on_snapshot)
}

/// Whether a stop was asked since the last call.
pub fn take_stop() -> bool {
    STOP.swap(false, Ordering::SeqCst)
}

/// Whether SIGUSR1 arrived since the last call (several count as one).
pub fn take_snapshot() -> bool {
    SNAPSHOT.swap(false, Ordering::SeqCst)
}
