//! A minimal QMP client (QEMU's JSON control protocol over a Unix socket):
//! negotiate, run commands, skip asynchronous events.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{BenchError, Result};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying while QEMU creates the socket) and leaves
    /// capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(BenchError::io("connect to QMP socket", path, e))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| BenchError::io("set timeout on", path, e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| BenchError::io("clone", path, e))?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        // The greeting.
        q.read_message()?;
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| BenchError::Qmp {
                command: "read".into(),
                message: e.to_string(),
            })?;
        if n == 0 {
            return Err(BenchError::Qmp {
                command: "read".into(),
                message: "QEMU closed the QMP socket".into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| BenchError::Json {
            what: format!("QMP message {line:?}"),
            source: e,
        })
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| BenchError::Qmp {
                command: command.into(),
                message: e.to_string(),
            })?;
        loop {
            let v = self.read_message()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(BenchError::Qmp {
                    command: command.into(),
                    message: e
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("error")
                        .to_string(),
                });
            }
            // An event: not our reply.
        }
    }

    /// Polls `query-migrate` until the migration completed; fails if it failed.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.execute("query-migrate", None)?;
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(r),
                Some("failed") | Some("cancelled") => {
                    return Err(BenchError::Qmp {
                        command: "migrate".into(),
                        message: format!("migration ended: {r}"),
                    })
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Timeout {
                    what: "QEMU migration to complete".into(),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
