//! Redis command semantics: the command table, dispatch and error wording.
//!
//! Dispatch mirrors Redis 7's `processCommand`: look the name up
//! case-insensitively, check arity (exact when positive, minimum when
//! negative), resolve subcommands of container commands, refuse
//! `denyoom` commands while over `maxmemory`, then run the handler.

mod keys;
mod server;
mod strings;

use alloc::vec::Vec;

use super::probe::Clock;
use super::resp::{Args, Reply};
use super::store::Store;

pub const SYNTAX_ERR: &[u8] = b"ERR syntax error";
pub const NOT_INT_ERR: &[u8] = b"ERR value is not an integer or out of range";
pub const OVERFLOW_ERR: &[u8] = b"ERR increment or decrement would overflow";
pub const OOM_ERR: &[u8] = b"OOM command not allowed when used memory > 'maxmemory'.";

/// Per-connection state that commands can see and change.
#[derive(Debug, Default, Clone)]
pub struct Client {
    pub id: u64,
    pub name: Option<Vec<u8>>,
    pub lib_name: Option<Vec<u8>>,
    pub lib_ver: Option<Vec<u8>>,
    /// Set by QUIT: close once the reply is flushed.
    pub close_after_reply: bool,
}

/// Everything a command handler works with.
pub struct Ctx<'a, 'r> {
    pub store: &'a mut Store,
    pub client: &'a mut Client,
    pub reply: &'a mut Reply<'r>,
    pub clock: &'a dyn Clock,
}

impl Ctx<'_, '_> {
    fn error(&mut self, msg: &[u8]) {
        self.store.stats.total_error_replies += 1;
        self.reply.error(msg);
    }
}

type Handler = fn(&mut Ctx<'_, '_>, Args<'_>);

/// One entry of the command table, also what COMMAND reports.
pub struct Spec {
    /// Lower case; subcommands as `container|sub`.
    pub name: &'static str,
    pub arity: i32,
    pub flags: &'static [&'static str],
    pub first_key: i32,
    pub last_key: i32,
    pub step: i32,
    pub acl: &'static [&'static str],
    pub subcommands: &'static [Spec],
    handler: Handler,
}

impl Spec {
    /// The name as typed after the `|` for subcommands.
    fn short_name(&self) -> &'static str {
        match self.name.split_once('|') {
            Some((_, sub)) => sub,
            None => self.name,
        }
    }

    fn denies_oom(&self) -> bool {
        self.flags.contains(&"denyoom")
    }
}

const fn spec(
    name: &'static str,
    arity: i32,
    flags: &'static [&'static str],
    keys: (i32, i32, i32),
    acl: &'static [&'static str],
    handler: Handler,
) -> Spec {
    Spec {
        name,
        arity,
        flags,
        first_key: keys.0,
        last_key: keys.1,
        step: keys.2,
        acl,
        subcommands: &[],
        handler,
    }
}

/// A command with subcommands; `handler` runs only when none is given
/// (possible only with arity -1, like COMMAND).
const fn container(
    name: &'static str,
    arity: i32,
    flags: &'static [&'static str],
    acl: &'static [&'static str],
    subs: &'static [Spec],
    handler: Handler,
) -> Spec {
    Spec {
        name,
        arity,
        flags,
        first_key: 0,
        last_key: 0,
        step: 0,
        acl,
        subcommands: subs,
        handler,
    }
}

const NOKEY: (i32, i32, i32) = (0, 0, 0);
const KEY1: (i32, i32, i32) = (1, 1, 1);
const KEYS_ALL: (i32, i32, i32) = (1, -1, 1);

