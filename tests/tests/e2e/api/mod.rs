//! The HTTP API on a Unix socket (`snapvm run --api-sock`), its CLI client,
//! and docs/API.md's examples, against the real binary and guest.
//!
//! `harness.rs` holds the HTTP client and the start/stop helpers; the tests
//! are grouped by what they exercise: `endpoints.rs` (every endpoint's
//! statuses and bodies), `socket.rs` (the socket file), `load.rs`
//! (`PUT /snapshot/load` and the CLI client), `consistency.rs` (what a
//! snapshot holds under writers), `cancel.rs` (`DELETE /snapshot/{id}`) and
//! `staging.rs` (a snapshot without its staging pool).

mod cancel;
mod consistency;
mod endpoints;
mod harness;
mod load;
mod socket;
mod staging;
