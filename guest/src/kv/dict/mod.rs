//! The keyspace hash table: chained buckets with incremental rehashing.
//! (One file, ~690 lines: the segmented tables, the rehash that moves
//! entries between them, piecewise freeing and the reverse-binary SCAN all
//! keep the same per-segment counts and memory estimate in step, so they
//! are read together; the tests are in `tests.rs`.)
//!
//! This follows Redis's `dict`: two tables, and while a resize is in flight
//! every operation migrates a few buckets from the old table to the new one,
//! so no single command pays for moving millions of entries. Two more things
//! keep per-operation work bounded where Redis leans on the OS:
//!
//! * Tables are split into fixed-size *segments* allocated on first use. A new
//!   table costs only its small segment directory, instead of zeroing
//!   gigabytes up front (Redis gets zeroed pages from `calloc`/mmap for free,
//!   the guest allocator does not).
//! * Old-table segments are freed as soon as the rehash has passed them, and
//!   a dict being thrown away (FLUSHALL) is freed piecewise by
//!   [`Dict::free_step`].
//!
//! SCAN uses Redis's reverse-binary cursor, which guarantees that every entry
//! present for the whole scan is returned at least once even when the table
//! grows or shrinks between calls.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::mem;

use super::hash::hash_bytes;
use super::mem::{try_box, try_copy, AllocError, MALLOC_OVERHEAD};

/// log2 of the buckets per segment: 4096 buckets, 32 KiB, a few µs to zero.
const SEG_BITS: u32 = 12;
const SEG_SIZE: usize = 1 << SEG_BITS;
/// Size of the first table, as in Redis.
const INITIAL_SIZE: usize = 4;
/// Buckets migrated per operation while rehashing. Redis uses 1; we move a
/// little more so the rehash always finishes before the new table fills even
/// when empty buckets eat into the budget.
const REHASH_STEP: usize = 2;
/// Empty buckets visited per migrated bucket before giving up this step.
const EMPTY_VISITS_PER_STEP: usize = 10;
/// Shrink when fewer than 1/10 of the buckets are in use (Redis's MIN_FILL).
const MIN_FILL_DIVISOR: usize = 10;

type Link = Option<Box<Entry>>;

/// One key/value pair, chained through `next`.
pub struct Entry {
    key: Box<[u8]>,
    val: Vec<u8>,
    next: Link,
}

impl Entry {
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    pub fn value(&self) -> &[u8] {
        &self.val
    }

    /// Estimated bytes this entry occupies, for memory accounting: the node,
    /// the key and value buffers, and an allocator overhead per allocation.
    fn footprint(&self) -> usize {
        entry_footprint(self.key.len(), self.val.capacity())
    }
}

/// Estimated bytes of an entry with a key of `key_len` bytes and a value
/// buffer of `val_cap` bytes (see [`Entry::footprint`]).
pub fn entry_footprint(key_len: usize, val_cap: usize) -> usize {
    let val_alloc = if val_cap > 0 { MALLOC_OVERHEAD } else { 0 };
    mem::size_of::<Entry>() + 2 * MALLOC_OVERHEAD + key_len + val_cap + val_alloc
}

impl Drop for Entry {
    // The default drop would recurse down the chain; a pathological chain
    // must not overflow the guest's stack.
    fn drop(&mut self) {
        let mut next = self.next.take();
        while let Some(mut n) = next {
            next = n.next.take();
        }
    }
}

/// A run of [`SEG_SIZE`] buckets (fewer for tiny tables) with its entry count,
/// so empty segments can be skipped and freed without scanning them.
struct Segment {
    buckets: Box<[Link]>,
    used: usize,
}

impl Segment {
    fn try_new(len: usize) -> Result<Segment, AllocError> {
        let mut v: Vec<Link> = Vec::new();
        v.try_reserve_exact(len).map_err(|_| AllocError)?;
        v.resize_with(len, || None);
        Ok(Segment {
            buckets: v.into_boxed_slice(),
            used: 0,
        })
    }

