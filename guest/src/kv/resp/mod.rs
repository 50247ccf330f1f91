//! RESP2: an incremental request parser and a reply encoder.
//!
//! The parser follows Redis's `processMultibulkBuffer`/`processInlineBuffer`
//! (networking.c) closely, including its limits, its error wording and its
//! leniencies (the two bytes after a bulk are skipped, not checked), so
//! clients see the same behaviour as against a real Redis. It keeps its
//! position between calls, so a command arriving byte by byte is scanned
//! once, and arguments are returned as ranges into the caller's buffer: a
//! 512 MiB value is never copied or preallocated on a client's say-so.
//!
//! Files: `parser.rs` (the request parser, its limits, errors and the
//! [`Args`] it yields), `inline.rs` (splitting an inline request into words,
//! as `sdssplitargs`) and `reply.rs` (the reply encoder).

mod inline;
mod parser;
mod reply;

pub use inline::split_args;
pub use parser::{Args, Limits, Parser, ProtoError};
pub use reply::Reply;
