//! String commands: GET, SET, SETNX, GETDEL, MGET, MSET, INCR family,
//! APPEND, STRLEN.

use super::{wrong_args, Ctx, NOT_INT_ERR, OOM_ERR, OVERFLOW_ERR, SYNTAX_ERR};
use crate::kv::dict::entry_footprint;
use crate::kv::num::parse_i64;
use crate::kv::resp::Args;
use crate::kv::store::{AppendError, IncrError};

pub fn get(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let v = ctx.store.get(args.get(1));
    ctx.reply.opt_bulk(v);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cond {
    Always,
    Nx,
    Xx,
}

/// SET key value [NX|XX] [GET] [KEEPTTL]. Expiry options (EX, PX, EXAT,
/// PXAT) are not supported (the store has no TTLs) and get a syntax error.
pub fn set(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let mut cond = Cond::Always;
    let mut want_get = false;
    for i in 3..args.len() {
        let opt = args.get(i);
        if opt.eq_ignore_ascii_case(b"nx") && cond != Cond::Xx {
            cond = Cond::Nx;
        } else if opt.eq_ignore_ascii_case(b"xx") && cond != Cond::Nx {
            cond = Cond::Xx;
        } else if opt.eq_ignore_ascii_case(b"get") {
            want_get = true;
        } else if opt.eq_ignore_ascii_case(b"keepttl") {
            // No TTLs exist, so keeping them is a no-op.
        } else {
            ctx.error(SYNTAX_ERR);
            return;
        }
    }
    let (key, val) = (args.get(1), args.get(2));
    let mark = ctx.reply.len();
    let exists = if want_get {
        // Reply with the old value now; rolled back below if the write fails.
        let old = ctx.store.get(key);
        let exists = old.is_some();
        ctx.reply.opt_bulk(old);
        exists
    } else if cond != Cond::Always {
        ctx.store.exists(key)
    } else {
        false
    };
    let allowed = match cond {
        Cond::Always => true,
        Cond::Nx => !exists,
        Cond::Xx => exists,
    };
    if allowed {
        if ctx.store.set(key, val).is_err() {
            ctx.reply.truncate(mark);
            ctx.error(OOM_ERR);
            return;
        }
        if !want_get {
            ctx.reply.ok();
        }
    } else if !want_get {
        ctx.reply.null_bulk();
    }
}

pub fn setnx(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let (key, val) = (args.get(1), args.get(2));
    if ctx.store.exists(key) {
        ctx.reply.int(0);
    } else if ctx.store.set(key, val).is_err() {
        ctx.error(OOM_ERR);
    } else {
        ctx.reply.int(1);
    }
}

pub fn getdel(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let v = ctx.store.take(args.get(1));
    ctx.reply.opt_bulk(v.as_deref());
}

pub fn mget(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    ctx.reply.array(args.len() - 1);
    for k in args.iter().skip(1) {
        let v = ctx.store.get(k);
        ctx.reply.opt_bulk(v);
    }
}

pub fn mset(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    if args.len() % 2 == 0 {
        wrong_args(ctx, "mset");
        return;
    }
    // Check the whole batch up front so MSET is all-or-nothing under
    // maxmemory (an allocation failure midway can still leave it partial).
    let need: usize = (1..args.len())
        .step_by(2)
        .map(|i| entry_footprint(args.get(i).len(), args.get(i + 1).len()))
        .fold(0usize, usize::saturating_add);
    if ctx.store.check_room(need).is_err() {
        ctx.error(OOM_ERR);
        return;
    }
    for i in (1..args.len()).step_by(2) {
        if ctx.store.set(args.get(i), args.get(i + 1)).is_err() {
            ctx.error(OOM_ERR);
            return;
        }
    }
    ctx.reply.ok();
}

fn incr_reply(ctx: &mut Ctx<'_, '_>, key: &[u8], delta: i64) {
    match ctx.store.incr_by(key, delta) {
        Ok(v) => ctx.reply.int(v),
        Err(IncrError::NotInteger) => ctx.error(NOT_INT_ERR),
        Err(IncrError::Overflow) => ctx.error(OVERFLOW_ERR),
        Err(IncrError::Oom) => ctx.error(OOM_ERR),
    }
}

pub fn incr(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    incr_reply(ctx, args.get(1), 1);
}

pub fn decr(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    incr_reply(ctx, args.get(1), -1);
}

pub fn incrby(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    match parse_i64(args.get(2)) {
        Some(d) => incr_reply(ctx, args.get(1), d),
        None => ctx.error(NOT_INT_ERR),
    }
}

pub fn decrby(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    match parse_i64(args.get(2)) {
        // Redis refuses to negate LLONG_MIN with this message.
        Some(i64::MIN) => ctx.error(b"ERR decrement would overflow"),
        Some(d) => incr_reply(ctx, args.get(1), -d),
        None => ctx.error(NOT_INT_ERR),
    }
}

pub fn append(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    match ctx.store.append(args.get(1), args.get(2)) {
        Ok(n) => ctx.reply.int(n as i64),
        Err(AppendError::TooBig) => {
            ctx.error(b"ERR string exceeds maximum allowed size (proto-max-bulk-len)")
        }
        Err(AppendError::Oom) => ctx.error(OOM_ERR),
    }
}

pub fn strlen(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let n = ctx.store.get(args.get(1)).map_or(0, <[u8]>::len);
    ctx.reply.int(n as i64);
}

#[cfg(test)]
mod tests {
    use crate::kv::commands::test_util::{cmd, new_store};

    #[test]
    fn get_set() {
        let mut s = new_store();
        assert_eq!(cmd!(s, "GET", "foo"), b"$-1\r\n");
        assert_eq!(cmd!(s, "SET", "foo", "bar"), b"+OK\r\n");
        assert_eq!(cmd!(s, "GET", "foo"), b"$3\r\nbar\r\n");
        assert_eq!(cmd!(s, "SET", "bin\0\r\n", "\0\x01"), b"+OK\r\n");
        assert_eq!(cmd!(s, "GET", "bin\0\r\n"), b"$2\r\n\0\x01\r\n");
        assert_eq!(cmd!(s, "SET", "e", ""), b"+OK\r\n");
        assert_eq!(cmd!(s, "GET", "e"), b"$0\r\n\r\n");
    }

    #[test]
    fn set_options() {
        let mut s = new_store();
        assert_eq!(cmd!(s, "SET", "k", "1", "XX"), b"$-1\r\n");
        assert_eq!(cmd!(s, "GET", "k"), b"$-1\r\n");
        assert_eq!(cmd!(s, "SET", "k", "1", "nx"), b"+OK\r\n");
        assert_eq!(cmd!(s, "SET", "k", "2", "NX"), b"$-1\r\n");
        assert_eq!(cmd!(s, "GET", "k"), b"$1\r\n1\r\n");
        assert_eq!(cmd!(s, "SET", "k", "3", "xx"), b"+OK\r\n");
        assert_eq!(cmd!(s, "SET", "k", "4", "GET"), b"$1\r\n3\r\n");
        assert_eq!(cmd!(s, "SET", "n", "4", "GET"), b"$-1\r\n");
        assert_eq!(cmd!(s, "SET", "k", "5", "NX", "GET"), b"$1\r\n4\r\n");
        assert_eq!(cmd!(s, "GET", "k"), b"$1\r\n4\r\n");
        assert_eq!(cmd!(s, "SET", "k", "6", "KEEPTTL"), b"+OK\r\n");
        for bad in [
            &["NX", "XX"][..],
            &["XX", "NX"],
            &["EX", "10"],
            &["PX", "5"],
            &["KEEP"],
            &["EXAT", "1"],
        ] {
            let mut argv: alloc::vec::Vec<&[u8]> = alloc::vec![b"SET", b"k", b"v"];
            argv.extend(bad.iter().map(|a| a.as_bytes()));
            assert_eq!(
                crate::kv::commands::test_util::run(&mut s, &argv),
                b"-ERR syntax error\r\n"
            );
        }
        assert_eq!(cmd!(s, "GET", "k"), b"$1\r\n6\r\n");
    }

    #[test]
    fn setnx_getdel() {
        let mut s = new_store();
        assert_eq!(cmd!(s, "SETNX", "a", "1"), b":1\r\n");
        assert_eq!(cmd!(s, "SETNX", "a", "2"), b":0\r\n");
        assert_eq!(cmd!(s, "GETDEL", "a"), b"$1\r\n1\r\n");
        assert_eq!(cmd!(s, "GETDEL", "a"), b"$-1\r\n");
    }

    #[test]
    fn mget_mset() {
        let mut s = new_store();
        assert_eq!(cmd!(s, "MSET", "a", "1", "b", "2"), b"+OK\r\n");
        assert_eq!(
            cmd!(s, "MGET", "a", "x", "b"),
            b"*3\r\n$1\r\n1\r\n$-1\r\n$1\r\n2\r\n"
        );
        assert_eq!(
            cmd!(s, "MSET", "a", "1", "b"),
            b"-ERR wrong number of arguments for 'mset' command\r\n"
        );
    }

    #[test]
    fn incr_family() {
        let mut s = new_store();
        assert_eq!(cmd!(s, "INCR", "n"), b":1\r\n");
        assert_eq!(cmd!(s, "INCRBY", "n", "41"), b":42\r\n");
        assert_eq!(cmd!(s, "DECR", "n"), b":41\r\n");
        assert_eq!(cmd!(s, "DECRBY", "n", "50"), b":-9\r\n");
        assert_eq!(cmd!(s, "GET", "n"), b"$2\r\n-9\r\n");
        assert_eq!(
            cmd!(s, "INCRBY", "n", "x"),
            b"-ERR value is not an integer or out of range\r\n"
        );
        assert_eq!(
            cmd!(s, "INCRBY", "n", " 1"),
            b"-ERR value is not an integer or out of range\r\n"
        );
        cmd!(s, "SET", "s", "abc");
        assert_eq!(
            cmd!(s, "INCR", "s"),
            b"-ERR value is not an integer or out of range\r\n"
        );
        cmd!(s, "SET", "z", "007");
        assert_eq!(
            cmd!(s, "INCR", "z"),
            b"-ERR value is not an integer or out of range\r\n"
        );
        cmd!(s, "SET", "m", "9223372036854775807");
        assert_eq!(
            cmd!(s, "INCR", "m"),
            b"-ERR increment or decrement would overflow\r\n"
        );
        cmd!(s, "SET", "m", "-9223372036854775808");
        assert_eq!(
            cmd!(s, "DECR", "m"),
            b"-ERR increment or decrement would overflow\r\n"
        );
        assert_eq!(
            cmd!(s, "DECRBY", "q", "-9223372036854775808"),
            b"-ERR decrement would overflow\r\n"
        );
    }

    #[test]
    fn append_strlen() {
        let mut s = new_store();
        assert_eq!(cmd!(s, "STRLEN", "a"), b":0\r\n");
        assert_eq!(cmd!(s, "APPEND", "a", "hello"), b":5\r\n");
        assert_eq!(cmd!(s, "APPEND", "a", " world"), b":11\r\n");
        assert_eq!(cmd!(s, "GET", "a"), b"$11\r\nhello world\r\n");
        assert_eq!(cmd!(s, "STRLEN", "a"), b":11\r\n");
    }
}
