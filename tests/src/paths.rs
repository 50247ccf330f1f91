//! Where the artifacts the tests drive live.

use std::path::PathBuf;

/// The `snapvm` binary. Tests live in their own package, so cargo's
/// `CARGO_BIN_EXE_*` is not available: take `SNAPVM_BIN`, else the binary
/// next to the test executable's `deps/` directory (same profile).
pub fn snapvm_bin() -> PathBuf {
    workspace_bin("snapvm", "SNAPVM_BIN")
}

/// The `snapvm-bench` binary (every benchmark driver: the comparative
/// benchmark, `pause`, `snapshot`): `SNAPVM_BENCH_BIN`, else found like
/// [`snapvm_bin`].
pub fn snapvm_bench_bin() -> PathBuf {
    workspace_bin("snapvm-bench", "SNAPVM_BENCH_BIN")
}

fn workspace_bin(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo build --workspace` before the tests (scripts/test does), or set {env}",
        bin.display()
    );
    bin
}

/// A required external input given by environment variable; the test fails
/// (never skips) when it is missing, naming the script that provides it.
pub fn required_env_path(var: &str, provided_by: &str) -> PathBuf {
    let value = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: it is provided by {provided_by} (scripts/test sets it up)")
    });
    let path = PathBuf::from(value);
    assert!(
        path.exists(),
        "{var}={} does not exist (provided by {provided_by})",
        path.display()
    );
    path
}
