//! COMMAND and its subcommands (COUNT, DOCS, INFO, LIST): the command
//! table as clients ask for it, in Redis 7's shape.

use super::{help, spec, Ctx, Spec, COMMANDS, NOKEY};
use crate::kv::resp::{Args, Reply};

/// One COMMAND entry in Redis 7's 10-element shape.
fn write_spec(r: &mut Reply<'_>, s: &Spec) {
    r.array(10);
    r.bulk(s.name.as_bytes());
    r.int(i64::from(s.arity));
    r.array(s.flags.len());
    for f in s.flags {
        r.simple(f.as_bytes());
    }
    r.int(i64::from(s.first_key));
    r.int(i64::from(s.last_key));
    r.int(i64::from(s.step));
    r.array(s.acl.len());
    for a in s.acl {
        r.simple(a.as_bytes());
    }
    r.array(0); // tips
    r.array(0); // key specs
    r.array(s.subcommands.len());
    for sub in s.subcommands {
        write_spec(r, sub);
    }
}

fn find_spec(name: &[u8]) -> Option<&'static Spec> {
    COMMANDS
        .iter()
        .find(|s| s.name.as_bytes().eq_ignore_ascii_case(name))
}

fn command_list(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    ctx.reply.array(COMMANDS.len());
    for s in COMMANDS {
        write_spec(ctx.reply, s);
    }
}

fn command_count(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    ctx.reply.int(COMMANDS.len() as i64);
}

fn command_info(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    if args.len() == 2 {
        return command_list(ctx, args);
    }
    ctx.reply.array(args.len() - 2);
    for name in args.iter().skip(2) {
        match find_spec(name) {
            Some(s) => write_spec(ctx.reply, s),
            None => ctx.reply.null_array(),
        }
    }
}

/// COMMAND DOCS: an empty map (clients fall back to their built-in docs).
fn command_docs(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    ctx.reply.array(0);
}

fn command_names(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    ctx.reply.array(COMMANDS.len());
    for s in COMMANDS {
        ctx.reply.bulk(s.name.as_bytes());
    }
}

fn command_help(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    help(
        ctx.reply,
        "COMMAND",
        &[
            "COUNT",
            "DOCS [<command-name> ...]",
            "INFO [<command-name> ...]",
            "LIST",
        ],
    );
}

/// COMMAND with no subcommand is the full table; the container entry only
/// handles subcommands, so `execute` routes a bare COMMAND here.
pub fn command_bare(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    command_list(ctx, args);
}

const CMD_FLAGS: &[&str] = &["loading", "stale"];
const SLOW_CONN: &[&str] = &["@slow", "@connection"];

pub static COMMAND_SUBS: &[Spec] = &[
    spec(
        "command|count",
        2,
        CMD_FLAGS,
        NOKEY,
        SLOW_CONN,
        command_count,
    ),
    spec(
        "command|docs",
        -2,
        CMD_FLAGS,
        NOKEY,
        SLOW_CONN,
        command_docs,
    ),
    spec(
        "command|info",
        -2,
        CMD_FLAGS,
        NOKEY,
        SLOW_CONN,
        command_info,
    ),
    spec(
        "command|list",
        -2,
        CMD_FLAGS,
        NOKEY,
        SLOW_CONN,
        command_names,
    ),
    spec("command|help", 2, CMD_FLAGS, NOKEY, SLOW_CONN, command_help),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::commands::test_util::{cmd, new_store};

    #[test]
    fn command_introspection() {
        let mut s = new_store();
        let n = COMMANDS.len();
        let mut want = b":".to_vec();
        want.extend_from_slice(alloc::format!("{n}\r\n").as_bytes());
        assert_eq!(cmd!(s, "COMMAND", "COUNT"), want);
        assert_eq!(cmd!(s, "COMMAND", "DOCS"), b"*0\r\n");
        assert_eq!(cmd!(s, "COMMAND", "DOCS", "get"), b"*0\r\n");
        assert_eq!(
            cmd!(s, "COMMAND", "INFO", "get", "nosuch"),
            b"*2\r\n*10\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n:1\r\n:1\r\n:1\r\n\
              *3\r\n+@read\r\n+@string\r\n+@fast\r\n*0\r\n*0\r\n*0\r\n*-1\r\n"
        );
        let all = cmd!(s, "COMMAND");
        let mut head = b"*".to_vec();
        head.extend_from_slice(alloc::format!("{n}\r\n").as_bytes());
        assert!(all.starts_with(&head));
        // The reply must be well-formed RESP: parse it back.
        assert!(crate::kv::conn::tests::resp_value_len(&all) == Some(all.len()));
    }
}
