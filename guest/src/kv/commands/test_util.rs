//! Test helpers: run one command against a store and get its reply bytes.

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
