//! The keyspace (a single db 0), its memory limit, and server-wide stats.
//!
//! Memory policy is Redis's `noeviction`: a write that would take the
//! estimated usage over `maxmemory`, or whose allocation fails, is refused
//! with `-OOM`, and reads go on being served.
//!
//! Tests are in `tests.rs`; the ignored host scale run in `scale_tests.rs`.

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
mod tests;

#[cfg(test)]
mod scale_tests;
