//! The few RESP2 pieces the benchmark needs: encoding a command, finding
//! where one reply ends in a byte stream, and a blocking client for control
//! commands (PING, DEBUG POPULATE, INFO, PROBE RESET, BGSAVE).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};

/// Appends `args` as a RESP array of bulk strings.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// The end of the first `\r\n`-terminated line at or after `from`.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

/// What a complete reply at the start of a buffer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// Bytes the reply takes.
    pub len: usize,
    /// It was an error reply (`-...`).
    pub error: bool,
}

/// Parses one reply at `buf[from..]`; `Ok(None)` when it is not complete
/// yet, `Err` when the bytes are not RESP.
pub fn parse(buf: &[u8], from: usize) -> std::result::Result<Option<Parsed>, String> {
    let Some(&kind) = buf.get(from) else {
        return Ok(None);
    };
    let Some(eol) = line_end(buf, from + 1) else {
        return Ok(None);
    };
    let header = &buf[from + 1..eol];
    let number = || -> std::result::Result<i64, String> {
        std::str::from_utf8(header)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad length {:?}", String::from_utf8_lossy(header)))
    };
    let after = eol + 2;
    match kind {
        b'+' | b':' => Ok(Some(Parsed {
            len: after - from,
            error: false,
        })),
        b'-' => Ok(Some(Parsed {
            len: after - from,
            error: true,
        })),
        b'$' => {
            let n = number()?;
            if n < 0 {
                return Ok(Some(Parsed {
                    len: after - from,
                    error: false,
                }));
            }
            let end = after + n as usize + 2;
            Ok((buf.len() >= end).then_some(Parsed {
                len: end - from,
                error: false,
            }))
        }
        b'*' => {
            let n = number()?;
            let mut pos = after;
            for _ in 0..n.max(0) {
                match parse(buf, pos)? {
                    Some(p) => pos += p.len,
                    None => return Ok(None),
                }
            }
            Ok(Some(Parsed {
                len: pos - from,
                error: false,
            }))
        }
        other => Err(format!("unexpected reply type byte {other:#04x}")),
    }
}

/// A blocking connection for control commands.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    addr: SocketAddr,
}

impl Client {
    /// Connects, retrying until `timeout` (the server may still be booting).
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Client> {
        let deadline = Instant::now() + timeout;
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(Client {
                        stream,
                        buf: Vec::new(),
                        addr,
                    });
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(BenchError::net(format!("connect to {addr}"), e))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Sends one command and returns its raw reply.
    pub fn command(&mut self, args: &[&str], timeout: Duration) -> Result<Vec<u8>> {
        let what = || format!("{} on {}", args.join(" "), self.addr);
        let mut req = Vec::new();
        let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        encode(&mut req, &bytes);
        self.stream
            .write_all(&req)
            .map_err(|e| BenchError::net(what(), e))?;
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match parse(&self.buf, 0) {
                Ok(Some(p)) => {
                    let reply = self.buf.drain(..p.len).collect();
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(BenchError::Reply {
                        what: what(),
                        reply: e,
                    })
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BenchError::Timeout {
                    what: what(),
                    secs: timeout.as_secs(),
                });
            }
            self.stream
                .set_read_timeout(Some(left.min(Duration::from_secs(1))))
                .map_err(|e| BenchError::net(what(), e))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(BenchError::net(
                        what(),
                        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"),
                    ))
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(BenchError::net(what(), e)),
            }
        }
    }

    /// Sends a command that must answer `+OK` (or another simple string).
    pub fn ok(&mut self, args: &[&str], timeout: Duration) -> Result<()> {
        let reply = self.command(args, timeout)?;
        if reply.first() == Some(&b'+') {
            Ok(())
        } else {
            Err(BenchError::Reply {
                what: args.join(" "),
                reply: String::from_utf8_lossy(&reply).into_owned(),
            })
        }
    }

    /// `INFO section` parsed into `field:value` pairs.
    pub fn info(&mut self, section: &str) -> Result<Vec<(String, String)>> {
        let reply = self.command(&["INFO", section], Duration::from_secs(30))?;
        Ok(parse_info(&String::from_utf8_lossy(&reply)))
    }
}

/// `field:value` lines of an INFO reply.
pub fn parse_info(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('$'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// A numeric INFO field.
pub fn info_f64(info: &[(String, String)], key: &str) -> Option<f64> {
    info.iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_reply_type() {
        assert_eq!(
            parse(b"+OK\r\n", 0),
            Ok(Some(Parsed {
                len: 5,
                error: false
            }))
        );
        assert_eq!(
            parse(b"-OOM x\r\n", 0),
            Ok(Some(Parsed {
                len: 8,
                error: true
            }))
        );
        assert_eq!(parse(b"$-1\r\n", 0).unwrap().unwrap().len, 5);
        assert_eq!(parse(b"$3\r\nabc\r\n+OK\r\n", 0).unwrap().unwrap().len, 9);
        assert_eq!(parse(b"$3\r\nabc\r\n+OK\r\n", 9).unwrap().unwrap().len, 5);
        assert_eq!(
            parse(b"*2\r\n:1\r\n$1\r\nx\r\n", 0).unwrap().unwrap().len,
            15
        );
    }

    #[test]
    fn incomplete_and_garbage() {
        assert_eq!(parse(b"", 0), Ok(None));
        assert_eq!(parse(b"$3\r\nab", 0), Ok(None));
        assert_eq!(parse(b"*2\r\n:1\r\n", 0), Ok(None));
        assert!(parse(b"?x\r\n", 0).is_err());
        assert!(parse(b"$x\r\n", 0).is_err());
    }

    #[test]
    fn encodes_and_reads_info() {
        let mut out = Vec::new();
        encode(&mut out, &[b"GET", b"k"]);
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        let info = parse_info("$40\r\n# Latency\r\nprobe_max_loop_gap_us:12.5\r\n");
        assert_eq!(info_f64(&info, "probe_max_loop_gap_us"), Some(12.5));
    }
}
