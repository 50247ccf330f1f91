//! RESP2: an incremental request parser and a reply encoder.
//!
//! The parser follows Redis's `processMultibulkBuffer`/`processInlineBuffer`
//! (networking.c) closely, including its limits, its error wording and its
//! leniencies (the two bytes after a bulk are skipped, not checked), so
//! clients see the same behaviour as against a real Redis. It keeps its
//! position between calls, so a command arriving byte by byte is scanned
//! once, and arguments are returned as ranges into the caller's buffer: a
//! 512 MiB value is never copied or preallocated on a client's say-so.

use alloc::vec::Vec;

use super::mem::{try_grow, AllocError};
use super::num::{fmt_i64, parse_i64};

/// Protocol limits (Redis defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `proto-max-bulk-len`: 512 MiB.
    pub max_bulk_len: usize,
    /// Most arguments in one multibulk request (Redis ≤ 6: 1024 * 1024).
    pub max_multibulk_len: usize,
    /// `PROTO_INLINE_MAX_SIZE`: an inline request, or a `*N`/`$N` header
    /// line, must end within this many bytes.
    pub max_inline_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_len: 512 * 1024 * 1024,
            max_multibulk_len: 1024 * 1024,
            max_inline_len: 64 * 1024,
        }
    }
}

/// A malformed request. The connection replies with [`ProtoError::message`]
/// and is closed after the reply is flushed, as Redis does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    TooBigInline,
    UnbalancedQuotes,
    TooBigMbulkCount,
    InvalidMbulkLen,
    TooBigBulkCount,
    ExpectedDollar(u8),
    InvalidBulkLen,
    /// Not a Redis error: the guest could not allocate parser state.
    OutOfMemory,
}

impl ProtoError {
    /// The error text without the leading `-` (Redis's wording).
    pub fn message(&self) -> Vec<u8> {
        let m: &[u8] = match self {
            ProtoError::TooBigInline => b"ERR Protocol error: too big inline request",
            ProtoError::UnbalancedQuotes => b"ERR Protocol error: unbalanced quotes in request",
            ProtoError::TooBigMbulkCount => b"ERR Protocol error: too big mbulk count string",
            ProtoError::InvalidMbulkLen => b"ERR Protocol error: invalid multibulk length",
            ProtoError::TooBigBulkCount => b"ERR Protocol error: too big bulk count string",
            ProtoError::InvalidBulkLen => b"ERR Protocol error: invalid bulk length",
            ProtoError::OutOfMemory => b"ERR Protocol error: out of memory",
            ProtoError::ExpectedDollar(c) => {
                let mut v = b"ERR Protocol error: expected '$', got '".to_vec();
                v.push(*c);
                v.push(b'\'');
                return v;
            }
        };
        m.to_vec()
    }
}

impl From<AllocError> for ProtoError {
    fn from(_: AllocError) -> Self {
        ProtoError::OutOfMemory
    }
}

/// The arguments of one parsed command, borrowed from the input buffer (or
/// the parser's scratch space for inline commands).
#[derive(Clone, Copy)]
pub struct Args<'a> {
    base: &'a [u8],
    ranges: &'a [(usize, usize)],
}

impl<'a> Args<'a> {
    pub fn new(base: &'a [u8], ranges: &'a [(usize, usize)]) -> Args<'a> {
        Args { base, ranges }
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Argument `i`; empty if out of range (callers check arity first).
    pub fn get(&self, i: usize) -> &'a [u8] {
        match self.ranges.get(i) {
            Some(&(s, e)) => self.base.get(s..e).unwrap_or(&[]),
            None => &[],
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        (0..self.len()).map(move |i| self.get(i))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing of the current command parsed yet.
    Start,
    Inline,
    /// Reading bulks: `remaining` left, `bulk_len` known once its header is in.
    Multibulk {
        remaining: usize,
        bulk_len: Option<usize>,
    },
}

/// Incremental RESP2 request parser. The caller keeps the bytes of the
/// current command at the start of its buffer and calls [`Parser::parse`]
/// whenever more arrive.
pub struct Parser {
    limits: Limits,
    state: State,
    /// Parse position in the buffer (relative to the command start).
    pos: usize,
    /// Where the search for the next line end resumes.
    searched: usize,
    args: Vec<(usize, usize)>,
    /// Unescaped inline arguments (`args` index into this when `inline`).
    scratch: Vec<u8>,
    inline: bool,
}

impl Parser {
    pub fn new(limits: Limits) -> Parser {
        Parser {
            limits,
            state: State::Start,
            pos: 0,
            searched: 0,
            args: Vec::new(),
            scratch: Vec::new(),
            inline: false,
        }
    }

