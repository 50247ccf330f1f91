//! CONFIG GET/SET/RESETSTAT: the parameters clients and benchmarks ask
//! about; only `maxmemory` can change at run time.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use super::{help, spec, wrong_args, Ctx, Spec, NOKEY};
use crate::kv::glob;
use crate::kv::resp::Args;

/// Parameters CONFIG GET knows, with their current values.
fn config_params(ctx: &Ctx<'_, '_>) -> [(&'static str, String); 11] {
    let cfg = ctx.store.config();
    let n = |v: usize| {
        let mut s = String::new();
        let _ = write!(s, "{v}");
        s
    };
    [
        ("save", String::new()),
        ("appendonly", String::from("no")),
        ("maxmemory", n(cfg.maxmemory)),
        ("maxmemory-policy", String::from("noeviction")),
        ("databases", String::from("1")),
        ("proto-max-bulk-len", n(cfg.proto.max_bulk_len)),
        (
            "client-query-buffer-limit",
            n(cfg.client_query_buffer_limit),
        ),
        ("port", String::from("6379")),
        ("bind", String::new()),
        ("timeout", String::from("0")),
        ("maxclients", String::from("10000")),
    ]
}

/// CONFIG GET pattern [pattern ...]: name/value pairs, globs allowed.
fn config_get(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let params = config_params(ctx);
    let hits: Vec<&(&str, String)> = params
        .iter()
        .filter(|(name, _)| {
            args.iter()
                .skip(2)
                .any(|p| glob::matches(p, name.as_bytes(), true))
        })
        .collect();
    ctx.reply.array(hits.len() * 2);
    for (name, val) in hits {
        ctx.reply.bulk(name.as_bytes());
        ctx.reply.bulk(val.as_bytes());
    }
}

/// Redis's `memtoull`: bytes with an optional k/kb/m/mb/g/gb unit.
pub fn parse_memory(s: &[u8]) -> Option<usize> {
    let digits = s.iter().take_while(|c| c.is_ascii_digit()).count();
    let unit = &s[digits..];
    let mul: u64 = match unit.to_ascii_lowercase().as_slice() {
        b"" | b"b" => 1,
        b"k" => 1000,
        b"kb" => 1024,
        b"m" => 1000 * 1000,
        b"mb" => 1024 * 1024,
        b"g" => 1000 * 1000 * 1000,
        b"gb" => 1024 * 1024 * 1024,
        _ => return None,
    };
    let n = crate::kv::num::parse_u64(&s[..digits])?;
    usize::try_from(n.checked_mul(mul)?).ok()
}

/// CONFIG SET: only `maxmemory` can change at run time.
fn config_set(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    if args.len() != 4 {
        wrong_args(ctx, "config|set");
        return;
    }
    let (name, val) = (args.get(2), args.get(3));
    if name.eq_ignore_ascii_case(b"maxmemory") {
        match parse_memory(val) {
            Some(v) => {
                ctx.store.set_maxmemory(v);
                ctx.reply.ok();
            }
            None => {
                let mut m = b"ERR CONFIG SET failed (possibly related to argument 'maxmemory') - argument must be a memory value".to_vec();
                m.truncate(m.len());
                ctx.error(&m);
            }
        }
    } else if config_params(ctx)
        .iter()
        .any(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))
    {
        let mut m = b"ERR CONFIG SET failed (possibly related to argument '".to_vec();
        m.extend_from_slice(name);
        m.extend_from_slice(b"') - can't set immutable config");
        ctx.error(&m);
    } else {
        let mut m = b"ERR Unknown option or number of arguments for CONFIG SET - '".to_vec();
        m.extend_from_slice(&name[..name.len().min(128)]);
        m.push(b'\'');
        ctx.error(&m);
    }
}

/// CONFIG RESETSTAT: clears INFO stats and the latency probe.
fn config_resetstat(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    ctx.store.stats = Default::default();
    ctx.store.probe.reset();
    ctx.reply.ok();
}

fn config_help(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    help(
        ctx.reply,
        "CONFIG",
        &["GET <pattern>", "SET maxmemory <bytes>", "RESETSTAT"],
    );
}

const ADMIN: &[&str] = &["admin", "noscript", "loading", "stale"];
const ADMIN_ACL: &[&str] = &["@admin", "@slow", "@dangerous"];

pub static CONFIG_SUBS: &[Spec] = &[
    spec("config|get", -3, ADMIN, NOKEY, ADMIN_ACL, config_get),
    spec(
        "config|set",
        -4,
        &["admin", "noscript", "loading", "stale", "may_replicate"],
        NOKEY,
        ADMIN_ACL,
        config_set,
    ),
    spec(
        "config|resetstat",
        2,
        ADMIN,
        NOKEY,
        ADMIN_ACL,
        config_resetstat,
    ),
    spec(
        "config|help",
        2,
        &["loading", "stale"],
        NOKEY,
        &["@slow"],
        config_help,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::commands::test_util::cmd;
    use crate::kv::store::{Store, StoreConfig};

    #[test]
    fn config() {
        let mut s = Store::new(StoreConfig {
            maxmemory: 1000,
            ..StoreConfig::default()
        });
        assert_eq!(
            cmd!(s, "CONFIG", "GET", "save"),
            b"*2\r\n$4\r\nsave\r\n$0\r\n\r\n"
        );
        assert_eq!(
            cmd!(s, "config", "get", "appendonly"),
            b"*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n"
        );
        assert_eq!(cmd!(s, "CONFIG", "GET", "nosuch"), b"*0\r\n");
        assert_eq!(
            cmd!(s, "CONFIG", "GET", "MAXMEMORY"),
            b"*2\r\n$9\r\nmaxmemory\r\n$4\r\n1000\r\n"
        );
        assert!(cmd!(s, "CONFIG", "GET", "max*").starts_with(b"*6\r\n"));
        assert_eq!(cmd!(s, "CONFIG", "SET", "maxmemory", "2mb"), b"+OK\r\n");
        assert_eq!(s.maxmemory(), 2 * 1024 * 1024);
        assert_eq!(
            cmd!(s, "CONFIG", "SET", "foo", "1"),
            b"-ERR Unknown option or number of arguments for CONFIG SET - 'foo'\r\n"
        );
        assert_eq!(
            cmd!(s, "CONFIG", "SET", "port", "1"),
            b"-ERR CONFIG SET failed (possibly related to argument 'port') - can't set immutable config\r\n"
        );
        assert_eq!(parse_memory(b"1gb"), Some(1 << 30));
        assert_eq!(parse_memory(b"5k"), Some(5000));
        assert_eq!(parse_memory(b"5x"), None);
        assert_eq!(parse_memory(b""), None);
    }
}