/// The command table. Flags, key positions and ACL categories are Redis 7.0's.
pub static COMMANDS: &[Spec] = &[
    spec(
        "get",
        2,
        &["readonly", "fast"],
        KEY1,
        &["@read", "@string", "@fast"],
        strings::get,
    ),
    spec(
        "set",
        -3,
        &["write", "denyoom"],
        KEY1,
        &["@write", "@string", "@slow"],
        strings::set,
    ),
    spec(
        "setnx",
        3,
        &["write", "denyoom", "fast"],
        KEY1,
        &["@write", "@string", "@fast"],
        strings::setnx,
    ),
    spec(
        "getdel",
        2,
        &["write", "fast"],
        KEY1,
        &["@write", "@string", "@fast"],
        strings::getdel,
    ),
    spec(
        "mget",
        -2,
        &["readonly", "fast"],
        KEYS_ALL,
        &["@read", "@string", "@fast"],
        strings::mget,
    ),
    spec(
        "mset",
        -3,
        &["write", "denyoom"],
        (1, -1, 2),
        &["@write", "@string", "@slow"],
        strings::mset,
    ),
    spec(
        "incr",
        2,
        &["write", "denyoom", "fast"],
        KEY1,
        &["@write", "@string", "@fast"],
        strings::incr,
    ),
    spec(
        "decr",
        2,
        &["write", "denyoom", "fast"],
        KEY1,
        &["@write", "@string", "@fast"],
        strings::decr,
    ),
    spec(
        "incrby",
        3,
        &["write", "denyoom", "fast"],
        KEY1,
        &["@write", "@string", "@fast"],
        strings::incrby,
    ),
    spec(
        "decrby",
        3,
        &["write", "denyoom", "fast"],
        KEY1,
        &["@write", "@string", "@fast"],
        strings::decrby,
    ),
    spec(
        "append",
        3,
        &["write", "denyoom"],
        KEY1,
        &["@write", "@string", "@fast"],
        strings::append,
    ),
    spec(
        "strlen",
        2,
        &["readonly", "fast"],
        KEY1,
        &["@read", "@string", "@fast"],
        strings::strlen,
    ),
    spec(
        "del",
        -2,
        &["write"],
        KEYS_ALL,
        &["@keyspace", "@write", "@slow"],
        keys::del,
    ),
    spec(
        "unlink",
        -2,
        &["write", "fast"],
        KEYS_ALL,
        &["@keyspace", "@write", "@fast"],
        keys::del,
    ),
    spec(
        "exists",
        -2,
        &["readonly", "fast"],
        KEYS_ALL,
        &["@keyspace", "@read", "@fast"],
        keys::exists,
    ),
    spec(
        "type",
        2,
        &["readonly", "fast"],
        KEY1,
        &["@keyspace", "@read", "@fast"],
        keys::type_,
    ),
    spec(
        "ttl",
        2,
        &["readonly", "fast"],
        KEY1,
        &["@keyspace", "@read", "@fast"],
        keys::ttl,
    ),
    spec(
        "pttl",
        2,
        &["readonly", "fast"],
        KEY1,
        &["@keyspace", "@read", "@fast"],
        keys::ttl,
    ),
    spec(
        "dbsize",
        1,
        &["readonly", "fast"],
        NOKEY,
        &["@keyspace", "@read", "@fast"],
        keys::dbsize,
    ),
    spec(
        "keys",
        2,
        &["readonly"],
        NOKEY,
        &["@keyspace", "@read", "@slow", "@dangerous"],
        keys::keys,
    ),
    spec(
        "scan",
        -2,
        &["readonly"],
        NOKEY,
        &["@keyspace", "@read", "@slow"],
        keys::scan,
    ),
    spec(
        "flushall",
        -1,
        &["write"],
        NOKEY,
        &["@keyspace", "@write", "@slow", "@dangerous"],
        keys::flushall,
    ),
    spec(
        "flushdb",
        -1,
        &["write"],
        NOKEY,
        &["@keyspace", "@write", "@slow", "@dangerous"],
        keys::flushall,
    ),
    spec(
        "select",
        2,
        &["loading", "stale", "fast"],
        NOKEY,
        &["@keyspace", "@fast"],
        keys::select,
    ),
    spec(
        "ping",
        -1,
        &["fast"],
        NOKEY,
        &["@fast", "@connection"],
        server::ping,
    ),
    spec(
        "echo",
        2,
        &["fast"],
        NOKEY,
        &["@fast", "@connection"],
        server::echo,
    ),
    spec(
        "quit",
        -1,
        &[
            "allow_busy",
            "noscript",
            "loading",
            "stale",
            "fast",
            "no_auth",
        ],
        NOKEY,
        &["@fast", "@connection"],
        server::quit,
    ),
    spec(
        "hello",
        -1,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        NOKEY,
        &["@fast", "@connection"],
        server::hello,
    ),
    spec(
        "info",
        -1,
        &["loading", "stale"],
        NOKEY,
        &["@slow", "@dangerous"],
        server::info,
    ),
    spec(
        "debug",
        -2,
        &["admin", "noscript", "loading", "stale"],
        NOKEY,
        &["@admin", "@slow", "@dangerous"],
        server::debug,
    ),
    container(
        "command",
        -1,
        &["loading", "stale"],
        &["@slow", "@connection"],
        server::COMMAND_SUBS,
        server::command_bare,
    ),
    container(
        "config",
        -2,
        &[],
        &["@slow"],
        server::CONFIG_SUBS,
        server::container_without_sub,
    ),
    container(
        "client",
        -2,
        &[],
        &["@slow"],
        server::CLIENT_SUBS,
        server::container_without_sub,
    ),
    container(
        "probe",
        -2,
        &["fast"],
        &["@slow"],
        server::PROBE_SUBS,
        server::container_without_sub,
    ),
];

