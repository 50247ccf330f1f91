//! Host side sockets: the `--kv-listen` listener (TCP or Unix) and the
//! accepted connections, all nonblocking.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

/// Where snapvm listens for KV clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(String),
}

impl ListenAddr {
    /// `unix:PATH` or a TCP `HOST:PORT`.
    pub fn parse(s: &str) -> ListenAddr {
        match s.strip_prefix("unix:") {
            Some(path) => ListenAddr::Unix(path.to_string()),
            None => ListenAddr::Tcp(s.to_string()),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{p}"),
        }
    }
}

pub enum HostListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl HostListener {
    /// Binds and makes the listener nonblocking.
    pub fn bind(addr: &ListenAddr) -> io::Result<HostListener> {
        let l = match addr {
            ListenAddr::Tcp(a) => HostListener::Tcp(TcpListener::bind(a.as_str())?),
            ListenAddr::Unix(p) => HostListener::Unix(UnixListener::bind(p)?),
        };
        match &l {
            HostListener::Tcp(t) => t.set_nonblocking(true)?,
            HostListener::Unix(u) => u.set_nonblocking(true)?,
        }
        Ok(l)
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> String {
        match self {
            HostListener::Tcp(t) => t
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            HostListener::Unix(u) => u
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }

    /// One pending connection, nonblocking; `Ok(None)` when there is none.
    pub fn accept(&self) -> io::Result<Option<HostStream>> {
        let r = match self {
            HostListener::Tcp(t) => t.accept().and_then(|(s, _)| {
                s.set_nonblocking(true)?;
                // Replies are small and latency matters more than batching.
                s.set_nodelay(true)?;
                Ok(HostStream::Tcp(s))
            }),
            HostListener::Unix(u) => u.accept().and_then(|(s, _)| {
                s.set_nonblocking(true)?;
                Ok(HostStream::Unix(s))
            }),
        };
        match r {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for HostListener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            HostListener::Tcp(t) => t.as_raw_fd(),
            HostListener::Unix(u) => u.as_raw_fd(),
        }
    }
}

pub enum HostStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for HostStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.read(buf),
            HostStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for HostStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.write(buf),
            HostStream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for HostStream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            HostStream::Tcp(s) => s.as_raw_fd(),
            HostStream::Unix(s) => s.as_raw_fd(),
        }
    }
}
