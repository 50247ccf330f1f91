//! The RESP2 reply encoder: simple strings, errors, integers, bulks and
//! arrays appended to a connection's output buffer.

use alloc::vec::Vec;

use crate::kv::mem::try_grow;
use crate::kv::num::fmt_i64;

/// Reply encoder over an output buffer. Allocation failures are remembered
/// rather than aborting the guest: the connection drops the partial reply
/// and closes (as Redis does with clients over their output limit).
pub struct Reply<'a> {
    buf: &'a mut Vec<u8>,
    failed: bool,
}

impl<'a> Reply<'a> {
    pub fn new(buf: &'a mut Vec<u8>) -> Reply<'a> {
        Reply { buf, failed: false }
    }

    /// Whether an allocation failed while encoding.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Bytes written so far (including anything there before).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Marks the reply as failed (an allocation elsewhere failed).
    pub fn fail(&mut self) {
        self.failed = true;
    }

    /// Drops everything written after `len` (to retract a partial reply).
    pub fn truncate(&mut self, len: usize) {
        self.buf.truncate(len);
    }

    /// Appends raw protocol bytes.
    pub fn raw(&mut self, parts: &[&[u8]]) {
        if self.failed {
            return;
        }
        let n: usize = parts.iter().map(|p| p.len()).sum();
        if try_grow(self.buf, n).is_err() {
            self.failed = true;
            return;
        }
        for p in parts {
            self.buf.extend_from_slice(p);
        }
    }

    fn prefixed_int(&mut self, prefix: u8, v: i64) {
        let mut b = [0u8; 20];
        let digits = fmt_i64(v, &mut b);
        self.raw(&[&[prefix], digits, b"\r\n"]);
    }

    pub fn simple(&mut self, s: &[u8]) {
        self.raw(&[b"+", s, b"\r\n"]);
    }

    pub fn ok(&mut self) {
        self.raw(&[b"+OK\r\n"]);
    }

    /// An error reply; `msg` includes the code (`ERR ...`). CR and LF become
    /// spaces, as in Redis, so client bytes echoed in an error cannot break
    /// the protocol.
    pub fn error(&mut self, msg: &[u8]) {
        if self.failed {
            return;
        }
        if try_grow(self.buf, msg.len() + 3).is_err() {
            self.failed = true;
            return;
        }
        self.buf.push(b'-');
        self.buf.extend(
            msg.iter()
                .map(|&c| if c == b'\r' || c == b'\n' { b' ' } else { c }),
        );
        self.buf.extend_from_slice(b"\r\n");
    }

    pub fn int(&mut self, v: i64) {
        self.prefixed_int(b':', v);
    }

    pub fn bulk(&mut self, b: &[u8]) {
        let mut d = [0u8; 20];
        let len = fmt_i64(b.len() as i64, &mut d);
        self.raw(&[b"$", len, b"\r\n", b, b"\r\n"]);
    }

    pub fn null_bulk(&mut self) {
        self.raw(&[b"$-1\r\n"]);
    }

    pub fn null_array(&mut self) {
        self.raw(&[b"*-1\r\n"]);
    }

    pub fn array(&mut self, n: usize) {
        self.prefixed_int(b'*', n as i64);
    }

    pub fn opt_bulk(&mut self, b: Option<&[u8]>) {
        match b {
            Some(b) => self.bulk(b),
            None => self.null_bulk(),
        }
    }

    /// Overwrites a placeholder written by [`Reply::array_placeholder`]
    /// (used when the element count is only known afterwards, as for KEYS).
    pub fn array_placeholder(&mut self) -> usize {
        let at = self.buf.len();
        self.raw(&[b"*"]);
        at
    }

    /// Inserts the count after a placeholder `*`. O(bytes after it).
    pub fn fill_array(&mut self, at: usize, n: usize) {
        if self.failed || at >= self.buf.len() {
            return;
        }
        let mut d = [0u8; 20];
        let digits = fmt_i64(n as i64, &mut d);
        let mut hdr = [0u8; 22];
        hdr[..digits.len()].copy_from_slice(digits);
        hdr[digits.len()..digits.len() + 2].copy_from_slice(b"\r\n");
        let hdr = &hdr[..digits.len() + 2];
        if try_grow(self.buf, hdr.len()).is_err() {
            self.failed = true;
            return;
        }
        let tail = self.buf.split_off(at + 1);
        self.buf.extend_from_slice(hdr);
        self.buf.extend_from_slice(&tail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder() {
        let mut out = Vec::new();
        let mut r = Reply::new(&mut out);
        r.ok();
        r.simple(b"PONG");
        r.error(b"ERR bad\r\nthing");
        r.int(-5);
        r.bulk(b"bar");
        r.bulk(b"");
        r.null_bulk();
        r.array(2);
        r.null_array();
        let at = r.array_placeholder();
        r.bulk(b"k");
        r.fill_array(at, 1);
        assert!(!r.failed());
        assert_eq!(
            out,
            b"+OK\r\n+PONG\r\n-ERR bad  thing\r\n:-5\r\n$3\r\nbar\r\n$0\r\n\r\n$-1\r\n*2\r\n*-1\r\n*1\r\n$1\r\nk\r\n"
        );
    }
}
