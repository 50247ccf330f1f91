//! One client connection: input and output buffers around the parser and
//! the command dispatcher. This is what the kernel drives.
//!
//! The kernel, per connection and per main-loop iteration:
//!
//! 1. `conn.feed(&mut store, bytes_from_transport, &clock)` with whatever
//!    arrived (possibly nothing: an empty feed resumes work held back by a
//!    full output buffer);
//! 2. sends `conn.output()` as far as the transport allows, then
//!    `conn.consume_output(sent)`;
//! 3. when `conn.is_finished()` (close requested and everything flushed),
//!    closes the transport and calls `conn.release(&mut store)`. A peer that
//!    goes away is handled the same way: just `release`.
//!
//! Nothing here panics on any input, and no buffer grows beyond what the
//! client actually sent (up to `client-query-buffer-limit`) or what replies
//! actually need.

use alloc::vec::Vec;

use super::commands::{self, Client, Ctx};
use super::mem::try_grow;
use super::probe::Clock;
use super::resp::{Parser, ProtoError, Reply};
use super::store::Store;

/// Stop executing queued commands while this much output is waiting to be
/// sent, so a client that pipelines without reading cannot make the guest
/// buffer unbounded replies; the rest runs once output drains.
pub const OUTPUT_HIGH_WATER: usize = 1024 * 1024;
/// Buffers bigger than this are released once empty, so one huge request or
/// reply does not pin its memory for the life of the connection.
const KEEP_CAPACITY: usize = 64 * 1024;

pub struct Connection {
    parser: Parser,
    /// Unprocessed input; the current (partial) command starts at index 0.
    input: Vec<u8>,
    output: Vec<u8>,
    /// Bytes of `output` already handed to the transport.
    out_pos: usize,
    client: Client,
    close: bool,
    query_limit: usize,
}

impl Connection {
    /// A new connection, registered with `store` (INFO clients, client id).
    pub fn new(store: &mut Store) -> Connection {
        let id = store.client_connected();
        Connection {
            parser: Parser::new(store.config().proto),
            input: Vec::new(),
            output: Vec::new(),
            out_pos: 0,
            client: Client {
                id,
                ..Client::default()
            },
            close: false,
            query_limit: store.config().client_query_buffer_limit,
        }
    }

    pub fn id(&self) -> u64 {
        self.client.id
    }

    /// Unregisters the connection from `store`.
    pub fn release(self, store: &mut Store) {
        store.client_disconnected();
    }

    /// Appends `input` and executes every complete command in the buffer.
    /// Input after a close request (QUIT, protocol error) is ignored.
    pub fn feed(&mut self, store: &mut Store, input: &[u8], clock: &dyn Clock) {
        if self.close {
            return;
        }
        if !input.is_empty() {
            store.stats.total_net_input_bytes += input.len() as u64;
            if self.input.len().saturating_add(input.len()) > self.query_limit {
                self.fail(
                    store,
                    b"ERR Protocol error: client query buffer limit exceeded",
                );
                return;
            }
            if try_grow(&mut self.input, input.len()).is_err() {
                self.fail(store, &ProtoError::OutOfMemory.message());
                return;
            }
            self.input.extend_from_slice(input);
        }
        self.process(store, clock);
    }

    /// Replies with an error and closes after flushing.
    fn fail(&mut self, store: &mut Store, msg: &[u8]) {
        let mut r = Reply::new(&mut self.output);
        r.error(msg);
        store.stats.total_error_replies += 1;
        self.close = true;
        self.input = Vec::new();
    }

    fn process(&mut self, store: &mut Store, clock: &dyn Clock) {
        let mut start = 0;
        while !self.close && self.output.len() - self.out_pos < OUTPUT_HIGH_WATER {
            let buf = &self.input[start..];
            match self.parser.parse(buf) {
                Ok(None) => break,
                Ok(Some(n)) => {
                    let args = self.parser.args(buf);
                    if !args.is_empty() {
                        let t0 = clock.now_ticks();
                        let mark = self.output.len();
                        let mut reply = Reply::new(&mut self.output);
                        let mut ctx = Ctx {
                            store,
                            client: &mut self.client,
                            reply: &mut reply,
                            clock,
                        };
                        commands::execute(&mut ctx, args);
                        if reply.failed() {
                            // Out of memory for the reply: drop it and the
                            // connection rather than the guest.
                            self.output.truncate(mark);
                            self.close = true;
                        }
                        store.stats.total_net_output_bytes += (self.output.len() - mark) as u64;
                        store.probe.record_cmd(clock.now_ticks().saturating_sub(t0));
                        store.after_command();
                        if self.client.close_after_reply {
                            self.close = true;
                        }
                    }
                    self.parser.reset();
                    start += n;
                }
                Err(e) => {
                    start = self.input.len();
                    self.fail(store, &e.message());
                    break;
                }
            }
        }
        if start >= self.input.len() {
            self.input.clear();
            if self.input.capacity() > KEEP_CAPACITY {
                self.input = Vec::new();
            }
        } else if start > 0 {
            // Move the partial command to the front. Each partial command is
            // moved at most once (afterwards it starts at 0), so this is
            // linear overall.
            self.input.drain(..start);
        }
    }

