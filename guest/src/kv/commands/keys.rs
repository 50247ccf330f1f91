//! Keyspace commands: DEL, EXISTS, TYPE, TTL, DBSIZE, KEYS, SCAN, FLUSHALL,
//! SELECT.

use alloc::vec::Vec;

use super::{Ctx, NOT_INT_ERR, SYNTAX_ERR};
use crate::kv::glob;
use crate::kv::num::{fmt_u64, parse_i64, parse_u64};
use crate::kv::resp::{Args, Reply};

pub fn del(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let n = args.iter().skip(1).filter(|k| ctx.store.remove(k)).count();
    ctx.reply.int(n as i64);
}

pub fn exists(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let n = args.iter().skip(1).filter(|k| ctx.store.exists(k)).count();
    ctx.reply.int(n as i64);
}

pub fn type_(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    if ctx.store.exists(args.get(1)) {
        ctx.reply.simple(b"string");
    } else {
        ctx.reply.simple(b"none");
    }
}

/// TTL/PTTL: -1 (no expiry) for existing keys, -2 for missing ones.
pub fn ttl(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let v = if ctx.store.exists(args.get(1)) {
        -1
    } else {
        -2
    };
    ctx.reply.int(v);
}

pub fn dbsize(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    ctx.reply.int(ctx.store.len() as i64);
}

/// KEYS pattern: O(n) over the keyspace, as in Redis.
pub fn keys(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let pat = args.get(1);
    // Redis skips matching for a lone "*" (which also returns the empty key).
    let all = pat == b"*";
    let at = ctx.reply.array_placeholder();
    let mut n = 0usize;
    let reply: &mut Reply<'_> = ctx.reply;
    ctx.store.for_each(|e| {
        if all || glob::matches(pat, e.key(), false) {
            reply.bulk(e.key());
            n += 1;
        }
    });
    ctx.reply.fill_array(at, n);
}

/// SCAN cursor [MATCH pattern] [COUNT count] [TYPE type].
pub fn scan(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let Some(mut cursor) = parse_u64(args.get(1)) else {
        ctx.error(b"ERR invalid cursor");
        return;
    };
    let mut count: usize = 10;
    let mut pattern: Option<&[u8]> = None;
    let mut type_ok = true;
    let mut i = 2;
    while i < args.len() {
        let (opt, has_val) = (args.get(i), args.len() - i >= 2);
        if opt.eq_ignore_ascii_case(b"count") && has_val {
            match parse_i64(args.get(i + 1)) {
                None => {
                    ctx.error(NOT_INT_ERR);
                    return;
                }
                Some(c) if c < 1 => {
                    ctx.error(SYNTAX_ERR);
                    return;
                }
                Some(c) => count = usize::try_from(c).unwrap_or(usize::MAX),
            }
        } else if opt.eq_ignore_ascii_case(b"match") && has_val {
            let p = args.get(i + 1);
            pattern = if p == b"*" { None } else { Some(p) };
        } else if opt.eq_ignore_ascii_case(b"type") && has_val {
            // Every key is a string.
            type_ok = args.get(i + 1).eq_ignore_ascii_case(b"string");
        } else {
            ctx.error(SYNTAX_ERR);
            return;
        }
        i += 2;
    }
    // Keys go to a side buffer: the cursor, which comes first in the reply,
    // is only known at the end. Like Redis, visit at most 10 buckets per
    // requested key, and count keys before filtering.
    let mut keys_buf = Vec::new();
    let mut keys_reply = Reply::new(&mut keys_buf);
    let mut seen = 0usize;
    let mut emitted = 0usize;
    let mut max_iter = count.saturating_mul(10);
    loop {
        cursor = ctx.store.scan(cursor, |e| {
            seen += 1;
            if type_ok && pattern.is_none_or(|p| glob::matches(p, e.key(), false)) {
                keys_reply.bulk(e.key());
                emitted += 1;
            }
        });
        max_iter = max_iter.saturating_sub(1);
        if cursor == 0 || max_iter == 0 || seen >= count {
            break;
        }
    }
    if keys_reply.failed() {
        // Propagate the allocation failure to the connection.
        ctx.reply.fail();
        return;
    }
    let mut d = [0u8; 20];
    ctx.reply.array(2);
    ctx.reply.bulk(fmt_u64(cursor, &mut d));
    ctx.reply.array(emitted);
    ctx.reply.raw(&[&keys_buf]);
}

/// FLUSHALL / FLUSHDB [ASYNC|SYNC]: both are lazy (see `Store::flush`).
pub fn flushall(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    if args.len() > 2
        || (args.len() == 2
            && !args.get(1).eq_ignore_ascii_case(b"async")
            && !args.get(1).eq_ignore_ascii_case(b"sync"))
    {
        ctx.error(SYNTAX_ERR);
        return;
    }
    ctx.store.flush();
    ctx.reply.ok();
}

pub fn select(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    match parse_i64(args.get(1)) {
        None => ctx.error(b"ERR invalid DB index"),
        Some(0) => ctx.reply.ok(),
        Some(_) => ctx.error(b"ERR DB index is out of range"),
    }
}

#[cfg(test)]
mod tests {
    use crate::kv::commands::test_util::{cmd, new_store, run};
    use alloc::collections::BTreeSet;
    use alloc::format;
    use alloc::vec::Vec;