/// Finds a command (or subcommand in `table`) by name, ignoring case.
fn lookup<'t>(table: &'t [Spec], name: &[u8]) -> Option<&'t Spec> {
    table.iter().find(|s| {
        s.short_name().len() == name.len() && s.short_name().as_bytes().eq_ignore_ascii_case(name)
    })
}

fn arity_ok(arity: i32, argc: usize) -> bool {
    let argc = argc as i64;
    let arity = i64::from(arity);
    if arity >= 0 {
        argc == arity
    } else {
        argc >= -arity
    }
}

/// Appends `'arg' ` for each argument after the first, up to 128 bytes in
/// all, as Redis builds "with args beginning with:".
fn args_preview(args: &Args<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    for a in args.iter().skip(1) {
        let used = out.len() - start;
        if used >= 128 {
            break;
        }
        out.push(b'\'');
        out.extend_from_slice(&a[..a.len().min(128 - used)]);
        out.extend_from_slice(b"' ");
    }
}

fn truncated(b: &[u8]) -> &[u8] {
    &b[..b.len().min(128)]
}

/// Replies `ERR wrong number of arguments for '<name>' command`.
pub fn wrong_args(ctx: &mut Ctx<'_, '_>, name: &str) {
    let mut m = b"ERR wrong number of arguments for '".to_vec();
    m.extend_from_slice(name.as_bytes());
    m.extend_from_slice(b"' command");
    ctx.error(&m);
}

