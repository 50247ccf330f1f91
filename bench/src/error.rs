//! One error type for the benchmark: every variant says what was being done
//! and to what, so a failed run ends with one clear line.

use std::path::PathBuf;

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
