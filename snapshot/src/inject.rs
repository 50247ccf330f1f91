//! Fault injection for the three rollback cases (DESIGN.md §2), plus panics,
//! a staging pool that cannot be allocated, and a failing or slow disk. Compiled in always (so the VMM's end-to-end
//! tests can use it too), inert by default.
//!
//! End-to-end tests reach a real `snapvm` through the `SNAPVM_INJECT`
//! environment variable (see [`FaultInjection::from_env`]): the engine reads
//! it when it is created, and the persist writer when it starts, each for a
//! limited number of snapshots, so a test can make one snapshot fail and
//! check that the next one succeeds.

use std::sync::atomic::{AtomicU64, Ordering};

/// Environment variable with comma-separated `key=value` injections, e.g.
/// `SNAPVM_INJECT=panic_worker_copy_at=0` or
/// `SNAPVM_INJECT=persist_fail_after=1048576:EIO,snapshots=2`. Keys are the
/// [`FaultInjection`] field names (`fail_sync` and `fail_staging` take no
/// value), plus `persist_fail_after=BYTES:ENOSPC|EIO` (the memory image's
/// writes fail after that many bytes), `persist_chunk_delay_ms=N` (sleep
/// after each write to the image: a slow disk, for kill-mid-write tests)
/// and `snapshots=N` (how many engines / images it applies to, default 1).
/// A test hook only: nothing else reads it.
pub const ENV: &str = "SNAPVM_INJECT";

/// Where to make a snapshot fail on purpose.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultInjection {
    /// Fail `begin()` after the regions were registered and write-protected,
    /// to exercise the sync-phase undo.
    pub fail_sync: bool,
    /// Fail the workers' n-th (0-based, across workers) save. Counted per
    /// save rather than per chunk index so the test is deterministic even
    /// when the fault path saves some chunk first.
    pub fail_worker_copy_at: Option<usize>,
    /// Fail the fault path on its n-th (0-based) save.
    pub fail_fault_path_at: Option<usize>,
    /// Hold the workers back until the fault path (handler or hooks) has
    /// copied this many chunks, or the snapshot aborts. Makes tests of the
    /// fault path deterministic (no race with a fast worker).
    pub hold_workers_until_fault_copies: Option<u64>,
    /// Panic inside the workers' n-th (0-based) chunk copy: a bug in a
    /// worker thread. The engine catches it and rolls back.
    pub panic_worker_copy_at: Option<usize>,
    /// Panic inside the fault path's n-th (0-based) chunk copy (on the
    /// fault handler thread).
    pub panic_fault_path_at: Option<usize>,
    /// Make the staging pool's allocation fail (ENOMEM): the snapshot goes
    /// on without staging, every fault writing its unit itself.
    pub fail_staging: bool,
}

/// Persist-side injections from [`ENV`] (the writer's own test hook is
/// `WriteOptions::fail_after_bytes`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PersistInjection {
    pub fail_after_bytes: Option<(u64, i32)>,
    pub chunk_delay_ms: u64,
}

/// A parsed [`ENV`] value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvInjection {
    pub engine: FaultInjection,
    pub persist: PersistInjection,
    /// How many engines (and, separately, persists) it applies to.
    pub snapshots: u64,
}

static ENGINES_INJECTED: AtomicU64 = AtomicU64::new(0);
static PERSISTS_INJECTED: AtomicU64 = AtomicU64::new(0);

fn num<T: std::str::FromStr>(key: &str, v: Option<&str>) -> Result<T, String> {
    v.and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{ENV}: {key} needs a number"))
}

impl EnvInjection {
    /// Parses `key=value,...` (see [`ENV`]).
    pub fn parse(s: &str) -> Result<EnvInjection, String> {
        let mut out = EnvInjection {
            snapshots: 1,
            ..EnvInjection::default()
        };
        let e = &mut out.engine;
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item, None),
            };
            match key {
                "fail_sync" => e.fail_sync = true,
                "fail_staging" => e.fail_staging = true,
                "fail_worker_copy_at" => e.fail_worker_copy_at = Some(num(key, value)?),
                "fail_fault_path_at" => e.fail_fault_path_at = Some(num(key, value)?),
                "hold_workers_until_fault_copies" => {
                    e.hold_workers_until_fault_copies = Some(num(key, value)?)
                }
                "panic_worker_copy_at" => e.panic_worker_copy_at = Some(num(key, value)?),
                "panic_fault_path_at" => e.panic_fault_path_at = Some(num(key, value)?),
                "snapshots" => out.snapshots = num(key, value)?,
                "persist_chunk_delay_ms" => out.persist.chunk_delay_ms = num(key, value)?,
                "persist_fail_after" => {
                    let (bytes, errno) = value
                        .and_then(|v| v.split_once(':'))
                        .ok_or_else(|| format!("{ENV}: persist_fail_after=BYTES:ENOSPC|EIO"))?;
                    let errno = match errno {
                        "ENOSPC" => libc::ENOSPC,
                        "EIO" => libc::EIO,
                        other => return Err(format!("{ENV}: unknown errno {other}")),
                    };
                    out.persist.fail_after_bytes = Some((num(key, Some(bytes))?, errno));
                }
                other => return Err(format!("{ENV}: unknown key {other}")),
            }
        }
        Ok(out)
    }

    fn from_env() -> Result<Option<EnvInjection>, String> {
        match std::env::var(ENV) {
            Ok(s) => EnvInjection::parse(&s).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(format!("{ENV} is not UTF-8")),
        }
    }

    /// Engine injections from the environment for the next engine, while
    /// `snapshots` engines have not used them yet.
    pub(crate) fn next_engine() -> Result<Option<FaultInjection>, String> {
        let Some(env) = EnvInjection::from_env()? else {
            return Ok(None);
        };
        let n = ENGINES_INJECTED.fetch_add(1, Ordering::Relaxed);
        Ok((n < env.snapshots && env.engine != FaultInjection::default()).then_some(env.engine))
    }

    /// Persist injections from the environment for the next write.
    pub(crate) fn next_persist() -> Result<Option<PersistInjection>, String> {
        let Some(env) = EnvInjection::from_env()? else {
            return Ok(None);
        };
        if env.persist == PersistInjection::default() {
            return Ok(None);
        }
        let n = PERSISTS_INJECTED.fetch_add(1, Ordering::Relaxed);
        Ok((n < env.snapshots).then_some(env.persist))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key_and_refuses_unknown_ones() {
        let e = EnvInjection::parse(
            "fail_sync, panic_worker_copy_at=3,persist_fail_after=4096:EIO,\
             persist_chunk_delay_ms=5,snapshots=2,panic_fault_path_at=1,fail_staging",
        )
        .unwrap();
        assert!(e.engine.fail_sync);
        assert!(e.engine.fail_staging);
        assert_eq!(e.engine.panic_worker_copy_at, Some(3));
        assert_eq!(e.engine.panic_fault_path_at, Some(1));
        assert_eq!(e.persist.fail_after_bytes, Some((4096, libc::EIO)));
        assert_eq!(e.persist.chunk_delay_ms, 5);
        assert_eq!(e.snapshots, 2);
        assert_eq!(EnvInjection::parse("").unwrap().snapshots, 1);
        assert_eq!(
            EnvInjection::parse("bogus=1").unwrap_err(),
            "SNAPVM_INJECT: unknown key bogus"
        );
        assert_eq!(
            EnvInjection::parse("fail_worker_copy_at=x").unwrap_err(),
            "SNAPVM_INJECT: fail_worker_copy_at needs a number"
        );
        assert!(EnvInjection::parse("persist_fail_after=1:EPERM").is_err());
    }
}