    /// Forgets the command just returned, ready for the next one (whose
    /// bytes the caller has moved to the start of its buffer).
    pub fn reset(&mut self) {
        self.state = State::Start;
        self.pos = 0;
        self.searched = 0;
        self.args.clear();
        self.scratch.clear();
        self.inline = false;
        // Don't keep a huge argument table around after one big request.
        if self.args.capacity() > 4096 {
            self.args = Vec::new();
        }
        if self.scratch.capacity() > 64 * 1024 {
            self.scratch = Vec::new();
        }
    }

    /// The arguments of the command last returned by `parse(buf)`.
    pub fn args<'a>(&'a self, buf: &'a [u8]) -> Args<'a> {
        let base = if self.inline { &self.scratch[..] } else { buf };
        Args::new(base, &self.args)
    }

    /// Parses the command at the start of `buf`. Returns `Ok(Some(n))` when a
    /// whole command (possibly with no arguments, which callers skip) spans
    /// `buf[..n]`, `Ok(None)` when more bytes are needed.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtoError> {
        if self.state == State::Start {
            match buf.first() {
                None => return Ok(None),
                Some(b'*') => return self.parse_multibulk_header(buf),
                Some(_) => self.state = State::Inline,
            }
        }
        match self.state {
            State::Inline => self.parse_inline(buf),
            _ => self.parse_bulks(buf),
        }
    }

    /// Finds `byte` at or after `from`, resuming where the last failed search
    /// stopped so a slowly arriving line is scanned once.
    fn find(&mut self, buf: &[u8], from: usize, byte: u8) -> Option<usize> {
        let start = self.searched.max(from).min(buf.len());
        match buf[start..].iter().position(|&c| c == byte) {
            Some(i) => {
                self.searched = start + i;
                Some(start + i)
            }
            None => {
                self.searched = buf.len();
                None
            }
        }
    }

