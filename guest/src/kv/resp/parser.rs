//! The incremental RESP2 request parser: multibulk (`*N` then `$len`
//! bulks) and inline requests, Redis's limits ([`Limits`]) and error
//! wording ([`ProtoError`]), and the [`Args`] a parsed command yields.

use alloc::vec::Vec;

use super::inline::split_args;
use crate::kv::mem::{try_grow, AllocError};
use crate::kv::num::parse_i64;

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
}
