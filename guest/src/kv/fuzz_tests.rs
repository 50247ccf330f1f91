//! Property tests: arbitrary input never panics, replies are always
//! well-formed RESP, and how the input is chunked never changes the output.
//!
//! The case count defaults to proptest's 256; raise it with
//! `PROPTEST_CASES=100000 cargo test -p snapvm-guest --lib fuzz`.

use alloc::vec::Vec;

use proptest::prelude::*;

use super::conn::tests::resp_values;
use super::conn::Connection;
use super::probe::ManualClock;
use super::resp::Limits;
use super::store::{Store, StoreConfig};

fn small_store() -> Store {
    Store::new(StoreConfig {
        // Small limits so the fuzzer reaches the limit paths too.
        maxmemory: 256 * 1024,
        proto: Limits {
            max_bulk_len: 4096,
            max_multibulk_len: 64,
            max_inline_len: 256,
        },
        client_query_buffer_limit: 8192,
        ..StoreConfig::default()
    })
}

/// Feeds `input` split at `cuts`, draining output in pieces of `drain`
/// bytes after every feed. Returns (output, closed).
fn run_chunked(input: &[u8], cuts: &[usize], drain: usize) -> (Vec<u8>, bool) {
    let mut store = small_store();
    let mut conn = Connection::new(&mut store);
    let clock = ManualClock::new(1000);
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(0);
    points.push(input.len());
    points.sort_unstable();
    let mut out = Vec::new();
    for w in points.windows(2) {
        conn.feed(&mut store, &input[w[0]..w[1]], &clock);
        let n = conn.output().len().min(drain.max(1));
        out.extend_from_slice(&conn.output()[..n]);
        conn.consume_output(n);
    }
    // Flush everything, resuming work held back by the output high-water.
    for _ in 0..10_000 {
        conn.feed(&mut store, b"", &clock);
        if !conn.has_output() {
            break;
        }
        out.extend_from_slice(conn.output());
        let n = conn.output().len();
        conn.consume_output(n);
    }
    (out, conn.wants_close())
}

/// Bytes biased towards protocol syntax so the parser's states are reached.
fn protocol_bytes() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just(b"*".to_vec()),
        Just(b"$".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"'".to_vec()),
        Just(b"\\x4".to_vec()),
        Just(b" ".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"0".to_vec()),
        Just(b"3".to_vec()),
        Just(b"99999999999999999999".to_vec()),
        Just(b"SET".to_vec()),
        Just(b"GET".to_vec()),
        Just(b"INCR".to_vec()),
        Just(b"APPEND".to_vec()),
        Just(b"KEYS".to_vec()),
        Just(b"SCAN".to_vec()),
        Just(b"DEBUG".to_vec()),
        Just(b"POPULATE".to_vec()),
        Just(b"CONFIG".to_vec()),
        Just(b"COMMAND".to_vec()),
        Just(b"INFO".to_vec()),
        Just(b"[a-".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..8),
    ];
    proptest::collection::vec(token, 0..60).prop_map(|v| v.concat())
}

/// A well-formed request (as multibulk or, for simple words, inline).
fn request() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        Just(b"a".to_vec()),
        Just(b"b".to_vec()),
        Just(b"n".to_vec()),
        Just(b"".to_vec())
    ];
    let val = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40),
        (-1000i64..1000).prop_map(|n| alloc::format!("{n}").into_bytes()),
    ];
    let name = prop_oneof![
        Just("SET"),
        Just("GET"),
        Just("DEL"),
        Just("EXISTS"),
        Just("INCR"),
        Just("INCRBY"),
        Just("DECR"),
        Just("APPEND"),
        Just("STRLEN"),
        Just("MGET"),
        Just("MSET"),
        Just("PING"),
        Just("ECHO"),
        Just("DBSIZE"),
        Just("KEYS"),
        Just("SCAN"),
        Just("SETNX"),
        Just("GETDEL"),
        Just("FLUSHALL"),
        Just("TYPE"),
        Just("bogus"),
        Just("select"),
        Just("CLIENT"),
    ];
    let args = proptest::collection::vec(prop_oneof![key.clone(), val], 0..4);
    (name, key, args, any::<bool>()).prop_map(|(name, key, rest, inline)| {
        let mut argv: Vec<Vec<u8>> = alloc::vec![name.as_bytes().to_vec(), key];
        argv.extend(rest);
        let simple = argv
            .iter()
            .all(|a| !a.is_empty() && a.iter().all(|c| c.is_ascii_alphanumeric()));
        if inline && simple {
            let mut line = argv.join(&b' ');
            line.extend_from_slice(b"\r\n");
            line
        } else {
            let mut m = alloc::format!("*{}\r\n", argv.len()).into_bytes();
            for a in argv {
                m.extend_from_slice(alloc::format!("${}\r\n", a.len()).as_bytes());
                m.extend_from_slice(&a);
                m.extend_from_slice(b"\r\n");
            }
            m
        }
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(
        input in prop_oneof![protocol_bytes(), proptest::collection::vec(any::<u8>(), 0..512)],
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
        drain in 1usize..64,
    ) {
        let (out, _) = run_chunked(&input, &cuts, drain);
        prop_assert!(resp_values(&out).is_some(), "malformed output {:?}", out);
        // And chunking never changes what the server says (except INFO,
        // whose byte counters legitimately depend on what has arrived).
        let has_info = input.windows(4).any(|w| w.eq_ignore_ascii_case(b"info"));
        if !has_info {
            let (whole, _) = run_chunked(&input, &[], usize::MAX);
            prop_assert_eq!(out, whole);
        }
    }

    #[test]
    fn chunking_does_not_change_pipeline_output(
        reqs in proptest::collection::vec(request(), 1..30),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
        drain in 1usize..200,
    ) {
        let input = reqs.concat();
        let (whole, closed) = run_chunked(&input, &[], usize::MAX);
        prop_assert!(!closed);
        // One reply per request.
        prop_assert_eq!(resp_values(&whole), Some(reqs.len()));
        let (chunked, _) = run_chunked(&input, &cuts, drain);
        prop_assert_eq!(chunked, whole);
    }
}