    fn bytes(len: usize) -> usize {
        len * mem::size_of::<Link>() + MALLOC_OVERHEAD
    }
}

/// One hash table: `size` buckets (a power of two, or 0 when unallocated).
#[derive(Default)]
struct Table {
    segs: Vec<Option<Segment>>,
    size: usize,
    used: usize,
}

impl Table {
    /// A table of `size` buckets; only the segment directory is allocated.
    fn try_with_size(size: usize) -> Result<Table, AllocError> {
        debug_assert!(size.is_power_of_two());
        let nsegs = size.div_ceil(SEG_SIZE);
        let mut segs = Vec::new();
        segs.try_reserve_exact(nsegs).map_err(|_| AllocError)?;
        segs.resize_with(nsegs, || None);
        Ok(Table {
            segs,
            size,
            used: 0,
        })
    }

    fn mask(&self) -> u64 {
        (self.size as u64).wrapping_sub(1)
    }

    fn seg_len(&self) -> usize {
        self.size.min(SEG_SIZE)
    }

    fn dir_bytes(&self) -> usize {
        self.segs.capacity() * mem::size_of::<Option<Segment>>()
    }

    fn head(&self, idx: usize) -> Option<&Entry> {
        let seg = self.segs.get(idx >> SEG_BITS)?.as_ref()?;
        seg.buckets.get(idx & (SEG_SIZE - 1))?.as_deref()
    }

    /// The segment holding bucket `idx`, allocating it on first use.
    /// Returns the segment and the bytes newly allocated.
    fn seg_for_insert(&mut self, idx: usize) -> Result<(&mut Segment, usize), AllocError> {
        let len = self.seg_len();
        let slot = self.segs.get_mut(idx >> SEG_BITS).ok_or(AllocError)?;
        let mut added = 0;
        if slot.is_none() {
            *slot = Some(Segment::try_new(len)?);
            added = Segment::bytes(len);
        }
        match slot {
            Some(seg) => Ok((seg, added)),
            None => Err(AllocError),
        }
    }

    fn seg_mut(&mut self, idx: usize) -> Option<&mut Segment> {
        self.segs.get_mut(idx >> SEG_BITS)?.as_mut()
    }
}

/// A binary-safe map from byte-string keys to byte-string values.
pub struct Dict {
    seed: u64,
    ht: [Table; 2],
    /// Next bucket of `ht[0]` to migrate; `Some` while rehashing.
    rehash_idx: Option<usize>,
    /// Estimated bytes of entries, segments and directories.
    bytes: usize,
    /// Buckets visited by rehashing or freeing, ever. Tests use the deltas to
    /// prove per-operation work is bounded.
    work: u64,
    /// Position of [`Dict::free_step`] in the table it is freeing.
    free_idx: usize,
}

