//! Locking that survives a panic elsewhere.
//!
//! The engine's threads catch panics and roll back (DESIGN.md §2), and the
//! VMM's device threads must outlive a panicking peer, so a poisoned mutex
//! is not an error here: the data it guards stays consistent because every
//! critical section only swaps or reads whole values.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the guard even if another thread panicked holding it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
