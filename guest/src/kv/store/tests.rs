//! Tests of the keyspace: SET/GET/INCR/APPEND semantics and limits, the
//! `maxmemory` policy (estimate or allocator figure), and lazy FLUSHALL
//! whose memory comes back in steps or under pressure.

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