impl Dict {
    pub fn new(seed: u64) -> Dict {
        Dict {
            seed,
            ht: [Table::default(), Table::default()],
            rehash_idx: None,
            bytes: 0,
            work: 0,
            free_idx: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.ht[0].used + self.ht[1].used
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Estimated memory held by this dict, in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_rehashing(&self) -> bool {
        self.rehash_idx.is_some()
    }

    /// Cumulative buckets visited by incremental rehashing and freeing.
    pub fn work_counter(&self) -> u64 {
        self.work
    }

    /// Total buckets in the live table(s).
    pub fn buckets(&self) -> usize {
        self.ht[0].size + self.ht[1].size
    }

    fn hash(&self, key: &[u8]) -> u64 {
        hash_bytes(self.seed, key)
    }

    /// Sizes an empty dict for `n` entries at once, so a bulk load (DEBUG
    /// POPULATE) does not rehash on the way. Cheap: only the directory is
    /// allocated. Ignored if the dict is not empty; failure is harmless.
    pub fn reserve_empty(&mut self, n: usize) {
        if !self.is_empty() || self.is_rehashing() || n <= self.ht[0].size {
            return;
        }
        let Some(size) = n.checked_next_power_of_two() else {
            return;
        };
        if let Ok(t) = Table::try_with_size(size) {
            let old = mem::replace(&mut self.ht[0], t);
            self.bytes = self.bytes - old.dir_bytes() + self.ht[0].dir_bytes();
            // `old` is empty; its segments (if any) are few for an empty dict
            // of the size we are replacing.
            self.bytes -= old
                .segs
                .iter()
                .flatten()
                .map(|s| Segment::bytes(s.buckets.len()))
                .sum::<usize>();
        }
    }

    // ---- lookups -------------------------------------------------------

    fn find_in(&self, h: u64, key: &[u8]) -> Option<(usize, usize)> {
        for t in 0..2 {
            let table = &self.ht[t];
            if table.size == 0 {
                break;
            }
            let idx = (h & table.mask()) as usize;
            let mut cur = table.head(idx);
            while let Some(e) = cur {
                if *e.key == *key {
                    return Some((t, idx));
                }
                cur = e.next.as_deref();
            }
            if !self.is_rehashing() {
                break;
            }
        }
        None
    }

    fn entry_mut(&mut self, t: usize, idx: usize, key: &[u8]) -> Option<&mut Entry> {
        let seg = self.ht[t].seg_mut(idx)?;
        let mut cur = seg.buckets.get_mut(idx & (SEG_SIZE - 1))?.as_deref_mut();
        while let Some(e) = cur {
            if *e.key == *key {
                return Some(e);
            }
            cur = e.next.as_deref_mut();
        }
        None
    }

    /// Looks `key` up, doing a step of pending rehash work first.
    pub fn get(&mut self, key: &[u8]) -> Option<&[u8]> {
        self.rehash_step(REHASH_STEP);
        self.peek(key)
    }

    /// Looks `key` up without doing any rehash work.
    pub fn peek(&self, key: &[u8]) -> Option<&[u8]> {
        let (t, idx) = self.find_in(self.hash(key), key)?;
        let mut cur = self.ht[t].head(idx);
        while let Some(e) = cur {
            if *e.key == *key {
                return Some(&e.val);
            }
            cur = e.next.as_deref();
        }
        None
    }

    pub fn contains(&mut self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    /// Runs `f` on the value of `key` in place (APPEND, INCR), keeping the
    /// memory estimate in step with the value's capacity.
    pub fn update<R>(&mut self, key: &[u8], f: impl FnOnce(&mut Vec<u8>) -> R) -> Option<R> {
        self.rehash_step(REHASH_STEP);
        let (t, idx) = self.find_in(self.hash(key), key)?;
        let e = self.entry_mut(t, idx, key)?;
        let before = e.val.capacity();
        let r = f(&mut e.val);
        let after = e.val.capacity();
        self.bytes = self.bytes + entry_footprint(0, after) - entry_footprint(0, before);
        Some(r)
    }

    // ---- inserts -------------------------------------------------------

    /// Sets `key` to `val`, returning the previous value if there was one.
    pub fn insert(&mut self, key: &[u8], val: Vec<u8>) -> Result<Option<Vec<u8>>, AllocError> {
        self.rehash_step(REHASH_STEP);
        let h = self.hash(key);
        if let Some((t, idx)) = self.find_in(h, key) {
            let e = self.entry_mut(t, idx, key).ok_or(AllocError)?;
            let old = mem::replace(&mut e.val, val);
            let new_cap = e.val.capacity();
            self.bytes =
                self.bytes + entry_footprint(0, new_cap) - entry_footprint(0, old.capacity());
            return Ok(Some(old));
        }
        self.insert_new(h, key, val)?;
        Ok(None)
    }

    /// Adds `key` only if absent; returns whether it was added. `make_val`
    /// runs only when the key is absent (DEBUG POPULATE builds values lazily).
    pub fn insert_if_absent(
        &mut self,
        key: &[u8],
        make_val: impl FnOnce() -> Result<Vec<u8>, AllocError>,
    ) -> Result<bool, AllocError> {
        self.rehash_step(REHASH_STEP);
        let h = self.hash(key);
        if self.find_in(h, key).is_some() {
            return Ok(false);
        }
        self.insert_new(h, key, make_val()?)?;
        Ok(true)
    }

    fn insert_new(&mut self, h: u64, key: &[u8], val: Vec<u8>) -> Result<(), AllocError> {
        self.expand_if_needed();
        let key = try_copy(key)?;
        let entry = try_box(Entry {
            key,
            val,
            next: None,
        })
        .map_err(|_| AllocError)?;
        let fp = entry.footprint();
        // New entries go to the new table while rehashing, so the old one only
        // ever drains.
        let t = usize::from(self.is_rehashing());
        self.link(t, h, entry)?;
        self.bytes += fp;
        Ok(())
    }

    /// Pushes `entry` at the head of its bucket in table `t`.
    fn link(&mut self, t: usize, h: u64, mut entry: Box<Entry>) -> Result<(), AllocError> {
        let table = &mut self.ht[t];
        let idx = (h & table.mask()) as usize;
        let (seg, added) = table.seg_for_insert(idx)?;
        let slot = seg
            .buckets
            .get_mut(idx & (SEG_SIZE - 1))
            .ok_or(AllocError)?;
        entry.next = slot.take();
        *slot = Some(entry);
        seg.used += 1;
        table.used += 1;
        self.bytes += added;
        Ok(())
    }

    fn expand_if_needed(&mut self) {
        if self.is_rehashing() {
            return;
        }
        if self.ht[0].size == 0 {
            if let Ok(t) = Table::try_with_size(INITIAL_SIZE) {
                self.bytes += t.dir_bytes();
                self.ht[0] = t;
            }
            return;
        }
        if self.ht[0].used >= self.ht[0].size {
            // Allocation failure just leaves chains a bit longer; the insert
            // itself will report OOM if memory is really gone.
            let _ = self.start_resize(self.ht[0].size.saturating_mul(2));
        }
    }

    /// Begins an incremental resize to `size` buckets.
    fn start_resize(&mut self, size: usize) -> Result<(), AllocError> {
        if size == 0 || !size.is_power_of_two() || size == self.ht[0].size {
            return Err(AllocError);
        }
        let t = Table::try_with_size(size)?;
        self.bytes += t.dir_bytes();
        self.ht[1] = t;
        self.rehash_idx = Some(0);
        Ok(())
    }

    // ---- removal -------------------------------------------------------

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        self.rehash_step(REHASH_STEP);
        let (t, idx) = self.find_in(self.hash(key), key)?;
        let table = &mut self.ht[t];
        let seg = table.segs.get_mut(idx >> SEG_BITS)?.as_mut()?;
        let mut cur = seg.buckets.get_mut(idx & (SEG_SIZE - 1))?;
        while cur.as_ref().is_some_and(|e| *e.key != *key) {
            cur = &mut cur.as_mut()?.next;
        }
        let mut e = cur.take()?;
        *cur = e.next.take();
        seg.used -= 1;
        table.used -= 1;
        self.bytes -= e.footprint();
        let val = mem::take(&mut e.val);
        self.shrink_if_needed();
        Some(val)
    }

    fn shrink_if_needed(&mut self) {
        let t = &self.ht[0];
        if self.is_rehashing() || t.size <= INITIAL_SIZE || t.used * MIN_FILL_DIVISOR >= t.size {
            return;
        }
        let target = t.used.max(INITIAL_SIZE).next_power_of_two();
        if target < t.size {
            let _ = self.start_resize(target);
        }
    }

    // ---- incremental work ---------------------------------------------

    /// Migrates up to `n` non-empty buckets (visiting at most 10 empty ones
    /// per bucket). Returns whether a rehash is still in progress.
    pub fn rehash_step(&mut self, n: usize) -> bool {
        let Some(mut idx) = self.rehash_idx else {
            return false;
        };
        let mut moved = 0;
        let mut empty_budget = n * EMPTY_VISITS_PER_STEP;
        while moved < n && idx < self.ht[0].size {
            let seg_no = idx >> SEG_BITS;
            let seg_used = self.ht[0]
                .segs
                .get(seg_no)
                .and_then(|s| s.as_ref())
                .map(|s| s.used);
            if seg_used.unwrap_or(0) == 0 {
                // Nothing left in this segment: free it and jump past it.
                if let Some(slot) = self.ht[0].segs.get_mut(seg_no) {
                    if let Some(seg) = slot.take() {
                        self.bytes -= Segment::bytes(seg.buckets.len());
                    }
                }
                idx = (seg_no + 1) << SEG_BITS;
                self.work += 1;
                empty_budget = empty_budget.saturating_sub(1);
                if empty_budget == 0 {
                    break;
                }
                continue;
            }
            self.work += 1;
            if self.ht[0].head(idx).is_none() {
                idx += 1;
                empty_budget -= 1;
                if empty_budget == 0 {
                    break;
                }
                continue;
            }
            if self.migrate_bucket(idx).is_err() {
                // No memory for a new-table segment: leave the rest for later.
                break;
            }
            idx += 1;
            moved += 1;
        }
        if idx >= self.ht[0].size {
            self.finish_rehash();
            false
        } else {
            self.rehash_idx = Some(idx);
            true
        }
    }

    /// Moves every entry of old-table bucket `idx` to the new table.
    fn migrate_bucket(&mut self, idx: usize) -> Result<(), AllocError> {
        let off = idx & (SEG_SIZE - 1);
        let Some(mut chain) = self.ht[0]
            .seg_mut(idx)
            .and_then(|s| s.buckets.get_mut(off))
            .map(Option::take)
        else {
            return Ok(());
        };
        while let Some(mut e) = chain {
            chain = e.next.take();
            let h = hash_bytes(self.seed, &e.key);
            if let Err(mut back) = self.link_moved(h, e) {
                // No memory for a new-table segment: put the unmoved entries
                // back so nothing is lost, and retry on a later step.
                back.next = chain;
                if let Some(slot) = self.ht[0].seg_mut(idx).and_then(|s| s.buckets.get_mut(off)) {
                    *slot = Some(back);
                }
                return Err(AllocError);
            }
            if let Some(seg) = self.ht[0].seg_mut(idx) {
                seg.used -= 1;
            }
            self.ht[0].used -= 1;
        }
        Ok(())
    }

    /// Links an entry taken from the old table into the new one. On failure
    /// hands the entry back.
    fn link_moved(&mut self, h: u64, mut e: Box<Entry>) -> Result<(), Box<Entry>> {
        let table = &mut self.ht[1];
        let idx = (h & table.mask()) as usize;
        let (seg, added) = match table.seg_for_insert(idx) {
            Ok(x) => x,
            Err(_) => return Err(e),
        };
        let Some(slot) = seg.buckets.get_mut(idx & (SEG_SIZE - 1)) else {
            return Err(e);
        };
        e.next = slot.take();
        *slot = Some(e);
        seg.used += 1;
        table.used += 1;
        self.bytes += added;
        Ok(())
    }

    fn finish_rehash(&mut self) {
        let old = mem::take(&mut self.ht[0]);
        // Every old segment was freed as the rehash passed it, except ones
        // still allocated but empty beyond the last entry.
        let seg_bytes: usize = old
            .segs
            .iter()
            .flatten()
            .map(|s| Segment::bytes(s.buckets.len()))
            .sum();
        self.bytes -= old.dir_bytes() + seg_bytes;
        self.ht[0] = mem::take(&mut self.ht[1]);
        self.rehash_idx = None;
    }

    /// Frees up to about `budget` entries of a dict that is being thrown
    /// away (after FLUSHALL), so freeing millions of entries never stalls a
    /// command. Returns whether anything is left.
    pub fn free_step(&mut self, budget: usize) -> bool {
        let mut left = budget.max(1);
        for t in 0..2 {
            while self.free_idx < self.ht[t].segs.len() {
                let seg_no = self.free_idx;
                let Some(seg) = self.ht[t].segs.get_mut(seg_no).and_then(Option::as_mut) else {
                    self.free_idx += 1;
                    continue;
                };
                let mut freed = 0usize;
                let mut freed_bytes = 0usize;
                for slot in seg.buckets.iter_mut() {
                    if left == 0 || seg.used == 0 {
                        break;
                    }
                    let mut chain = slot.take();
                    // Finish the chain even past the budget: chains are short.
                    while let Some(mut e) = chain {
                        chain = e.next.take();
                        freed_bytes += e.footprint();
                        freed += 1;
                        seg.used = seg.used.saturating_sub(1);
                        left = left.saturating_sub(1);
                    }
                }
                let seg_empty = seg.used == 0;
                let len = seg.buckets.len();
                self.ht[t].used = self.ht[t].used.saturating_sub(freed);
                self.bytes -= freed_bytes;
                self.work += freed as u64;
                if seg_empty {
                    self.ht[t].segs[seg_no] = None;
                    self.bytes -= Segment::bytes(len);
                    self.free_idx += 1;
                }
                if left == 0 {
                    // Possibly done, but the next call tidies up cheaply.
                    return true;
                }
            }
            self.free_idx = 0;
            let dir = self.ht[t].dir_bytes();
            self.ht[t] = Table::default();
            self.bytes -= dir;
        }
        self.rehash_idx = None;
        false
    }

    // ---- iteration -------------------------------------------------------

    /// Calls `f` on every entry (KEYS). O(n) by nature, as in Redis.
    pub fn for_each(&self, mut f: impl FnMut(&Entry)) {
        for t in &self.ht {
            for seg in t.segs.iter().flatten() {
                if seg.used == 0 {
                    continue;
                }
                for b in seg.buckets.iter() {
                    let mut cur = b.as_deref();
                    while let Some(e) = cur {
                        f(e);
                        cur = e.next.as_deref();
                    }
                }
            }
        }
    }

    fn emit_bucket(table: &Table, idx: usize, f: &mut impl FnMut(&Entry)) {
        let mut cur = table.head(idx);
        while let Some(e) = cur {
            f(e);
            cur = e.next.as_deref();
        }
    }

    /// One step of SCAN: emits the entries of the bucket(s) at `cursor` and
    /// returns the next cursor (0 when done). This is Redis's `dictScan`:
    /// the cursor is incremented in bit-reversed order, so buckets already
    /// visited in a smaller or larger table are never skipped.
    pub fn scan(&self, cursor: u64, mut f: impl FnMut(&Entry)) -> u64 {
        if self.is_empty() {
            return 0;
        }
        let mut v = cursor;
        if !self.is_rehashing() {
            let t0 = &self.ht[0];
            let m0 = t0.mask();
            Self::emit_bucket(t0, (v & m0) as usize, &mut f);
            v |= !m0;
            v = v.reverse_bits().wrapping_add(1).reverse_bits();
        } else {
            let (small, big) = if self.ht[0].size <= self.ht[1].size {
                (&self.ht[0], &self.ht[1])
            } else {
                (&self.ht[1], &self.ht[0])
            };
            let (m0, m1) = (small.mask(), big.mask());
            Self::emit_bucket(small, (v & m0) as usize, &mut f);
            loop {
                Self::emit_bucket(big, (v & m1) as usize, &mut f);
                v |= !m1;
                v = v.reverse_bits().wrapping_add(1).reverse_bits();
                if v & (m0 ^ m1) == 0 {
                    break;
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests;
