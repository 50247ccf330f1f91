//! CLIENT and its subcommands: ID, SETNAME/GETNAME, SETINFO, INFO/LIST
//! and the no-op NO-EVICT/NO-TOUCH clients send.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use super::{help, spec, Client, Ctx, Spec, NOKEY};
use crate::kv::resp::Args;

/// Client names and library info: printable ASCII without spaces.
fn valid_name(s: &[u8]) -> bool {
    s.iter().all(|&c| (b'!'..=b'~').contains(&c))
}

/// Validates and stores a client name; replies with the error if invalid.
pub(super) fn set_client_name(ctx: &mut Ctx<'_, '_>, name: &[u8]) -> bool {
    if !valid_name(name) {
        ctx.error(b"ERR Client names cannot contain spaces, newlines or special characters.");
        return false;
    }
    ctx.client.name = if name.is_empty() {
        None
    } else {
        Some(name.to_vec())
    };
    true
}

fn client_id(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    ctx.reply.int(ctx.client.id as i64);
}

fn client_setname(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    if set_client_name(ctx, args.get(2)) {
        ctx.reply.ok();
    }
}

fn client_getname(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    let name = ctx.client.name.as_deref();
    ctx.reply.opt_bulk(name);
}

/// CLIENT SETINFO LIB-NAME|LIB-VER value (sent by client libraries).
fn client_setinfo(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let (attr, val) = (args.get(2), args.get(3));
    let lib_name = attr.eq_ignore_ascii_case(b"lib-name");
    if !lib_name && !attr.eq_ignore_ascii_case(b"lib-ver") {
        let mut m = b"ERR Unrecognized option '".to_vec();
        m.extend_from_slice(&attr[..attr.len().min(128)]);
        m.push(b'\'');
        ctx.error(&m);
        return;
    }
    if !valid_name(val) {
        let mut m = attr.to_ascii_lowercase();
        m.splice(0..0, b"ERR ".iter().copied());
        m.extend_from_slice(b" cannot contain spaces, newlines or special characters.");
        ctx.error(&m);
        return;
    }
    let v = if val.is_empty() {
        None
    } else {
        Some(val.to_vec())
    };
    if lib_name {
        ctx.client.lib_name = v;
    } else {
        ctx.client.lib_ver = v;
    }
    ctx.reply.ok();
}

fn client_line(c: &Client) -> Vec<u8> {
    let mut s = String::new();
    let _ = write!(s, "id={} addr=vsock:0 laddr=vsock:0 fd=0 name=", c.id);
    let mut v = s.into_bytes();
    v.extend_from_slice(c.name.as_deref().unwrap_or_default());
    v.extend_from_slice(
        b" age=0 idle=0 flags=N db=0 sub=0 psub=0 ssub=0 multi=-1 cmd=client|info lib-name=",
    );
    v.extend_from_slice(c.lib_name.as_deref().unwrap_or_default());
    v.extend_from_slice(b" lib-ver=");
    v.extend_from_slice(c.lib_ver.as_deref().unwrap_or_default());
    v.push(b'\n');
    v
}

fn client_info(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    let line = client_line(ctx.client);
    ctx.reply.bulk(&line);
}

/// Options clients send that change nothing here (NO-EVICT, NO-TOUCH).
fn client_ok(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    ctx.reply.ok();
}

fn client_help(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    help(
        ctx.reply,
        "CLIENT",
        &[
            "ID",
            "GETNAME",
            "SETNAME <name>",
            "SETINFO <option> <value>",
            "INFO",
            "LIST",
        ],
    );
}

const CONN_FLAGS: &[&str] = &["noscript", "loading", "stale"];
const CONN_ACL: &[&str] = &["@slow", "@connection"];

pub static CLIENT_SUBS: &[Spec] = &[
    spec("client|id", 2, CONN_FLAGS, NOKEY, CONN_ACL, client_id),
    spec(
        "client|setname",
        3,
        CONN_FLAGS,
        NOKEY,
        CONN_ACL,
        client_setname,
    ),
    spec(
        "client|getname",
        2,
        CONN_FLAGS,
        NOKEY,
        CONN_ACL,
        client_getname,
    ),
    spec(
        "client|setinfo",
        4,
        CONN_FLAGS,
        NOKEY,
        CONN_ACL,
        client_setinfo,
    ),
    spec("client|info", 2, CONN_FLAGS, NOKEY, CONN_ACL, client_info),
    spec("client|list", -2, CONN_FLAGS, NOKEY, CONN_ACL, client_info),
    spec("client|no-evict", 3, CONN_FLAGS, NOKEY, CONN_ACL, client_ok),
    spec("client|no-touch", 3, CONN_FLAGS, NOKEY, CONN_ACL, client_ok),
    spec(
        "client|help",
        2,
        &["loading", "stale"],
        NOKEY,
        CONN_ACL,
        client_help,
    ),
];

#[cfg(test)]
mod tests {
    use crate::kv::commands::test_util::{new_store, run_client};
    use crate::kv::commands::Client;

    #[test]
    fn client_commands() {
        let mut s = new_store();
        let mut c = Client {
            id: 3,
            ..Client::default()
        };
        assert_eq!(run_client(&mut s, &mut c, &[b"CLIENT", b"ID"]), b":3\r\n");
        assert_eq!(
            run_client(&mut s, &mut c, &[b"CLIENT", b"GETNAME"]),
            b"$-1\r\n"
        );
        assert_eq!(
            run_client(&mut s, &mut c, &[b"CLIENT", b"SETNAME", b"bench"]),
            b"+OK\r\n"
        );
        assert_eq!(
            run_client(&mut s, &mut c, &[b"client", b"getname"]),
            b"$5\r\nbench\r\n"
        );
        assert_eq!(
            run_client(&mut s, &mut c, &[b"CLIENT", b"SETNAME", b"a b"]),
            b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
        );
        assert_eq!(
            run_client(
                &mut s,
                &mut c,
                &[b"CLIENT", b"SETINFO", b"LIB-NAME", b"redis-py"]
            ),
            b"+OK\r\n"
        );
        assert_eq!(
            run_client(
                &mut s,
                &mut c,
                &[b"CLIENT", b"SETINFO", b"lib-ver", b"5.0 x"]
            ),
            b"-ERR lib-ver cannot contain spaces, newlines or special characters.\r\n"
        );
        assert_eq!(
            run_client(&mut s, &mut c, &[b"CLIENT", b"SETINFO", b"foo", b"1"]),
            b"-ERR Unrecognized option 'foo'\r\n"
        );
        let info = run_client(&mut s, &mut c, &[b"CLIENT", b"INFO"]);
        assert!(info.windows(10).any(|w| w == b"name=bench"));
        assert!(info.windows(17).any(|w| w == b"lib-name=redis-py"));
        assert_eq!(
            run_client(&mut s, &mut c, &[b"CLIENT", b"SETNAME"]),
            b"-ERR wrong number of arguments for 'client|setname' command\r\n"
        );
    }
}
