//! Connection commands: PING, ECHO, QUIT and HELLO (which may also name
//! the client, as CLIENT SETNAME does).

use super::client::set_client_name;
use super::{wrong_args, Ctx, REDIS_VERSION};
use crate::kv::num::parse_i64;
use crate::kv::resp::Args;

pub fn ping(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    match args.len() {
        1 => ctx.reply.simple(b"PONG"),
        2 => ctx.reply.bulk(args.get(1)),
        _ => wrong_args(ctx, "ping"),
    }
}

pub fn echo(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    ctx.reply.bulk(args.get(1));
}

pub fn quit(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    ctx.reply.ok();
    ctx.client.close_after_reply = true;
}

/// HELLO [protover [AUTH username password] [SETNAME clientname]]. Only
/// RESP2 is spoken, so HELLO 3 is refused and clients fall back.
pub fn hello(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    if args.len() >= 2 {
        match parse_i64(args.get(1)) {
            None => {
                ctx.error(b"ERR Protocol version is not an integer or out of range");
                return;
            }
            Some(2) => {}
            Some(_) => {
                ctx.error(b"NOPROTO sorry, this protocol version is not supported.");
                return;
            }
        }
    }
    let mut setname = None;
    let mut i = 2;
    while i < args.len() {
        let opt = args.get(i);
        let left = args.len() - i - 1;
        if opt.eq_ignore_ascii_case(b"auth") && left >= 2 {
            // No ACLs: the default user has no password, so any AUTH passes.
            i += 3;
        } else if opt.eq_ignore_ascii_case(b"setname") && left >= 1 {
            setname = Some(args.get(i + 1));
            i += 2;
        } else {
            let mut m = b"ERR Syntax error in HELLO option '".to_vec();
            m.extend_from_slice(&opt[..opt.len().min(128)]);
            m.push(b'\'');
            ctx.error(&m);
            return;
        }
    }
    if let Some(name) = setname {
        if !set_client_name(ctx, name) {
            return;
        }
    }
    let r = &mut *ctx.reply;
    r.array(14);
    r.bulk(b"server");
    r.bulk(b"redis");
    r.bulk(b"version");
    r.bulk(REDIS_VERSION.as_bytes());
    r.bulk(b"proto");
    r.int(2);
    r.bulk(b"id");
    r.int(ctx.client.id as i64);
    r.bulk(b"mode");
    r.bulk(b"standalone");
    r.bulk(b"role");
    r.bulk(b"master");
    r.bulk(b"modules");
    r.array(0);
}

#[cfg(test)]
mod tests {
    use crate::kv::commands::test_util::{cmd, new_store, run_client};
    use crate::kv::commands::Client;

    #[test]
    fn ping_echo_quit() {
        let mut s = new_store();
        assert_eq!(cmd!(s, "PING"), b"+PONG\r\n");
        assert_eq!(cmd!(s, "ping", "hi"), b"$2\r\nhi\r\n");
        assert_eq!(
            cmd!(s, "PING", "a", "b"),
            b"-ERR wrong number of arguments for 'ping' command\r\n"
        );
        assert_eq!(cmd!(s, "ECHO", "x y"), b"$3\r\nx y\r\n");
        let mut c = Client::default();
        assert_eq!(run_client(&mut s, &mut c, &[b"QUIT"]), b"+OK\r\n");
        assert!(c.close_after_reply);
    }

    #[test]
    fn hello() {
        let mut s = new_store();
        let mut c = Client {
            id: 7,
            ..Client::default()
        };
        assert_eq!(
            run_client(&mut s, &mut c, &[b"HELLO", b"2", b"SETNAME", b"me"]),
            b"*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.0.0\r\n$5\r\nproto\r\n:2\r\n\
              $2\r\nid\r\n:7\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n\
              $7\r\nmodules\r\n*0\r\n"
        );
        assert_eq!(c.name.as_deref(), Some(&b"me"[..]));
        assert_eq!(
            cmd!(s, "HELLO", "3"),
            b"-NOPROTO sorry, this protocol version is not supported.\r\n"
        );
        assert_eq!(
            cmd!(s, "HELLO", "x"),
            b"-ERR Protocol version is not an integer or out of range\r\n"
        );
        assert_eq!(
            cmd!(s, "HELLO", "2", "FOO"),
            b"-ERR Syntax error in HELLO option 'FOO'\r\n"
        );
        assert!(cmd!(s, "HELLO", "2", "AUTH", "default", "pw").starts_with(b"*14\r\n"));
        assert!(cmd!(s, "HELLO").starts_with(b"*14\r\n"));
    }
}
