//! The HTTP API on a Unix socket (`snapvm run --api-sock`), its CLI client,
//! and docs/API.md's examples, against the real binary and guest.
//!
//! `harness.rs` holds the HTTP client and the start/stop helpers; the tests
//! are grouped by what they exercise: `endpoints.rs` (every endpoint's
//! statuses and bodies), `socket.rs` (the socket file), `load.rs`
//! (`PUT /snapshot/load` and the CLI client), `consistency.rs` (what a
//! snapshot holds under writers), `cancel.rs` (`DELETE /snapshot/{id}`),
//! `staging.rs` (a snapshot without its staging pool), `robustness.rs`
//! (malformed requests, clients hanging up), `docs.rs` (docs/API.md's
//! examples run) and `placement.rs` (`--cpus` in `GET /vm/config`).

mod cancel;
mod consistency;
mod docs;
mod endpoints;
pub(crate) mod harness;
mod load;
mod placement;
mod robustness;
mod schedule;
mod socket;
mod staging;
