//! Child processes the benchmark starts (snapvm, QEMU, redis-server): output
//! lines collected with the time they arrived, killed (by PID) and reaped
//! when dropped, and the /proc readings the report needs.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};

/// A line of output and when it was read.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

type Lines = Arc<Mutex<Vec<Line>>>;

pub struct Proc {
    child: Child,
    what: String,
    stdout: Lines,
    stderr: Lines,
    readers: Vec<JoinHandle<()>>,
}

fn collect<R: Read + Send + 'static>(stream: R, sink: Lines) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf).trim_end().to_string();
                    if let Ok(mut v) = sink.lock() {
                        v.push(Line {
                            at: Instant::now(),
                            text,
                        });
                    }
                }
            }
        }
    })
}

fn lock(l: &Lines) -> std::sync::MutexGuard<'_, Vec<Line>> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

impl Proc {
    pub fn spawn(cmd: &mut Command, hint: &'static str) -> Result<Proc> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let what = format!("{cmd:?}");
        tracing::debug!("starting {what}");
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), which is async-signal-safe. It makes the kernel
        // kill the child if the benchmark dies (the spawning thread is the
        // main thread, which lives as long as the process), so no VM
        // outlives an interrupted benchmark.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| BenchError::Spawn {
                program,
                hint,
                source,
            })?;
        let stdout = Lines::default();
        let stderr = Lines::default();
        let mut readers = Vec::new();
        if let Some(o) = child.stdout.take() {
            readers.push(collect(o, stdout.clone()));
        }
        if let Some(e) = child.stderr.take() {
            readers.push(collect(e, stderr.clone()));
        }
        Ok(Proc {
            child,
            what,
            stdout,
            stderr,
            readers,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout_lines(&self) -> Vec<Line> {
        lock(&self.stdout).clone()
    }

    /// The last lines of both streams, for an error message.
    pub fn tail(&self) -> String {
        let mut v: Vec<String> = Vec::new();
        for l in [&self.stdout, &self.stderr] {
            let g = lock(l);
            let from = g.len().saturating_sub(15);
            v.extend(g[from..].iter().map(|l| l.text.clone()));
        }
        v.join("\n")
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                std::thread::sleep(Duration::from_millis(100));
                Err(BenchError::Exited {
                    what: self.what.clone(),
                    status: status.to_string(),
                    tail: self.tail(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Waits for a stdout line containing `needle`; returns it.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Result<Line> {
        let stream = self.stdout.clone();
        self.wait_line_in(&stream, needle, timeout)
    }

    fn wait_line_in(&mut self, stream: &Lines, needle: &str, timeout: Duration) -> Result<Line> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = lock(stream).iter().find(|l| l.text.contains(needle)) {
                return Ok(l.clone());
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                return Err(BenchError::Timeout {
                    what: format!("{needle:?} from {}\n{}", self.what, self.tail()),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        // SAFETY: kill(2) on our own child's PID (not yet reaped: we hold
        // the Child), no memory is shared.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        if rc == 0 {
            Ok(())
        } else {
            Err(BenchError::net(
                format!("signal {sig} to {}", self.what),
                std::io::Error::last_os_error(),
            ))
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`; reaps it.
    pub fn stop(mut self, grace: Duration) {
        let _ = self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Drop kills and reaps.
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// A `kB` field of /proc/PID/status, in bytes.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Peak resident set size (VmHWM) in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    status_kb(pid, "VmHWM")
}

/// Resets VmHWM to the current RSS (`echo 5 > clear_refs`), so the next
/// reading is the peak of what follows.
pub fn reset_peak_rss(pid: u32) {
    if let Err(e) = std::fs::write(format!("/proc/{pid}/clear_refs"), "5") {
        tracing::warn!("cannot reset the peak RSS of {pid}: {e}");
    }
}

/// Direct children of `pid` (e.g. the snapshot child of `fork` mode or
/// Redis's BGSAVE child).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it
/// again at once).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError::net("bind a free port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| BenchError::net("read a bound port", e))
}

/// Host load average (1 min), for the record.
pub fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