    /// Reply bytes waiting to be sent.
    pub fn output(&self) -> &[u8] {
        &self.output[self.out_pos..]
    }

    pub fn has_output(&self) -> bool {
        self.out_pos < self.output.len()
    }

    /// Marks `n` bytes of [`Connection::output`] as sent.
    pub fn consume_output(&mut self, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.output.len());
        if self.out_pos == self.output.len() {
            self.output.clear();
            self.out_pos = 0;
            if self.output.capacity() > OUTPUT_HIGH_WATER * 2 {
                self.output = Vec::new();
            }
        } else if self.out_pos > KEEP_CAPACITY && self.out_pos * 2 > self.output.len() {
            self.output.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }

    /// Takes all pending output at once (tests, simple transports).
    pub fn take_output(&mut self) -> Vec<u8> {
        let out = self.output()[..].to_vec();
        self.consume_output(out.len());
        out
    }

    /// The connection must be closed once its output is flushed.
    pub fn wants_close(&self) -> bool {
        self.close
    }

    /// Close requested and nothing left to send: close the transport now.
    pub fn is_finished(&self) -> bool {
        self.close && !self.has_output()
    }

    /// Unprocessed input is buffered (a partial command, or complete ones
    /// held back by [`OUTPUT_HIGH_WATER`]; feed again after sending).
    pub fn has_pending_input(&self) -> bool {
        !self.input.is_empty()
    }

