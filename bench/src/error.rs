//! One error type for every benchmark driver of the crate (the
//! comparative benchmark and the in-process `pause` and `snapshot`
//! drivers): every variant says what was being done and to what, so a
//! failed run ends with one clear line.

use std::path::PathBuf;
use std::time::Duration;

use snapvm_snapshot::Strategy;
use snapvm_vmm::snapshotting::SnapshotError;
use snapvm_vmm::{PauseError, ProbeError, VmError, VmExit};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Net {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source} ({hint})")]
    Spawn {
        program: String,
        hint: &'static str,
        source: std::io::Error,
    },
    #[error("{what} exited early ({status}); last output:\n{tail}")]
    Exited {
        what: String,
        status: String,
        tail: String,
    },
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("{what}: unexpected reply {reply:?}")]
    Reply { what: String, reply: String },
    #[error("{0}")]
    Invalid(String),
    #[error("QMP {command}: {message}")]
    Qmp { command: String, message: String },
    #[error("plot {}: {message}", path.display())]
    Plot { path: PathBuf, message: String },
    #[error("JSON {what}: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },

    // The in-process drivers (`snapvm-bench pause|snapshot`): their flags,
    // then the VM they boot and measure.
    /// A flag the VMM's own parsers refused (`--memory`, `--vcpus`,
    /// `--log-level`).
    #[error(transparent)]
    Config(#[from] snapvm_vmm::cli::ConfigError),
    #[error("--cycles must be at least 1")]
    NoCycles,
    #[error("--dir {0}: not a directory")]
    NotADirectory(PathBuf),
    #[error(transparent)]
    Placement(#[from] snapvm_vmm::placement::PlacementError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("probe: {0}")]
    Probe(#[from] ProbeError),
    #[error("cannot create a histogram: {0}")]
    Histogram(String),
    #[error("the guest stopped during the benchmark: {0:?}")]
    GuestStopped(VmExit),
    #[error("the guest did not start counting on all {vcpus} vCPUs within {timeout:?} (last probe: {last})")]
    BootTimeout {
        vcpus: usize,
        timeout: Duration,
        last: String,
    },
    #[error("cycle {cycle}: pause failed: {source}")]
    Pause { cycle: u32, source: PauseError },
    #[error("cycle {cycle}: resume failed: {source}")]
    Resume { cycle: u32, source: PauseError },
    #[error("cycle {cycle}: probe unreadable: {source}")]
    CycleProbe { cycle: u32, source: ProbeError },
    #[error("cycle {cycle}: vCPU {vcpu} heartbeat moved while paused ({before} -> {after})")]
    NotHeld {
        cycle: u32,
        vcpu: usize,
        before: u64,
        after: u64,
    },
    #[error("cycle {cycle}: vCPU {vcpu} made no progress within {timeout:?} after resume")]
    NoProgress {
        cycle: u32,
        vcpu: usize,
        timeout: Duration,
    },
    #[error("the guest did not populate its buffer within {0:?} (heartbeats {1:?})")]
    PopulateTimeout(Duration, Vec<u64>),
    #[error("{mode} x{workers}: {source}")]
    Snapshot {
        mode: Strategy,
        workers: usize,
        source: SnapshotError,
    },
    #[error("snapshot directory {0} already exists")]
    DirExists(PathBuf),
    #[error("dd into {dir}: {why}")]
    Dd { dir: PathBuf, why: String },
}

impl BenchError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BenchError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub fn net(what: impl Into<String>, source: std::io::Error) -> Self {
        BenchError::Net {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, BenchError>;
