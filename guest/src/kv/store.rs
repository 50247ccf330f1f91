//! The keyspace (a single db 0), its memory limit, and server-wide stats.
//!
//! Memory policy is Redis's `noeviction`: a write that would take the
//! estimated usage over `maxmemory`, or whose allocation fails, is refused
//! with `-OOM`, and reads go on being served.

use alloc::vec::Vec;
use core::mem;

use super::dict::{entry_footprint, Dict, Entry};
use super::mem::{try_grow, try_vec_from, AllocError};
use super::num::{fmt_i64, parse_i64};
use super::probe::Probe;
use super::resp::Limits;

/// Fixed overhead counted into `used_memory` (the store itself, probe
/// histogram, bookkeeping), so an empty store does not report 0 like no real
/// server would.
const BASE_MEMORY: usize = 128 * 1024;
/// Entries of flushed data freed per command, and per failed write when
/// memory is short (so a FLUSHALL's memory comes back as it is needed).
const FREE_PER_COMMAND: usize = 64;
const FREE_ON_PRESSURE: usize = 4096;

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Bytes; 0 means unlimited (as in Redis).
    pub maxmemory: usize,
    /// The allocator's real usage (bytes taken from the heap, metadata
    /// included), like Redis's `zmalloc_used_memory`. When given it is what
    /// `used_memory` reports and `maxmemory` is checked against: the
    /// store's own estimate misses allocator overhead and fragmentation, and
    /// a store that believes it has room while the heap is exhausted ends in
    /// an allocation failure somewhere infallible (a crash), not an `-OOM`.
    pub heap_used: Option<fn() -> usize>,
    /// Seed for the keyspace hash (e.g. from the TSC at boot).
    pub hash_seed: u64,
    /// Protocol limits for new connections.
    pub proto: Limits,
    /// `client-query-buffer-limit`: unprocessed input per connection.
    pub client_query_buffer_limit: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            maxmemory: 0,
            heap_used: None,
            hash_seed: 0x5eed_5eed_5eed_5eed,
            proto: Limits::default(),
            client_query_buffer_limit: 1024 * 1024 * 1024,
        }
    }
}

/// A write was refused: over `maxmemory` or an allocation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oom;