/// Runs one command (`args` non-empty) and writes its reply.
pub fn execute(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    if ctx.store.start_ticks.is_none() {
        ctx.store.start_ticks = Some(ctx.clock.now_ticks());
    }
    let name = args.get(0);
    let Some(mut cmd) = lookup(COMMANDS, name) else {
        let mut m = b"ERR unknown command '".to_vec();
        m.extend_from_slice(truncated(name));
        m.extend_from_slice(b"', with args beginning with: ");
        args_preview(&args, &mut m);
        ctx.error(&m);
        return;
    };
    if !arity_ok(cmd.arity, args.len()) {
        wrong_args(ctx, cmd.name);
        return;
    }
    if !cmd.subcommands.is_empty() && args.len() >= 2 {
        let sub = args.get(1);
        match lookup(cmd.subcommands, sub) {
            Some(s) => cmd = s,
            None => {
                let mut m = b"ERR unknown subcommand '".to_vec();
                m.extend_from_slice(truncated(sub));
                m.extend_from_slice(b"'. Try ");
                m.extend(name.iter().map(u8::to_ascii_uppercase));
                m.extend_from_slice(b" HELP.");
                ctx.error(&m);
                return;
            }
        }
        if !arity_ok(cmd.arity, args.len()) {
            wrong_args(ctx, cmd.name);
            return;
        }
    }
    if cmd.denies_oom() && ctx.store.over_maxmemory() {
        ctx.store.stats.rejected_oom += 1;
        ctx.error(OOM_ERR);
        return;
    }
    ctx.store.stats.total_commands_processed += 1;
    (cmd.handler)(ctx, args);
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use crate::kv::probe::ManualClock;
    use crate::kv::store::StoreConfig;

    /// Runs one command given as separate arguments; returns the reply bytes.
    pub fn run(store: &mut Store, argv: &[&[u8]]) -> Vec<u8> {
        run_client(store, &mut Client::default(), argv)
    }

    pub fn run_client(store: &mut Store, client: &mut Client, argv: &[&[u8]]) -> Vec<u8> {
        let mut base = Vec::new();
        let mut ranges = Vec::new();
        for a in argv {
            ranges.push((base.len(), base.len() + a.len()));
            base.extend_from_slice(a);
        }
        let mut out = Vec::new();
        let mut reply = Reply::new(&mut out);
        let clock = ManualClock::new(1000);
        let mut ctx = Ctx {
            store,
            client,
            reply: &mut reply,
            clock: &clock,
        };
        execute(&mut ctx, Args::new(&base, &ranges));
        out
    }

    pub fn new_store() -> Store {
        Store::new(StoreConfig::default())
    }

    /// `cmd!(store, "SET", "k", "v")` runs a command, returning reply bytes.
    macro_rules! cmd {
        ($s:expr, $($a:expr),+) => {
            crate::kv::commands::test_util::run(&mut $s, &[$(AsRef::<[u8]>::as_ref($a)),+])
        };
    }
    pub(crate) use cmd;
}

#[cfg(test)]
mod tests {
    use super::test_util::{cmd, new_store};

    #[test]
    fn unknown_command() {
        let mut s = new_store();
        assert_eq!(
            cmd!(s, "foo", "a", "b"),
            b"-ERR unknown command 'foo', with args beginning with: 'a' 'b' \r\n"
        );
        assert_eq!(
            cmd!(s, "foo"),
            b"-ERR unknown command 'foo', with args beginning with: \r\n"
        );
        assert_eq!(
            cmd!(s, "x\r\ny"),
            b"-ERR unknown command 'x  y', with args beginning with: \r\n"
        );
        let long = alloc::vec![b'a'; 300];
        let out = cmd!(s, "foo", &long, "b");
        let mut want = b"-ERR unknown command 'foo', with args beginning with: '".to_vec();
        want.extend_from_slice(&[b'a'; 128]);
        want.extend_from_slice(b"' \r\n");
        assert_eq!(out, want);
    }

    #[test]
    fn arity_and_case() {
        let mut s = new_store();
        assert_eq!(
            cmd!(s, "get"),
            b"-ERR wrong number of arguments for 'get' command\r\n"
        );
        assert_eq!(
            cmd!(s, "GeT", "a", "b"),
            b"-ERR wrong number of arguments for 'get' command\r\n"
        );
        assert_eq!(
            cmd!(s, "set", "a"),
            b"-ERR wrong number of arguments for 'set' command\r\n"
        );
        assert_eq!(cmd!(s, "SET", "a", "b"), b"+OK\r\n");
        assert_eq!(
            cmd!(s, "config"),
            b"-ERR wrong number of arguments for 'config' command\r\n"
        );
        assert_eq!(
            cmd!(s, "config", "get"),
            b"-ERR wrong number of arguments for 'config|get' command\r\n"
        );
        assert_eq!(
            cmd!(s, "config", "bogus"),
            b"-ERR unknown subcommand 'bogus'. Try CONFIG HELP.\r\n"
        );
        assert_eq!(s.stats.total_commands_processed, 1);
        assert_eq!(s.stats.total_error_replies, 6);
    }

    #[test]
    fn denyoom_when_over_limit() {
        let mut s = new_store();
        cmd!(s, "set", "a", "b");
        s.set_maxmemory(1);
        assert_eq!(
            cmd!(s, "set", "x", "y"),
            b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
        );
        assert_eq!(cmd!(s, "get", "a"), b"$1\r\nb\r\n");
        assert_eq!(cmd!(s, "del", "a"), b":1\r\n");
    }
}