    fn parse_inline(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtoError> {
        // Redis errors when more than the limit is buffered without a
        // newline; checking the line length even when the newline is there
        // gives the same answer however the bytes were chunked.
        let Some(nl) = self.find(buf, 0, b'\n') else {
            if buf.len() > self.limits.max_inline_len {
                return Err(ProtoError::TooBigInline);
            }
            return Ok(None);
        };
        if nl > self.limits.max_inline_len {
            return Err(ProtoError::TooBigInline);
        }
        let mut line = &buf[..nl];
        if let Some(l) = line.strip_suffix(b"\r") {
            line = l;
        }
        // Redis splits a C string: a NUL ends the line.
        if let Some(z) = line.iter().position(|&c| c == 0) {
            line = &line[..z];
        }
        self.inline = true;
        split_args(line, &mut self.scratch, &mut self.args)?;
        Ok(Some(nl + 1))
    }

    fn parse_multibulk_header(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtoError> {
        let Some(cr) = self.find(buf, 0, b'\r') else {
            if buf.len() > self.limits.max_inline_len {
                return Err(ProtoError::TooBigMbulkCount);
            }
            return Ok(None);
        };
        if cr > self.limits.max_inline_len {
            return Err(ProtoError::TooBigMbulkCount); // chunking-independent
        }
        if cr + 1 >= buf.len() {
            return Ok(None); // the '\n' is still to come
        }
        let n = match parse_i64(&buf[1..cr]) {
            Some(n) if n <= self.limits.max_multibulk_len as i64 => n,
            _ => return Err(ProtoError::InvalidMbulkLen),
        };
        self.pos = cr + 2;
        if n <= 0 {
            // "*0" and "*-1" are empty requests: consumed, nothing to run.
            return Ok(Some(self.pos));
        }
        let n = n as usize;
        // Like Redis, size the table for at most 1024 arguments up front;
        // a client claiming a million must send them to get the memory.
        try_grow(&mut self.args, n.min(1024))?;
        self.state = State::Multibulk {
            remaining: n,
            bulk_len: None,
        };
        self.parse_bulks(buf)
    }

    fn parse_bulks(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtoError> {
        while let State::Multibulk {
            remaining,
            bulk_len,
        } = self.state
        {
            if remaining == 0 {
                break;
            }
            let len = match bulk_len {
                Some(l) => l,
                None => {
                    let pos = self.pos;
                    let Some(cr) = self.find(buf, pos, b'\r') else {
                        if buf.len() - pos > self.limits.max_inline_len {
                            return Err(ProtoError::TooBigBulkCount);
                        }
                        return Ok(None);
                    };
                    if cr - pos > self.limits.max_inline_len {
                        return Err(ProtoError::TooBigBulkCount); // chunking-independent
                    }
                    if cr + 1 >= buf.len() {
                        return Ok(None);
                    }
                    if buf[pos] != b'$' {
                        return Err(ProtoError::ExpectedDollar(buf[pos]));
                    }
                    let l = match parse_i64(&buf[pos + 1..cr]) {
                        Some(l) if l >= 0 && l as u64 <= self.limits.max_bulk_len as u64 => {
                            l as usize
                        }
                        _ => return Err(ProtoError::InvalidBulkLen),
                    };
                    self.pos = cr + 2;
                    self.state = State::Multibulk {
                        remaining,
                        bulk_len: Some(l),
                    };
                    l
                }
            };
            // The bulk and its trailing CRLF (skipped unchecked, as Redis).
            if buf.len() - self.pos < len + 2 {
                return Ok(None);
            }
            try_grow(&mut self.args, 1)?;
            self.args.push((self.pos, self.pos + len));
            self.pos += len + 2;
            self.state = State::Multibulk {
                remaining: remaining - 1,
                bulk_len: None,
            };
        }
        Ok(Some(self.pos))
    }
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Splits an inline request like Redis's `sdssplitargs`: whitespace-separated
/// words, "double quotes" with \n \r \t \b \a \xHH escapes, 'single quotes'
/// with only \' escaped; a closing quote must be followed by a space or the
/// end. Unescaped bytes go to `out`, word ranges to `ranges`.
pub fn split_args(
    line: &[u8],
    out: &mut Vec<u8>,
    ranges: &mut Vec<(usize, usize)>,
) -> Result<(), ProtoError> {
    let n = line.len();
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    try_grow(out, n)?;
    let mut i = 0;
    loop {
        while i < n && is_space(line[i]) {
            i += 1;
        }
        if i >= n {
            return Ok(());
        }
        let start = out.len();
        let (mut inq, mut insq, mut done) = (false, false, false);
        while !done {
            let c = at(i);
            if inq {
                if c == b'\\' && at(i + 1) == b'x' {
                    if let (Some(h), Some(l)) = (hex_val(at(i + 2)), hex_val(at(i + 3))) {
                        out.push(h * 16 + l);
                        i += 3;
                    } else {
                        // "\x" not followed by two hex digits: plain escape.
                        i += 1;
                        out.push(b'x');
                    }
                } else if c == b'\\' && i + 1 < n {
                    i += 1;
                    out.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        o => o,
                    });
                } else if c == b'"' && i < n {
                    if i + 1 < n && !is_space(line[i + 1]) {
                        return Err(ProtoError::UnbalancedQuotes);
                    }
                    done = true;
                } else if i >= n {
                    return Err(ProtoError::UnbalancedQuotes);
                } else {
                    out.push(c);
                }
            } else if insq {
                if c == b'\\' && at(i + 1) == b'\'' {
                    i += 1;
                    out.push(b'\'');
                } else if c == b'\'' && i < n {
                    if i + 1 < n && !is_space(line[i + 1]) {
                        return Err(ProtoError::UnbalancedQuotes);
                    }
                    done = true;
                } else if i >= n {
                    return Err(ProtoError::UnbalancedQuotes);
                } else {
                    out.push(c);
                }
            } else if i >= n {
                done = true;
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => done = true,
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    _ => out.push(c),
                }
            }
            if i < n {
                i += 1;
            }
        }
        try_grow(ranges, 1)?;
        ranges.push((start, out.len()));
    }
}

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
    use alloc::vec;

    fn parse_all(input: &[u8]) -> (Vec<Vec<Vec<u8>>>, Option<ProtoError>, usize) {
        let mut p = Parser::new(Limits::default());
        let mut cmds = Vec::new();
        let mut off = 0;
        loop {
            match p.parse(&input[off..]) {
                Ok(Some(n)) => {
                    let a = p.args(&input[off..]);
                    cmds.push(a.iter().map(|x| x.to_vec()).collect());
                    off += n;
                    p.reset();
                }
                Ok(None) => return (cmds, None, off),
                Err(e) => return (cmds, Some(e), off),
            }
        }
    }

    fn v(s: &[&[u8]]) -> Vec<Vec<u8>> {
        s.iter().map(|x| x.to_vec()).collect()
    }

