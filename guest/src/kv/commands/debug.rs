//! DEBUG POPULATE (bulk-load keys) and DEBUG SLEEP (busy-wait, to test
//! the latency probe).

use alloc::vec::Vec;

use super::{help, Ctx, NOT_INT_ERR, OOM_ERR};
use crate::kv::mem::AllocError;
use crate::kv::num::{fmt_u64, parse_i64};
use crate::kv::resp::Args;

/// Redis's `getPositiveLongFromObjectOrReply` (which accepts 0).
fn positive(ctx: &mut Ctx<'_, '_>, a: &[u8]) -> Option<u64> {
    match parse_i64(a) {
        None => {
            ctx.error(NOT_INT_ERR);
            None
        }
        Some(v) if v < 0 => {
            ctx.error(b"ERR value is out of range, must be positive");
            None
        }
        Some(v) => Some(v as u64),
    }
}

/// DEBUG POPULATE count [prefix] [size]: keys `prefix:N` (default "key")
/// with values `value:N`, zero-padded or truncated to `size` when given;
/// existing keys are left alone. DEBUG SLEEP seconds busy-waits (to test the
/// latency probe).
pub fn debug(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let sub = args.get(1);
    if sub.eq_ignore_ascii_case(b"populate") && (3..=5).contains(&args.len()) {
        let Some(count) = positive(ctx, args.get(2)) else {
            return;
        };
        let size = if args.len() == 5 {
            match positive(ctx, args.get(4)) {
                // Size 0 means "not given", as in Redis.
                Some(v) => Some(v as usize).filter(|&v| v > 0),
                None => return,
            }
        } else {
            None
        };
        let prefix = if args.len() >= 4 { args.get(3) } else { b"key" };
        populate(ctx, count, prefix, size);
    } else if sub.eq_ignore_ascii_case(b"sleep") && args.len() == 3 {
        let secs = core::str::from_utf8(args.get(2))
            .ok()
            .and_then(|s| s.parse::<f64>().ok());
        let Some(secs) = secs.filter(|s| s.is_finite() && *s >= 0.0) else {
            ctx.error(b"ERR value is not a valid float");
            return;
        };
        let ticks = (secs * 1e6 * ctx.clock.ticks_per_us() as f64) as u64;
        let start = ctx.clock.now_ticks();
        while ctx.clock.now_ticks().wrapping_sub(start) < ticks {
            core::hint::spin_loop();
        }
        ctx.reply.ok();
    } else if sub.eq_ignore_ascii_case(b"help") {
        help(
            ctx.reply,
            "DEBUG",
            &["POPULATE <count> [<prefix>] [<size>]", "SLEEP <seconds>"],
        );
    } else {
        let mut m = b"ERR unknown subcommand or wrong number of arguments for '".to_vec();
        m.extend_from_slice(&sub[..sub.len().min(128)]);
        m.extend_from_slice(b"'. Try DEBUG HELP.");
        ctx.error(&m);
    }
}

fn populate(ctx: &mut Ctx<'_, '_>, count: u64, prefix: &[u8], size: Option<usize>) {
    // Redis formats into a 128-byte C buffer: the prefix stops at a NUL and
    // the key is cut to 127 bytes.
    let prefix = match prefix.iter().position(|&c| c == 0) {
        Some(z) => &prefix[..z],
        None => prefix,
    };
    // Pre-size the table when empty; capped by what maxmemory could hold so
    // a silly count cannot reserve a huge directory.
    let cap = match ctx.store.maxmemory() {
        0 => usize::MAX,
        m => m / 64,
    };
    ctx.store
        .reserve(usize::try_from(count).unwrap_or(usize::MAX).min(cap));
    let mut key = Vec::with_capacity(128);
    let mut d = [0u8; 20];
    for j in 0..count {
        let digits = fmt_u64(j, &mut d);
        key.clear();
        key.extend_from_slice(prefix);
        key.push(b':');
        key.extend_from_slice(digits);
        key.truncate(127);
        let val_len = size.unwrap_or(6 + digits.len());
        let make = || -> Result<Vec<u8>, AllocError> {
            let mut v = Vec::new();
            v.try_reserve_exact(val_len).map_err(|_| AllocError)?;
            v.extend_from_slice(b"value:");
            v.extend_from_slice(digits);
            // Pad with zero bytes (sdsnewlen) or truncate to `size`.
            v.resize(val_len, 0);
            Ok(v)
        };
        if ctx.store.set_if_absent(&key, val_len, make).is_err() {
            ctx.error(OOM_ERR);
            return;
        }
    }
    ctx.reply.ok();
}

#[cfg(test)]
mod tests {
    use crate::kv::commands::test_util::{cmd, new_store};
    use crate::kv::store::{Store, StoreConfig};

    #[test]
    fn debug_populate() {
        let mut s = new_store();
        cmd!(s, "SET", "key:1", "keep");
        assert_eq!(cmd!(s, "DEBUG", "POPULATE", "3"), b"+OK\r\n");
        assert_eq!(cmd!(s, "DBSIZE"), b":3\r\n");
        assert_eq!(cmd!(s, "GET", "key:0"), b"$7\r\nvalue:0\r\n");
        assert_eq!(cmd!(s, "GET", "key:1"), b"$4\r\nkeep\r\n");
        assert_eq!(cmd!(s, "DEBUG", "populate", "2", "p", "10"), b"+OK\r\n");
        assert_eq!(cmd!(s, "GET", "p:1"), b"$10\r\nvalue:1\0\0\0\r\n");
        assert_eq!(cmd!(s, "DEBUG", "POPULATE", "1", "t", "3"), b"+OK\r\n");
        assert_eq!(cmd!(s, "GET", "t:0"), b"$3\r\nval\r\n");
        assert_eq!(cmd!(s, "DEBUG", "POPULATE", "1", "z", "0"), b"+OK\r\n");
        assert_eq!(cmd!(s, "GET", "z:0"), b"$7\r\nvalue:0\r\n");
        assert_eq!(
            cmd!(s, "DEBUG", "POPULATE", "-1"),
            b"-ERR value is out of range, must be positive\r\n"
        );
        assert_eq!(
            cmd!(s, "DEBUG", "POPULATE", "x"),
            b"-ERR value is not an integer or out of range\r\n"
        );
        assert_eq!(
            cmd!(s, "DEBUG", "NOPE"),
            b"-ERR unknown subcommand or wrong number of arguments for 'NOPE'. Try DEBUG HELP.\r\n"
        );
        let mut big = new_store();
        assert_eq!(cmd!(big, "DEBUG", "POPULATE", "100000"), b"+OK\r\n");
        assert_eq!(big.len(), 100_000);
        assert!(!big.dict().is_rehashing());
    }

    #[test]
    fn populate_stops_at_maxmemory() {
        let mut s = Store::new(StoreConfig {
            maxmemory: 4 * 1024 * 1024,
            ..StoreConfig::default()
        });
        assert_eq!(
            cmd!(s, "DEBUG", "POPULATE", "1000000000", "key", "100"),
            b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
        );
        assert!(s.len() > 1000);
        assert!(s.used_memory() <= s.maxmemory());
        assert_eq!(cmd!(s, "GET", "key:0").len(), 100 + 8);
    }

    #[test]
    fn debug_sleep_uses_clock() {
        let mut s = new_store();
        assert_eq!(cmd!(s, "DEBUG", "SLEEP", "0"), b"+OK\r\n");
        assert_eq!(
            cmd!(s, "DEBUG", "SLEEP", "x"),
            b"-ERR value is not a valid float\r\n"
        );
    }
}