    #[test]
    fn del_exists_type_ttl_dbsize() {
        let mut s = new_store();
        cmd!(s, "MSET", "a", "1", "b", "2");
        assert_eq!(cmd!(s, "EXISTS", "a", "a", "zz", "b"), b":3\r\n");
        assert_eq!(cmd!(s, "DBSIZE"), b":2\r\n");
        assert_eq!(cmd!(s, "TYPE", "a"), b"+string\r\n");
        assert_eq!(cmd!(s, "TYPE", "zz"), b"+none\r\n");
        assert_eq!(cmd!(s, "TTL", "a"), b":-1\r\n");
        assert_eq!(cmd!(s, "PTTL", "zz"), b":-2\r\n");
        assert_eq!(cmd!(s, "DEL", "a", "a", "zz"), b":1\r\n");
        assert_eq!(cmd!(s, "UNLINK", "b"), b":1\r\n");
        assert_eq!(cmd!(s, "DBSIZE"), b":0\r\n");
    }

    #[test]
    fn keys_glob() {
        let mut s = new_store();
        cmd!(s, "MSET", "hello", "1", "hallo", "1", "hxllo", "1", "world", "1", "", "1");
        assert_eq!(cmd!(s, "KEYS", "nomatch*"), b"*0\r\n");
        assert_eq!(cmd!(s, "KEYS", "w*"), b"*1\r\n$5\r\nworld\r\n");
        let out = cmd!(s, "KEYS", "h[ae]llo");
        assert!(out.starts_with(b"*2\r\n"));
        assert_eq!(out.len(), b"*2\r\n$5\r\nhello\r\n$5\r\nhallo\r\n".len());
        assert!(cmd!(s, "KEYS", "*").starts_with(b"*5\r\n"));
        assert!(cmd!(s, "KEYS", "h[^e]llo").starts_with(b"*2\r\n"));
    }

    fn scan_all(s: &mut crate::kv::store::Store, extra: &[&[u8]]) -> (BTreeSet<Vec<u8>>, usize) {
        let mut cursor = b"0".to_vec();
        let mut keys = BTreeSet::new();
        let mut calls = 0;
        loop {
            let mut argv: Vec<&[u8]> = alloc::vec![b"SCAN", &cursor];
            argv.extend_from_slice(extra);
            let out = run(s, &argv);
            calls += 1;
            // Parse *2 $n cursor *m ($k key)*
            let text = out;
            let mut p = crate::kv::resp::Parser::new(Default::default());
            let _ = &mut p;
            let mut parts = Vec::new();
            let mut i = 0;
            while i < text.len() {
                let end = text[i..].windows(2).position(|w| w == b"\r\n").unwrap() + i;
                let line = &text[i..end];
                i = end + 2;
                if line[0] == b'$' {
                    let n: usize = core::str::from_utf8(&line[1..]).unwrap().parse().unwrap();
                    parts.push(text[i..i + n].to_vec());
                    i += n + 2;
                }
            }
            cursor = parts[0].clone();
            keys.extend(parts.into_iter().skip(1));
            if cursor == b"0" {
                return (keys, calls);
            }
        }
    }

    #[test]
    fn scan_full_and_match() {
        let mut s = new_store();
        for i in 0..500 {
            cmd!(s, "SET", &format!("key:{i}"), "v");
        }
        cmd!(s, "SET", "other", "v");
        let (all, calls) = scan_all(&mut s, &[]);
        assert_eq!(all.len(), 501);
        assert!(calls > 10);
        let (m, _) = scan_all(&mut s, &[b"MATCH", b"key:1*", b"COUNT", b"100"]);
        assert_eq!(m.len(), 111);
        let (t, _) = scan_all(&mut s, &[b"TYPE", b"hash"]);
        assert!(t.is_empty());
        assert_eq!(cmd!(s, "SCAN", "x"), b"-ERR invalid cursor\r\n");
        assert_eq!(cmd!(s, "SCAN", "0", "COUNT", "0"), b"-ERR syntax error\r\n");
        assert_eq!(
            cmd!(s, "SCAN", "0", "COUNT", "z"),
            b"-ERR value is not an integer or out of range\r\n"
        );
        assert_eq!(cmd!(s, "SCAN", "0", "MATCH"), b"-ERR syntax error\r\n");
        assert_eq!(cmd!(s, "SCAN", "0", "BOGUS", "1"), b"-ERR syntax error\r\n");
    }

    #[test]
    fn scan_empty() {
        let mut s = new_store();
        assert_eq!(cmd!(s, "SCAN", "0"), b"*2\r\n$1\r\n0\r\n*0\r\n");
    }

    #[test]
    fn flushall_select() {
        let mut s = new_store();
        cmd!(s, "SET", "a", "1");
        assert_eq!(cmd!(s, "FLUSHALL", "bogus"), b"-ERR syntax error\r\n");
        assert_eq!(cmd!(s, "FLUSHALL", "ASYNC"), b"+OK\r\n");
        assert_eq!(cmd!(s, "DBSIZE"), b":0\r\n");
        cmd!(s, "SET", "a", "1");
        assert_eq!(cmd!(s, "FLUSHALL"), b"+OK\r\n");
        assert_eq!(cmd!(s, "GET", "a"), b"$-1\r\n");
        assert_eq!(cmd!(s, "SELECT", "0"), b"+OK\r\n");
        assert_eq!(cmd!(s, "SELECT", "1"), b"-ERR DB index is out of range\r\n");
        assert_eq!(cmd!(s, "SELECT", "x"), b"-ERR invalid DB index\r\n");
    }
}