    #[test]
    fn multibulk_and_pipeline() {
        let (c, e, off) =
            parse_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET");
        assert_eq!(c, vec![v(&[b"GET", b"k"]), v(&[b"PING"])]);
        assert_eq!(e, None);
        assert_eq!(off, 34);
    }

    #[test]
    fn binary_safe_bulk() {
        let (c, _, _) = parse_all(b"*1\r\n$4\r\n\r\n\0x\r\n");
        assert_eq!(c, vec![v(&[b"\r\n\0x"])]);
    }

    #[test]
    fn empty_multibulk_is_skipped() {
        let (c, e, off) = parse_all(b"*0\r\n*-1\r\n");
        assert_eq!(c, vec![v(&[]), v(&[])]);
        assert_eq!((e, off), (None, 9));
    }

    #[test]
    fn inline() {
        let (c, e, _) = parse_all(b"PING\r\nset a  b\n\r\n  \nGET \"a\\x41\\n\" 'it\\'s'\r\n");
        assert_eq!(e, None);
        assert_eq!(
            c,
            vec![
                v(&[b"PING"]),
                v(&[b"set", b"a", b"b"]),
                v(&[]),
                v(&[]),
                v(&[b"GET", b"aA\n", b"it's"])
            ]
        );
        let (c, _, _) = parse_all(b"a\0b c\r\n");
        assert_eq!(c, vec![v(&[b"a"])]);
        let (c, _, _) = parse_all(b"x\"y z\"w\r\n");
        assert_eq!(e, None);
        assert!(c.is_empty() || c[0] != v(&[b"xy zw"]));
    }

    #[test]
    fn inline_quote_errors() {
        for bad in [
            &b"GET \"abc\r\n"[..],
            b"GET \"a\"b\r\n",
            b"GET 'a\r\n",
            b"GET 'a'b\r\n",
        ] {
            assert_eq!(
                parse_all(bad).1,
                Some(ProtoError::UnbalancedQuotes),
                "{:?}",
                bad
            );
        }
    }

    #[test]
    fn protocol_errors() {
        let cases: &[(&[u8], ProtoError)] = &[
            (b"*x\r\n", ProtoError::InvalidMbulkLen),
            (b"*1048577\r\n", ProtoError::InvalidMbulkLen),
            (b"*01\r\n", ProtoError::InvalidMbulkLen),
            (b"*1\r\nx3\r\n", ProtoError::ExpectedDollar(b'x')),
            (b"*1\r\n$-1\r\n", ProtoError::InvalidBulkLen),
            (b"*1\r\n$536870913\r\n", ProtoError::InvalidBulkLen),
            (b"*1\r\n$abc\r\n", ProtoError::InvalidBulkLen),
        ];
        for (input, want) in cases {
            assert_eq!(parse_all(input).1, Some(*want), "{:?}", input);
        }
        let mut big = vec![b'*'];
        big.extend(core::iter::repeat_n(b'1', 70_000));
        assert_eq!(parse_all(&big).1, Some(ProtoError::TooBigMbulkCount));
        let mut big = b"*1\r\n$".to_vec();
        big.extend(core::iter::repeat_n(b'1', 70_000));
        assert_eq!(parse_all(&big).1, Some(ProtoError::TooBigBulkCount));
        let big = vec![b'a'; 70_000];
        assert_eq!(parse_all(&big).1, Some(ProtoError::TooBigInline));
        assert_eq!(
            ProtoError::ExpectedDollar(b'x').message(),
            b"ERR Protocol error: expected '$', got 'x'".to_vec()
        );
    }

    #[test]
    fn max_bulk_accepted_without_allocation() {
        // A claimed 512 MiB bulk just waits; nothing is allocated for it.
        let mut p = Parser::new(Limits::default());
        let buf = b"*1\r\n$536870912\r\nabc";
        assert_eq!(p.parse(buf), Ok(None));
        assert!(p.args.capacity() <= 1024);
    }

    #[test]
    fn byte_at_a_time() {
        let input = b"*2\r\n$3\r\nGET\r\n$10\r\n0123456789\r\n";
        let mut p = Parser::new(Limits::default());
        for i in 0..input.len() {
            assert_eq!(p.parse(&input[..i]), Ok(None), "{i}");
        }
        assert_eq!(p.parse(input), Ok(Some(input.len())));
        assert_eq!(p.args(input).get(1), b"0123456789");
        assert_eq!(p.args(input).get(7), b"");
    }

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
