//! The HTTP/1.1 + JSON API on a Unix socket (`snapvm run --api-sock PATH`),
//! shaped after Firecracker's where the meaning is the same; docs/API.md
//! has every endpoint with curl examples.
//!
//! Two threads, one rule (DESIGN.md §4): the API thread ([`server`])
//! speaks HTTP and parses requests but never touches the VM; it sends each
//! request over a channel to the thread that owns the VM ([`owner`], run
//! by [`serve`]), which acts and replies. The same binary is the client
//! ([`client`], [`commands`]: `snapvm snapshot ...`, `snapvm vm ...`,
//! `snapvm restore ...`).

pub mod client;
pub mod commands;
mod metrics;
pub mod model;
pub mod owner;
pub mod server;
mod socket;
mod test_hooks;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

pub use owner::{Loader, Owner, VmSource};
pub use server::{ApiCall, ApiError, ApiRequest, ApiServer, Reply};
pub use socket::SocketError;

use crate::snapshotting::trigger::Trigger;

/// How often the owner loop looks at the VM and the snapshots when no
/// request arrives.
const TICK: Duration = Duration::from_millis(10);

static STOP_SIGNAL: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP_SIGNAL.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM stop snapvm like `PUT /actions Shutdown` (so the
/// socket file is removed) instead of killing it outright.
pub fn install_stop_signals() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler
        // only stores to an atomic (async-signal-safe); SA_RESTART keeps
        // other threads' syscalls from failing with EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The owner loop: answers API calls, runs the `--snapshot-dir` trigger,
/// and returns when the VM stopped or a shutdown was asked (by the API or
/// a signal). Call [`Owner::finish`] next.
pub fn serve(owner: &mut Owner, calls: &Receiver<ApiCall>, mut trigger: Option<&mut Trigger>) {
    loop {
        if owner.exit_reason().is_some() || owner.shutdown_requested() {
            return;
        }
        if STOP_SIGNAL.swap(false, Ordering::SeqCst) {
            tracing::info!("stop signal: shutting down");
            owner.request_shutdown();
            return;
        }
        if let (Some(t), Some(vm)) = (trigger.as_deref_mut(), owner.vm()) {
            if let Some(h) = t.poll(vm, owner.snapshotter()) {
                let (mode, workers) = (t.plan().mode, t.plan().workers);
                owner.register(h, mode, workers);
            }
        }
        match calls.recv_timeout(TICK) {
            Ok(call) => owner.handle(call),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                tracing::error!("the API thread has stopped; shutting down");
                owner.request_shutdown();
                return;
            }
        }
        owner.poll();
    }
}
