//! Connection and server commands: PING, ECHO, QUIT, HELLO, INFO, DEBUG,
//! COMMAND, CONFIG, CLIENT and the custom PROBE.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use super::{
    spec, wrong_args, Client, Ctx, Spec, COMMANDS, NOKEY, NOT_INT_ERR, OOM_ERR, SYNTAX_ERR,
};
use crate::kv::glob;
use crate::kv::mem::AllocError;
use crate::kv::num::{fmt_u64, parse_i64};
use crate::kv::resp::{Args, Reply};

pub const REDIS_VERSION: &str = "7.0.0";

pub fn container_without_sub(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    // Unreachable through `execute` (arity -2 guarantees a subcommand), kept
    // so every table entry has a handler.
    ctx.error(SYNTAX_ERR);
}

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

/// Client names and library info: printable ASCII without spaces.
fn valid_name(s: &[u8]) -> bool {
    s.iter().all(|&c| (b'!'..=b'~').contains(&c))
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

// ---- INFO ------------------------------------------------------------------

const SECTIONS: [&str; 6] = [
    "server", "clients", "memory", "stats", "keyspace", "latency",
];

/// Redis's `bytesToHuman`.
fn human(out: &mut String, n: usize) {
    let units = [
        (1u64 << 50, 'P'),
        (1 << 40, 'T'),
        (1 << 30, 'G'),
        (1 << 20, 'M'),
        (1 << 10, 'K'),
    ];
    let n = n as u64;
    for (size, u) in units {
        if n >= size {
            let _ = write!(out, "{:.2}{}", n as f64 / size as f64, u);
            return;
        }
    }
    let _ = write!(out, "{n}B");
}

fn write_section(ctx: &Ctx<'_, '_>, name: &str, out: &mut String) {
    let s = &*ctx.store;
    match name {
        "server" => {
            let tpus = ctx.clock.ticks_per_us().max(1);
            let start = s.start_ticks.unwrap_or(0);
            let up = ctx.clock.now_ticks().saturating_sub(start) / tpus / 1_000_000;
            let _ = write!(
                out,
                "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_git_sha1:00000000\r\nredis_git_dirty:0\r\n\
                 redis_build_id:0\r\nredis_mode:standalone\r\nos:snapvm-guest\r\narch_bits:64\r\n\
                 multiplexing_api:poll\r\nprocess_id:1\r\nrun_id:0000000000000000000000000000000000000000\r\n\
                 tcp_port:6379\r\nuptime_in_seconds:{up}\r\nuptime_in_days:{}\r\nexecutable:/snapvm-guest\r\n\
                 config_file:\r\n",
                up / 86400
            );
        }
        "clients" => {
            let _ = write!(
                out,
                "# Clients\r\nconnected_clients:{}\r\nblocked_clients:0\r\ntracking_clients:0\r\nmaxclients:10000\r\n",
                s.connected_clients()
            );
        }
        "memory" => {
            let _ = write!(
                out,
                "# Memory\r\nused_memory:{}\r\nused_memory_human:",
                s.used_memory()
            );
            human(out, s.used_memory());
            let _ = write!(
                out,
                "\r\nused_memory_peak:{}\r\nused_memory_peak_human:",
                s.peak_memory()
            );
            human(out, s.peak_memory());
            let _ = write!(out, "\r\nmaxmemory:{}\r\nmaxmemory_human:", s.maxmemory());
            human(out, s.maxmemory());
            let _ = write!(
                out,
                "\r\nmaxmemory_policy:noeviction\r\nmem_allocator:snapvm\r\nlazyfree_pending_objects:{}\r\n",
                s.lazyfree_pending_objects()
            );
        }
        "stats" => {
            let st = &s.stats;
            let _ = write!(
                out,
                "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\n\
                 instantaneous_ops_per_sec:0\r\ntotal_net_input_bytes:{}\r\ntotal_net_output_bytes:{}\r\n\
                 rejected_connections:0\r\nexpired_keys:0\r\nevicted_keys:0\r\nkeyspace_hits:{}\r\n\
                 keyspace_misses:{}\r\ntotal_error_replies:{}\r\nrejected_oom_writes:{}\r\n",
                st.total_connections_received,
                st.total_commands_processed,
                st.total_net_input_bytes,
                st.total_net_output_bytes,
                st.keyspace_hits,
                st.keyspace_misses,
                st.total_error_replies,
                st.rejected_oom
            );
        }
        "keyspace" => {
            out.push_str("# Keyspace\r\n");
            if !s.is_empty() {
                let _ = write!(out, "db0:keys={},expires=0,avg_ttl=0\r\n", s.len());
            }
        }
        "latency" => {
            out.push_str("# Latency\r\n");
            let _ = s.probe.write_info(out, ctx.clock.ticks_per_us());
        }
        _ => {}
    }
}

/// INFO [section ...]: "default", "all" and "everything" mean every section.
pub fn info(ctx: &mut Ctx<'_, '_>, args: Args<'_>) {
    let mut wanted = [args.len() == 1; SECTIONS.len()];
    for a in args.iter().skip(1) {
        if a.eq_ignore_ascii_case(b"all")
            || a.eq_ignore_ascii_case(b"default")
            || a.eq_ignore_ascii_case(b"everything")
        {
            wanted = [true; SECTIONS.len()];
        }
        for (i, s) in SECTIONS.iter().enumerate() {
            if a.eq_ignore_ascii_case(s.as_bytes()) {
                wanted[i] = true;
            }
        }
    }
    let mut out = String::new();
    for (i, s) in SECTIONS.iter().enumerate() {
        if wanted[i] {
            if !out.is_empty() {
                out.push_str("\r\n");
            }
            write_section(ctx, s, &mut out);
        }
    }
    ctx.reply.bulk(out.as_bytes());
}

// ---- DEBUG -----------------------------------------------------------------

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

// ---- COMMAND ---------------------------------------------------------------

fn help(r: &mut Reply<'_>, cmd: &str, lines: &[&str]) {
    r.array(lines.len() + 1);
    let mut head = String::from(cmd);
    head.push_str(" <subcommand> [<arg> [value] [opt] ...]. Subcommands are:");
    r.simple(head.as_bytes());
    for l in lines {
        r.simple(l.as_bytes());
    }
}

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

// ---- CONFIG ----------------------------------------------------------------

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

// ---- CLIENT ----------------------------------------------------------------

/// Validates and stores a client name; replies with the error if invalid.
fn set_client_name(ctx: &mut Ctx<'_, '_>, name: &[u8]) -> bool {
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

// ---- PROBE -----------------------------------------------------------------

/// PROBE RESET: clears the latency probe (custom to snapvm).
fn probe_reset(ctx: &mut Ctx<'_, '_>, _args: Args<'_>) {
    ctx.store.probe.reset();
    ctx.reply.ok();
}

pub static PROBE_SUBS: &[Spec] = &[spec(
    "probe|reset",
    2,
    &["fast"],
    NOKEY,
    &["@slow"],
    probe_reset,
)];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::commands::test_util::{cmd, new_store, run_client};
    use crate::kv::store::{Store, StoreConfig};

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

    fn bulk_text(out: &[u8]) -> String {
        let body_start = out.iter().position(|&c| c == b'\n').unwrap() + 1;
        String::from_utf8(out[body_start..out.len() - 2].to_vec()).unwrap()
    }

    #[test]
    fn info_sections() {
        let mut s = new_store();
        let out = cmd!(s, "INFO", "keyspace");
        assert_eq!(out, b"$12\r\n# Keyspace\r\n\r\n");
        cmd!(s, "SET", "a", "1");
        cmd!(s, "SET", "b", "1");
        assert_eq!(
            bulk_text(&cmd!(s, "INFO", "KEYSPACE")),
            "# Keyspace\r\ndb0:keys=2,expires=0,avg_ttl=0\r\n"
        );
        let all = bulk_text(&cmd!(s, "INFO"));
        assert!(all.starts_with("# Server\r\nredis_version:7.0.0\r\n"));
        for h in [
            "\r\n\r\n# Clients\r\n",
            "\r\n\r\n# Memory\r\nused_memory:",
            "# Stats\r\n",
            "# Latency\r\n",
        ] {
            assert!(all.contains(h), "{h}");
        }
        assert!(all.contains("total_commands_processed:5\r\n"), "{all}");
        assert!(all.contains("maxmemory_policy:noeviction\r\n"));
        assert_eq!(cmd!(s, "INFO", "nosuch"), b"$0\r\n\r\n");
        let two = bulk_text(&cmd!(s, "INFO", "clients", "stats"));
        assert!(two.starts_with("# Clients\r\n") && two.contains("\r\n\r\n# Stats\r\n"));
    }

    #[test]
    fn info_latency_and_reset() {
        let mut s = new_store();
        s.probe.record_cmd(5000);
        s.probe.record_loop_gap(100_000);
        let text = bulk_text(&cmd!(s, "INFO", "latency"));
        assert!(
            text.starts_with("# Latency\r\nprobe_max_loop_gap_us:100.000\r\n"),
            "{text}"
        );
        assert!(text.contains("probe_cmd_count:1\r\n"));
        assert!(text.contains("probe_cmd_max_us:5.000\r\n"));
        for k in [
            "probe_cmd_p50_us:",
            "probe_cmd_p99_us:",
            "probe_cmd_p999_us:",
        ] {
            assert!(text.contains(k));
        }
        assert_eq!(cmd!(s, "PROBE", "RESET"), b"+OK\r\n");
        assert!(bulk_text(&cmd!(s, "INFO", "latency")).contains("probe_cmd_count:0\r\n"));
        s.probe.record_cmd(1);
        assert_eq!(cmd!(s, "CONFIG", "RESETSTAT"), b"+OK\r\n");
        assert_eq!(s.probe.commands().count(), 0);
        assert_eq!(s.stats.total_commands_processed, 0);
        assert_eq!(
            cmd!(s, "PROBE", "x"),
            b"-ERR unknown subcommand 'x'. Try PROBE HELP.\r\n"
        );
    }

    #[test]
    fn human_sizes() {
        let mut h = String::new();
        human(&mut h, 1000);
        h.push(' ');
        human(&mut h, 1024 * 1024 * 3 / 2);
        h.push(' ');
        human(&mut h, 1 << 30);
        assert_eq!(h, "1000B 1.50M 1.00G");
    }

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
