//! The guest's key-value store: pure logic, `no_std` + `alloc`, host-testable.
//!
//! Layers, bottom up: [`dict`] (incremental-rehash hash table), [`store`]
//! (keyspace, memory limit, stats), [`resp`] (RESP2 parser and reply
//! encoder), [`commands`] (Redis command semantics), [`conn`] (per-connection
//! buffers; what the kernel drives), plus [`probe`] (latency probe) and
//! [`bench`] (in-guest workload helpers).
//!
//! How the kernel drives it (all single-threaded, no locking inside):
//!
//! ```rust,ignore
//! let mut store = Store::new(StoreConfig {
//!     maxmemory: guest_ram - reserve,
//!     hash_seed: rdtsc(),
//!     ..StoreConfig::default()
//! });
//! // on accept:            let mut conn = Connection::new(&mut store);
//! // on bytes from peer:   conn.feed(&mut store, bytes, &clock);
//! // every loop iteration: conn.feed(&mut store, &[], &clock) if conn.has_pending_input();
//! //                       let n = transport.send(conn.output()); conn.consume_output(n);
//! //                       if conn.is_finished() { transport.close(); conn.release(&mut store); }
//! // on peer reset:        conn.release(&mut store);
//! // each loop iteration:  store.probe.record_loop_gap(now - last_iteration_start);
//! // when idle:            store.background_step(200); // rehash + lazy free, bounded
//! ```

pub mod bench;
pub mod commands;
pub mod conn;
pub mod dict;
pub mod glob;
pub mod hash;
pub mod hist;
pub mod mem;
pub mod num;
pub mod probe;
pub mod resp;
pub mod store;

#[cfg(test)]
mod fuzz_tests;

pub use conn::Connection;
pub use probe::Clock;
pub use store::{Store, StoreConfig};
