//! Redis command semantics: the command table, dispatch and error wording.
//!
//! Dispatch mirrors Redis 7's `processCommand`: look the name up
//! case-insensitively, check arity (exact when positive, minimum when
//! negative), resolve subcommands of container commands, refuse
//! `denyoom` commands while over `maxmemory`, then run the handler.
//!
//! This file holds the dispatch and what handlers share; `table.rs` the
//! command table; one file per command group: `strings.rs`, `keys.rs`,
//! `connection.rs` (PING, ECHO, QUIT, HELLO), `client.rs` (CLIENT),
//! `info.rs` (INFO, PROBE), `config.rs` (CONFIG), `debug.rs` (DEBUG) and
//! `introspection.rs` (COMMAND); `test_util.rs` and `tests.rs` for tests.

mod client;
mod config;
mod connection;
mod debug;
mod info;
mod introspection;
mod keys;
mod strings;
mod table;

use alloc::string::String;
use alloc::vec::Vec;

use super::probe::Clock;
use super::resp::{Args, Reply};
use super::store::Store;

pub use table::COMMANDS;

/// The Redis version this server answers as (HELLO, INFO).
pub const REDIS_VERSION: &str = "7.0.0";

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

pub fn container_without_sub(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    // Unreachable through `execute` (arity -2 guarantees a subcommand), kept
    // so every table entry has a handler.
    ctx.error(SYNTAX_ERR);
}

fn help(r: &mut Reply<'_>, cmd: &str, lines: &[&str]) {
    r.array(lines.len() + 1);
    let mut head = String::from(cmd);
    head.push_str(" <subcommand> [<arg> [value] [opt] ...]. Subcommands are:");
    r.simple(head.as_bytes());
    for l in lines {
        r.simple(l.as_bytes());
    }
}

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
pub(crate) mod test_util;

#[cfg(test)]
mod tests;
