//! A child process whose output is collected as it arrives and which is
//! killed when the test is done with it, pass or fail.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Output of one stream, shared with the thread that reads it.
type Captured = Arc<Mutex<Vec<u8>>>;

pub struct Proc {
    child: Child,
    stdout: Captured,
    stderr: Captured,
    readers: Vec<JoinHandle<()>>,
    what: String,
}

/// The end of a process: its status and everything it printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

fn capture<R: Read + Send + 'static>(mut stream: R, sink: Captured) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => sink
                    .lock()
                    .expect("capture buffer")
                    .extend_from_slice(&buf[..n]),
            }
        }
    })
}

impl Proc {
    pub fn spawn(program: &Path, args: &[&str]) -> Proc {
        Self::spawn_cmd(Command::new(program).args(args))
    }

    pub fn spawn_cmd(cmd: &mut Command) -> Proc {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = Captured::default();
        let stderr = Captured::default();
        let readers = vec![
            capture(child.stdout.take().expect("piped stdout"), stdout.clone()),
            capture(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        Proc {
            child,
            stdout,
            stderr,
            readers,
            what,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().expect("stdout buffer")).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr buffer")).into_owned()
    }

    /// Waits until stdout contains `needle`; panics with everything printed
    /// so far if it does not within `timeout` or if the process exits first.
    pub fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) {
        self.wait_for(needle, timeout, "stdout", Proc::stdout);
    }

    /// As [`Proc::wait_for_stdout`], for stderr (where the log goes).
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) {
        self.wait_for(needle, timeout, "stderr", Proc::stderr);
    }

    fn wait_for(
        &mut self,
        needle: &str,
        timeout: Duration,
        stream: &str,
        read: fn(&Proc) -> String,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if read(self).contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader a moment to drain what was printed last.
                thread::sleep(Duration::from_millis(100));
                if read(self).contains(needle) {
                    return;
                }
                panic!(
                    "{} exited ({status}) before printing {needle:?} on {stream}\nstdout:\n{}\nstderr:\n{}",
                    self.what,
                    self.stdout(),
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not print {needle:?} on {stream} within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.what,
                    self.stdout(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit; kills it and panics after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.what,
                    self.stdout(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Finished {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("read /proc/PID/stat");
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line.
        let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a command to completion with a timeout.
pub fn run(program: &Path, args: &[&str], timeout: Duration) -> Finished {
    Proc::spawn(program, args).wait(timeout)
}

/// A TCP port on 127.0.0.1 that was free a moment ago, so tests can run
/// their servers side by side.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}
