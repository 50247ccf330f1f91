//! Talking to a KV guest with the real `redis-cli`, as a user would.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::Proc;

/// `redis-cli -p PORT ARGS...`: its stdout (trimmed), or None when it
/// failed or could not connect.
pub fn redis(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("run redis-cli");
    let text = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
    (out.status.success() && !text.contains("Could not connect")).then_some(text)
}

/// The first answer of a (just started or restored) KV guest to `args`,
/// retried until it listens; panics with the VM's log after `timeout`.
pub fn first_reply(vm: &Proc, port: u16, args: &[&str], timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Some(v) = redis(port, args) {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "KV on port {port} never answered\nstderr:\n{}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