impl From<AllocError> for Oom {
    fn from(_: AllocError) -> Self {
        Oom
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncrError {
    NotInteger,
    Overflow,
    Oom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendError {
    TooBig,
    Oom,
}

/// Counters reported by INFO stats (reset by CONFIG RESETSTAT).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub total_commands_processed: u64,
    pub total_connections_received: u64,
    pub keyspace_hits: u64,
    pub keyspace_misses: u64,
    pub total_net_input_bytes: u64,
    pub total_net_output_bytes: u64,
    pub total_error_replies: u64,
    pub rejected_oom: u64,
}

pub struct Store {
    db: Dict,
    /// Flushed keyspaces still being freed, a little per command.
    graveyard: Vec<Dict>,
    cfg: StoreConfig,
    pub stats: Stats,
    pub probe: Probe,
    next_client_id: u64,
    connected_clients: u64,
    peak_memory: usize,
    /// Clock reading at the first command, for `uptime_in_seconds`.
    pub(crate) start_ticks: Option<u64>,
}

impl Store {
    pub fn new(cfg: StoreConfig) -> Store {
        Store {
            db: Dict::new(cfg.hash_seed),
            graveyard: Vec::new(),
            cfg,
            stats: Stats::default(),
            probe: Probe::new(),
            next_client_id: 1,
            connected_clients: 0,
            peak_memory: 0,
            start_ticks: None,
        }
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    pub fn set_maxmemory(&mut self, bytes: usize) {
        self.cfg.maxmemory = bytes;
    }

    pub fn maxmemory(&self) -> usize {
        self.cfg.maxmemory
    }

    // ---- clients -------------------------------------------------------

    /// Registers a new connection; returns its client id.
    pub fn client_connected(&mut self) -> u64 {
        let id = self.next_client_id;
        self.next_client_id += 1;
        self.connected_clients += 1;
        self.stats.total_connections_received += 1;
        id
    }

    pub fn client_disconnected(&mut self) {
        self.connected_clients = self.connected_clients.saturating_sub(1);
    }

    pub fn connected_clients(&self) -> u64 {
        self.connected_clients
    }

    // ---- memory ----------------------------------------------------------

    /// Bytes in use: the allocator's real figure when the kernel provides
    /// one, else the estimate (keyspace, data awaiting lazy free, overhead).
    pub fn used_memory(&self) -> usize {
        match self.cfg.heap_used {
            Some(heap_used) => heap_used(),
            None => self.estimated_memory(),
        }
    }

    fn estimated_memory(&self) -> usize {
        BASE_MEMORY + self.db.bytes() + self.graveyard.iter().map(Dict::bytes).sum::<usize>()
    }

    pub fn peak_memory(&self) -> usize {
        self.peak_memory.max(self.used_memory())
    }

    /// Entries from FLUSHALL still waiting to be freed.
    pub fn lazyfree_pending_objects(&self) -> usize {
        self.graveyard.iter().map(Dict::len).sum()
    }

    /// Checks that `extra` more bytes fit under `maxmemory`, first freeing
    /// a bounded amount of flushed data if that could help.
    pub fn check_room(&mut self, extra: usize) -> Result<(), Oom> {
        let fits = |s: &Store| {
            s.cfg.maxmemory == 0 || s.used_memory().saturating_add(extra) <= s.cfg.maxmemory
        };
        if fits(self) {
            return Ok(());
        }
        if !self.graveyard.is_empty() {
            self.free_some(FREE_ON_PRESSURE);
            if fits(self) {
                return Ok(());
            }
        }
        self.stats.rejected_oom += 1;
        Err(Oom)
    }

    /// Is the store over its limit right now (denies writes like Redis)?
    pub fn over_maxmemory(&self) -> bool {
        self.cfg.maxmemory != 0 && self.used_memory() > self.cfg.maxmemory
    }

    fn free_some(&mut self, budget: usize) {
        if let Some(d) = self.graveyard.last_mut() {
            if !d.free_step(budget) {
                self.graveyard.pop();
            }
        }
    }

    fn note_peak(&mut self) {
        let used = self.used_memory();
        if used > self.peak_memory {
            self.peak_memory = used;
        }
    }

    /// Bounded background work: advances a pending rehash and frees flushed
    /// data. The kernel should call this from its main loop when idle (like
    /// Redis's active rehashing), e.g. with a budget of ~1000. Returns whether
    /// more work is pending.
    pub fn background_step(&mut self, budget: usize) -> bool {
        let rehashing = self.db.rehash_step(budget.div_ceil(10).max(1));
        self.free_some(budget);
        rehashing || !self.graveyard.is_empty()
    }

    /// Small amount of deferred work done after every command.
    pub fn after_command(&mut self) {
        if !self.graveyard.is_empty() {
            self.free_some(FREE_PER_COMMAND);
        }
    }

    // ---- keyspace --------------------------------------------------------

    pub fn len(&self) -> usize {
        self.db.len()
    }

    pub fn is_empty(&self) -> bool {
        self.db.is_empty()
    }

    /// Looks a key up, counting a keyspace hit or miss.
    pub fn get(&mut self, key: &[u8]) -> Option<&[u8]> {
        let v = self.db.get(key);
        if v.is_some() {
            self.stats.keyspace_hits += 1;
        } else {
            self.stats.keyspace_misses += 1;
        }
        v
    }

    pub fn exists(&mut self, key: &[u8]) -> bool {
        self.db.contains(key)
    }

    /// Sets `key` to a copy of `val` (creating or overwriting).
    pub fn set(&mut self, key: &[u8], val: &[u8]) -> Result<(), Oom> {
        // Overwrite in place when the old buffer fits and is not wastefully
        // large: no allocation, no memory growth, one lookup.
        let reused = self.db.update(key, |v| {
            if v.capacity() >= val.len() && v.capacity() <= val.len().max(16) * 2 {
                v.clear();
                v.extend_from_slice(val);
                true
            } else {
                false
            }
        });
        if reused == Some(true) {
            return Ok(());
        }
        let extra = match reused {
            // Replacing: only the value's size changes (roughly).
            Some(_) => val.len(),
            None => entry_footprint(key.len(), val.len()),
        };
        self.check_room(extra)?;
        let v = try_vec_from(val)?;
        self.db.insert(key, v)?;
        self.note_peak();
        Ok(())
    }

    /// Adds `key` only if absent, building the value only then. Returns
    /// whether it was added.
    pub fn set_if_absent(
        &mut self,
        key: &[u8],
        val_len: usize,
        make_val: impl FnOnce() -> Result<Vec<u8>, AllocError>,
    ) -> Result<bool, Oom> {
        self.check_room(entry_footprint(key.len(), val_len))?;
        let added = self.db.insert_if_absent(key, make_val)?;
        if added {
            self.note_peak();
        }
        Ok(added)
    }

    /// Removes `key`; returns whether it existed.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        self.db.remove(key).is_some()
    }

    /// Removes `key` and returns its value (GETDEL).
    pub fn take(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        self.db.remove(key)
    }

    /// INCRBY: adds `delta` to the integer in `key` (0 if absent).
    pub fn incr_by(&mut self, key: &[u8], delta: i64) -> Result<i64, IncrError> {
        let r = self.db.update(key, |v| {
            // Redis refuses values longer than 20 chars before parsing.
            let cur = parse_i64(v).ok_or(IncrError::NotInteger)?;
            let new = cur.checked_add(delta).ok_or(IncrError::Overflow)?;
            let mut b = [0u8; 20];
            let digits = fmt_i64(new, &mut b);
            if v.capacity() < digits.len() && v.try_reserve_exact(digits.len() - v.len()).is_err() {
                return Err(IncrError::Oom);
            }
            v.clear();
            v.extend_from_slice(digits);
            Ok(new)
        });
        match r {
            Some(r) => r,
            None => {
                let mut b = [0u8; 20];
                let digits = fmt_i64(delta, &mut b);
                self.set(key, digits).map_err(|_| IncrError::Oom)?;
                Ok(delta)
            }
        }
    }

    /// APPEND: returns the new length.
    pub fn append(&mut self, key: &[u8], data: &[u8]) -> Result<usize, AppendError> {
        let max = self.cfg.proto.max_bulk_len;
        let cur_len = self.db.peek(key).map(<[u8]>::len);
        if cur_len.unwrap_or(0).saturating_add(data.len()) > max {
            return Err(AppendError::TooBig);
        }
        let extra = match cur_len {
            Some(_) => data.len(),
            None => entry_footprint(key.len(), data.len()),
        };
        self.check_room(extra).map_err(|_| AppendError::Oom)?;
        let r = self.db.update(key, |v| {
            // Amortised doubling like sds, so repeated APPENDs are linear.
            try_grow(v, data.len()).map_err(|_| AppendError::Oom)?;
            v.extend_from_slice(data);
            Ok(v.len())
        });
        let r = match r {
            Some(r) => r,
            None => {
                self.set(key, data).map_err(|_| AppendError::Oom)?;
                Ok(data.len())
            }
        };
        self.note_peak();
        r
    }

    /// Empties the keyspace at once; the old entries are freed a little at
    /// a time (by commands and [`Store::background_step`]) so a huge flush
    /// never stalls the guest.
    pub fn flush(&mut self) {
        let old = mem::replace(&mut self.db, Dict::new(self.cfg.hash_seed));
        if old.bytes() == 0 {
            return;
        }
        if self.graveyard.try_reserve(1).is_ok() {
            self.graveyard.push(old);
        }
        // else: dropped here, synchronously; only when memory is exhausted.
    }

    /// Sizes an empty keyspace for `n` keys (DEBUG POPULATE).
    pub fn reserve(&mut self, n: usize) {
        self.db.reserve_empty(n);
    }

    /// One SCAN step over the keyspace (see [`Dict::scan`]).
    pub fn scan(&self, cursor: u64, f: impl FnMut(&Entry)) -> u64 {
        self.db.scan(cursor, f)
    }

    pub fn for_each(&self, f: impl FnMut(&Entry)) {
        self.db.for_each(f)
    }

    /// The keyspace dict, for tests and diagnostics.
    pub fn dict(&self) -> &Dict {
        &self.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(maxmemory: usize) -> Store {
        Store::new(StoreConfig {
            maxmemory,
            ..StoreConfig::default()
        })
    }

    #[test]
    fn set_get_overwrite() {
        let mut s = store(0);
        s.set(b"k", b"v1").unwrap();
        assert_eq!(s.get(b"k"), Some(&b"v1"[..]));
        s.set(b"k", b"v2-longer-value-here-xxxxxxxxxxxxxxxxxxxxx")
            .unwrap();
        assert_eq!(
            s.get(b"k"),
            Some(&b"v2-longer-value-here-xxxxxxxxxxxxxxxxxxxxx"[..])
        );
        s.set(b"k", b"").unwrap();
        assert_eq!(s.get(b"k"), Some(&b""[..]));
        assert_eq!(s.stats.keyspace_hits, 3);
        assert_eq!(s.get(b"nope"), None);
        assert_eq!(s.stats.keyspace_misses, 1);
        assert!(s.remove(b"k"));
        assert!(!s.remove(b"k"));
    }

    #[test]
    fn incr() {
        let mut s = store(0);
        assert_eq!(s.incr_by(b"n", 5), Ok(5));
        assert_eq!(s.incr_by(b"n", -7), Ok(-2));
        assert_eq!(s.get(b"n"), Some(&b"-2"[..]));
        s.set(b"x", b"abc").unwrap();
        assert_eq!(s.incr_by(b"x", 1), Err(IncrError::NotInteger));
        s.set(b"m", b"9223372036854775807").unwrap();
        assert_eq!(s.incr_by(b"m", 1), Err(IncrError::Overflow));
        assert_eq!(s.get(b"m"), Some(&b"9223372036854775807"[..]));
    }

    /// With the allocator's figure, the limit follows the real heap, not
    /// the estimate: a heap reported full refuses writes at once.
    #[test]
    fn maxmemory_uses_the_allocator_figure_when_given() {
        use core::sync::atomic::{AtomicUsize, Ordering};
        static HEAP_USED: AtomicUsize = AtomicUsize::new(0);
        fn heap_used() -> usize {
            HEAP_USED.load(Ordering::Relaxed)
        }
        let mut s = Store::new(StoreConfig {
            maxmemory: 1 << 20,
            heap_used: Some(heap_used),
            ..StoreConfig::default()
        });
        HEAP_USED.store(1000, Ordering::Relaxed);
        assert_eq!(s.used_memory(), 1000);
        s.set(b"a", b"1").unwrap();
        HEAP_USED.store(1 << 20, Ordering::Relaxed);
        assert_eq!(s.set(b"b", b"2"), Err(Oom));
        assert_eq!(s.get(b"a"), Some(&b"1"[..]));
    }

    #[test]
    fn maxmemory_refuses_writes_but_serves_reads() {
        let mut s = store(BASE_MEMORY + 64 * 1024);
        let mut stored = 0;
        for i in 0..10_000 {
            match s.set(alloc::format!("k{i}").as_bytes(), &[7u8; 100]) {
                Ok(()) => stored += 1,
                Err(Oom) => break,
            }
        }
        assert!(stored > 100 && stored < 1000, "{stored}");
        // Top up with the smallest entries until nothing fits (finishing any
        // rehash first, which frees the old table).
        while s.background_step(1000) {}
        let mut i = 0;
        while s.set(alloc::format!("f{i}").as_bytes(), b"").is_ok() {
            i += 1;
            while s.background_step(1000) {}
        }
        assert!(s.used_memory() <= s.maxmemory());
        assert_eq!(s.get(b"k0"), Some(&[7u8; 100][..]));
        // Same-size overwrite needs no memory and is allowed.
        s.set(b"k0", &[8u8; 100]).unwrap();
        assert_eq!(s.append(b"k0", &[0u8; 100_000]), Err(AppendError::Oom));
        assert_eq!(s.incr_by(b"newcounter", 1), Err(IncrError::Oom));
        assert!(s.stats.rejected_oom >= 2);
        // Deleting frees memory for new writes.
        for i in 0..stored {
            assert!(s.remove(alloc::format!("k{i}").as_bytes()));
        }
        s.set(b"again", &[1u8; 100]).unwrap();
    }

    #[test]
    fn flush_is_lazy_and_memory_returns() {
        let mut s = store(0);
        for i in 0..50_000 {
            s.set(alloc::format!("key:{i}").as_bytes(), b"v").unwrap();
        }
        let full = s.used_memory();
        s.flush();
        assert_eq!(s.len(), 0);
        assert_eq!(s.get(b"key:1"), None);
        assert_eq!(s.used_memory(), full); // not freed yet
        assert_eq!(s.lazyfree_pending_objects(), 50_000);
        s.after_command();
        assert_eq!(s.lazyfree_pending_objects(), 50_000 - FREE_PER_COMMAND);
        while s.background_step(1000) {}
        assert_eq!(s.lazyfree_pending_objects(), 0);
        assert_eq!(s.used_memory(), BASE_MEMORY);
        assert!(s.peak_memory() >= full);
    }

    #[test]
    fn flushed_memory_is_reclaimed_under_pressure() {
        let mut s = store(BASE_MEMORY + 2 * 1024 * 1024);
        let mut n = 0;
        while s
            .set(alloc::format!("key:{n}").as_bytes(), &[0u8; 64])
            .is_ok()
        {
            n += 1;
        }
        s.flush();
        // Writes after the flush free old data as they need room.
        for i in 0..n / 2 {
            s.set(alloc::format!("new:{i}").as_bytes(), &[0u8; 64])
                .unwrap();
        }
    }

    #[test]
    fn append_limits() {
        let mut s = Store::new(StoreConfig {
            proto: Limits {
                max_bulk_len: 10,
                ..Limits::default()
            },
            ..StoreConfig::default()
        });
        assert_eq!(s.append(b"a", b"12345"), Ok(5));
        assert_eq!(s.append(b"a", b"67890"), Ok(10));
        assert_eq!(s.append(b"a", b"x"), Err(AppendError::TooBig));
        assert_eq!(s.get(b"a"), Some(&b"1234567890"[..]));
    }
}

/// Scale checks on the host (release mode recommended):
/// `cargo test --release -p snapvm-guest --lib -- --ignored --nocapture scale`
#[cfg(test)]
mod scale_tests {
    extern crate std;
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore]
    fn scale_insert_latency_and_flush() {
        let n: usize = std::env::var("KV_SCALE_KEYS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000_000);
        let mut s = Store::new(StoreConfig::default());
        let mut worst = 0u128;
        let mut worst_work = 0u64;
        let mut ins = crate::kv::hist::Histogram::new();
        let t = Instant::now();
        let mut key = Vec::new();
        for i in 0..n {
            key.clear();
            key.extend_from_slice(b"key:");
            key.extend_from_slice(alloc::format!("{i}").as_bytes());
            let w0 = s.dict().work_counter();
            let t0 = Instant::now();
            s.set(&key, b"0123456789abcdef").unwrap();
            let ns = t0.elapsed().as_nanos();
            ins.record(ns as u64);
            worst = worst.max(ns);
            worst_work = worst_work.max(s.dict().work_counter() - w0);
        }
        let fill = t.elapsed();
        std::println!(
            "insert ns p50 {} p99.9 {} p99.99 {} max {}",
            ins.quantile(0.5),
            ins.quantile(0.999),
            ins.quantile(0.9999),
            ins.max()
        );
        std::println!(
            "{n} inserts in {fill:?}; worst single insert {} us, worst rehash work {worst_work} buckets; used_memory {} MiB",
            worst / 1000,
            s.used_memory() >> 20
        );
        let t0 = Instant::now();
        s.flush();
        std::println!("flush returned in {:?}", t0.elapsed());
        let t0 = Instant::now();
        let mut steps = 0;
        let mut worst_step = 0u128;
        let mut sh = crate::kv::hist::Histogram::new();
        loop {
            let ts = Instant::now();
            let more = s.background_step(1000);
            let ns = ts.elapsed().as_nanos();
            sh.record(ns as u64);
            if ns > 5_000_000 {
                std::println!("slow step {steps}: {} us", ns / 1000);
            }
            worst_step = worst_step.max(ns);
            steps += 1;
            if !more {
                break;
            }
        }
        std::println!(
            "lazy free: {steps} steps in {:?}, worst step {} us",
            t0.elapsed(),
            worst_step / 1000
        );
        std::println!(
            "step ns p50 {} p99 {} max {}",
            sh.quantile(0.5),
            sh.quantile(0.99),
            sh.max()
        );
        assert_eq!(s.used_memory(), BASE_MEMORY);

        let t0 = Instant::now();
        let n_str = alloc::format!("{n}");
        let out = crate::kv::commands::test_util::run(
            &mut s,
            &[b"DEBUG", b"POPULATE", n_str.as_bytes(), b"key", b"100"],
        );
        assert_eq!(out, b"+OK\r\n");
        std::println!(
            "DEBUG POPULATE {n} key 100: {:?}, used_memory {} MiB",
            t0.elapsed(),
            s.used_memory() >> 20
        );
    }
}
