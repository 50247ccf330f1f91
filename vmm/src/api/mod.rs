//! The HTTP/1.1 + JSON API on a Unix socket (`snapvm run --api-sock PATH`),
//! shaped after Firecracker's where the meaning is the same; docs/API.md
//! has every endpoint with curl examples.
//!
//! Two threads, one rule (DESIGN.md §4): the API thread ([`server`])
//! speaks HTTP and parses requests but never touches the VM; [`rpc`] turns
//! each into the owner's domain request, sent over a channel to the thread
//! that owns the VM (`crate::owner`), and the owner's answer into the HTTP
//! status and body. The same binary is the client ([`client`],
//! [`commands`]: `snapvm snapshot ...`, `snapvm vm ...`, `snapvm restore
//! ...`).

pub mod client;
pub mod commands;
mod metrics;
pub mod model;
pub mod rpc;
pub mod server;
mod socket;

pub use server::{ApiError, ApiRequest, ApiServer, Reply};
pub use socket::SocketError;