    /// Bytes of unprocessed input held.
    pub fn pending_input_len(&self) -> usize {
        self.input.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kv::probe::ManualClock;
    use crate::kv::resp::Limits;
    use crate::kv::store::StoreConfig;
    use alloc::vec;

    /// Length of the RESP2 value at the start of `b`, if complete and valid.
    pub fn resp_value_len(b: &[u8]) -> Option<usize> {
        let cr = b.windows(2).position(|w| w == b"\r\n")?;
        let line = &b[1..cr];
        let after = cr + 2;
        match *b.first()? {
            b'+' | b'-' => Some(after),
            b':' => crate::kv::num::parse_i64(line).map(|_| after),
            b'$' => {
                let n = crate::kv::num::parse_i64(line)?;
                if n == -1 {
                    return Some(after);
                }
                let n = usize::try_from(n).ok()?;
                (b.get(after + n..after + n + 2)? == b"\r\n").then_some(after + n + 2)
            }
            b'*' => {
                let n = crate::kv::num::parse_i64(line)?;
                let mut off = after;
                for _ in 0..n.max(0) {
                    off += resp_value_len(&b[off..])?;
                }
                Some(off)
            }
            _ => None,
        }
    }

    /// Splits `b` into whole RESP values; None if anything is malformed.
    pub fn resp_values(mut b: &[u8]) -> Option<usize> {
        let mut n = 0;
        while !b.is_empty() {
            let l = resp_value_len(b)?;
            b = &b[l..];
            n += 1;
        }
        Some(n)
    }

    fn setup() -> (Store, Connection, ManualClock) {
        let mut s = Store::new(StoreConfig::default());
        let c = Connection::new(&mut s);
        (s, c, ManualClock::new(1000))
    }

    fn roundtrip(input: &[u8]) -> (Vec<u8>, bool) {
        let (mut s, mut c, clk) = setup();
        c.feed(&mut s, input, &clk);
        (c.take_output(), c.wants_close())
    }

    #[test]
    fn pipeline_exact_output() {
        let (out, close) =
            roundtrip(b"*3\r\n$3\r\nSET\r\n$3\r\nfoo\r\n$3\r\nbar\r\n*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\nPING\r\n");
        assert_eq!(out, b"+OK\r\n$3\r\nbar\r\n+PONG\r\n");
        assert!(!close);
    }

    #[test]
    fn inline_commands() {
        let (out, _) = roundtrip(b"set a \"x y\"\r\nget a\nEXISTS a b\r\n\r\n");
        assert_eq!(out, b"+OK\r\n$3\r\nx y\r\n:1\r\n");
    }

    #[test]
    fn partial_then_rest() {
        let (mut s, mut c, clk) = setup();
        c.feed(&mut s, b"*2\r\n$4\r\nECHO\r\n$5\r\nhel", &clk);
        assert_eq!(c.output(), b"");
        assert!(c.has_pending_input());
        c.feed(&mut s, b"lo\r\n*1\r\n$4\r\nPI", &clk);
        assert_eq!(c.take_output(), b"$5\r\nhello\r\n");
        c.feed(&mut s, b"NG\r\n", &clk);
        assert_eq!(c.take_output(), b"+PONG\r\n");
        assert!(!c.has_pending_input());
    }

    #[test]
    fn malformed_inputs_exact_replies() {
        let cases: &[(&[u8], &[u8])] = &[
            (
                b"*x\r\n",
                b"-ERR Protocol error: invalid multibulk length\r\n",
            ),
            (
                b"*-\r\n",
                b"-ERR Protocol error: invalid multibulk length\r\n",
            ),
            (
                b"*2000000\r\n",
                b"-ERR Protocol error: invalid multibulk length\r\n",
            ),
            (
                b"*1\r\nx\r\n",
                b"-ERR Protocol error: expected '$', got 'x'\r\n",
            ),
            (
                b"*1\r\n\r\n",
                b"-ERR Protocol error: expected '$', got ' '\r\n",
            ),
            (
                b"*1\r\n$x\r\n",
                b"-ERR Protocol error: invalid bulk length\r\n",
            ),
            (
                b"*1\r\n$-1\r\n",
                b"-ERR Protocol error: invalid bulk length\r\n",
            ),
            (
                b"*1\r\n$536870913\r\n",
                b"-ERR Protocol error: invalid bulk length\r\n",
            ),
            (
                b"*1\r\n$ 1\r\n",
                b"-ERR Protocol error: invalid bulk length\r\n",
            ),
            (
                b"GET \"a\r\n",
                b"-ERR Protocol error: unbalanced quotes in request\r\n",
            ),
            (
                b"GET 'a'b\r\n",
                b"-ERR Protocol error: unbalanced quotes in request\r\n",
            ),
            // Commands before the error still run; nothing after it does.
            (
                b"PING\r\n*1\r\n$4\r\nPING\r\n*1\r\n%4\r\nPING\r\nPING\r\n",
                b"+PONG\r\n+PONG\r\n-ERR Protocol error: expected '$', got '%'\r\n",
            ),
        ];
        for (input, want) in cases {
            let (out, close) = roundtrip(input);
            assert_eq!(&out[..], *want, "input {:?}", core::str::from_utf8(input));
            assert!(close, "{:?}", input);
        }
        let mut big = vec![b'x'; 64 * 1024 + 1];
        assert_eq!(
            roundtrip(&big).0,
            b"-ERR Protocol error: too big inline request\r\n"
        );
        big[0] = b'*';
        assert_eq!(
            roundtrip(&big).0,
            b"-ERR Protocol error: too big mbulk count string\r\n"
        );
        let mut b2 = b"*1\r\n".to_vec();
        b2.extend_from_slice(&big);
        assert_eq!(
            roundtrip(&b2).0,
            b"-ERR Protocol error: too big bulk count string\r\n"
        );
        // Exactly at the limit without a newline: still waiting.
        assert_eq!(roundtrip(&vec![b'x'; 64 * 1024]), (vec![], false));
    }

    #[test]
    fn input_after_close_is_ignored() {
        let (mut s, mut c, clk) = setup();
        c.feed(&mut s, b"QUIT\r\nPING\r\n", &clk);
        assert!(c.wants_close());
        assert!(!c.is_finished());
        c.feed(&mut s, b"PING\r\n", &clk);
        assert_eq!(c.take_output(), b"+OK\r\n");
        assert!(c.is_finished());
        assert_eq!(s.connected_clients(), 1);
        c.release(&mut s);
        assert_eq!(s.connected_clients(), 0);
    }

    #[test]
    fn empty_requests_are_skipped() {
        assert_eq!(
            roundtrip(b"*0\r\n*-1\r\n\r\n   \r\nPING\r\n"),
            (b"+PONG\r\n".to_vec(), false)
        );
    }

    #[test]
    fn big_value_in_chunks_grows_with_data() {
        let (mut s, mut c, clk) = setup();
        let n = 3 * 1024 * 1024;
        let mut header = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$".to_vec();
        header.extend_from_slice(alloc::format!("{n}\r\n").as_bytes());
        c.feed(&mut s, &header, &clk);
        assert!(c.input.capacity() < 4096, "{}", c.input.capacity());
        let chunk = vec![b'v'; 64 * 1024];
        let mut sent = 0;
        while sent < n {
            let k = chunk.len().min(n - sent);
            c.feed(&mut s, &chunk[..k], &clk);
            sent += k;
            assert!(c.input.capacity() <= 2 * (sent + header.len()) + 64 * 1024);
        }
        assert_eq!(c.output(), b"");
        c.feed(&mut s, b"\r\nSTRLEN k\r\n", &clk);
        assert_eq!(
            c.take_output(),
            alloc::format!("+OK\r\n:{n}\r\n").as_bytes()
        );
        // The big buffer is released once the command is done.
        assert!(c.input.capacity() <= KEEP_CAPACITY);
    }

    #[test]
    fn query_buffer_limit() {
        let mut s = Store::new(StoreConfig {
            client_query_buffer_limit: 1000,
            proto: Limits::default(),
            ..StoreConfig::default()
        });
        let mut c = Connection::new(&mut s);
        let clk = ManualClock::new(1);
        c.feed(&mut s, b"*2\r\n$4\r\nECHO\r\n$2000\r\n", &clk);
        c.feed(&mut s, &[b'a'; 900], &clk);
        assert_eq!(c.output(), b"");
        c.feed(&mut s, &[b'a'; 200], &clk);
        assert_eq!(
            c.take_output(),
            b"-ERR Protocol error: client query buffer limit exceeded\r\n"
        );
        assert!(c.is_finished());
    }

    #[test]
    fn output_high_water_holds_back_commands() {
        let (mut s, mut c, clk) = setup();
        let val = vec![b'x'; 300 * 1024];
        let mut req = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$".to_vec();
        req.extend_from_slice(alloc::format!("{}\r\n", val.len()).as_bytes());
        req.extend_from_slice(&val);
        req.extend_from_slice(b"\r\n");
        c.feed(&mut s, &req, &clk);
        c.take_output();
        let gets = b"GET k\r\n".repeat(10);
        c.feed(&mut s, &gets, &clk);
        // Four 300 KiB replies reach the high-water mark; the rest wait.
        let first = c.output().len();
        assert!(
            (OUTPUT_HIGH_WATER..OUTPUT_HIGH_WATER + 400 * 1024).contains(&first),
            "{first}"
        );
        assert!(c.has_pending_input());
        let mut total = 0;
        loop {
            let n = c.output().len();
            if n == 0 {
                break;
            }
            total += n;
            c.consume_output(n);
            c.feed(&mut s, b"", &clk);
        }
        assert_eq!(total, 10 * (val.len() + 2 + "$307200\r\n".len()));
        assert!(!c.has_pending_input());
    }

    #[test]
    fn partial_consume_output() {
        let (mut s, mut c, clk) = setup();
        c.feed(&mut s, b"PING\r\nPING\r\n", &clk);
        c.consume_output(3);
        assert_eq!(c.output(), b"NG\r\n+PONG\r\n");
        c.consume_output(100);
        assert_eq!(c.output(), b"");
    }

    #[test]
    fn probe_times_commands() {
        struct Stepping(core::cell::Cell<u64>);
        impl Clock for Stepping {
            fn now_ticks(&self) -> u64 {
                let t = self.0.get();
                self.0.set(t + 10);
                t
            }
            fn ticks_per_us(&self) -> u64 {
                10
            }
        }
        let mut s = Store::new(StoreConfig::default());
        let mut c = Connection::new(&mut s);
        let clk = Stepping(core::cell::Cell::new(0));
        c.feed(&mut s, b"PING\r\nPING\r\n", &clk);
        assert_eq!(s.probe.commands().count(), 2);
        // Each command spans at least one clock step.
        assert!(s.probe.commands().min() >= 10);
        assert_eq!(s.stats.total_commands_processed, 2);
        assert_eq!(s.stats.total_net_input_bytes, 12);
        assert_eq!(s.stats.total_net_output_bytes, 14);
    }

    #[test]
    fn helper_validates_resp() {
        assert_eq!(
            resp_values(b"+OK\r\n$3\r\nabc\r\n*2\r\n:1\r\n$-1\r\n"),
            Some(3)
        );
        assert_eq!(resp_values(b"$3\r\nab\r\n"), None);
    }
}
