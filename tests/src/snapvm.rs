//! Starting snapvm the ways the tests share.

use std::path::Path;

use crate::paths::snapvm_bin;
use crate::process::{free_port, Proc};

/// `snapvm run --restore dir` serving the KV guest on a free port (its
/// console in `serial`, `extra` flags added); returns it and the port.
/// Not waited for: the caller's first request does that.
pub fn restore_kv(dir: &Path, serial: &Path, extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["run", "--restore", dir.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    args.extend([
        "--kv-listen",
        &listen,
        "--serial",
        serial.to_str().expect("utf-8 path"),
    ]);
    (Proc::spawn(&snapvm_bin(), &args), port)
}
