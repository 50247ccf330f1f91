//! Tests of the hash table: lookups and updates, growth and shrinking,
//! bounded per-operation rehash and free work, the memory estimate, SCAN's
//! guarantee across resizes, and dropping a long chain without recursion.

use super::*;
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::vec;

fn k(i: usize) -> Vec<u8> {
    format!("key:{i}").into_bytes()
}

#[test]
fn insert_get_remove() {
    let mut d = Dict::new(1);
    assert_eq!(d.get(b"a"), None);
    assert_eq!(d.insert(b"a", b"1".to_vec()).unwrap(), None);
    assert_eq!(d.insert(b"a", b"2".to_vec()).unwrap(), Some(b"1".to_vec()));
    assert_eq!(d.get(b"a"), Some(&b"2"[..]));
    assert_eq!(d.len(), 1);
    assert!(!d.insert_if_absent(b"a", || Ok(vec![])).unwrap());
    assert!(d.insert_if_absent(b"", || Ok(b"empty".to_vec())).unwrap());
    assert_eq!(d.get(b""), Some(&b"empty"[..]));
    assert_eq!(d.remove(b"a"), Some(b"2".to_vec()));
    assert_eq!(d.remove(b"a"), None);
    assert_eq!(d.len(), 1);
}

#[test]
fn many_keys_grow_and_shrink() {
    let mut d = Dict::new(7);
    let n = 50_000;
    for i in 0..n {
        d.insert(&k(i), k(i)).unwrap();
    }
    assert_eq!(d.len(), n);
    for i in 0..n {
        assert_eq!(d.get(&k(i)), Some(&k(i)[..]), "{i}");
    }
    for i in 0..n - 10 {
        assert_eq!(d.remove(&k(i)), Some(k(i)));
    }
    // Drive any pending rehash to completion.
    while d.rehash_step(100) {}
    assert_eq!(d.len(), 10);
    assert!(d.buckets() <= 64, "{}", d.buckets());
    for i in n - 10..n {
        assert_eq!(d.get(&k(i)), Some(&k(i)[..]));
    }
}

#[test]
fn per_insert_work_is_bounded() {
    // No single insert may do O(n) work: count buckets visited by the
    // rehash per insert across several doublings.
    let mut d = Dict::new(3);
    let mut max_work = 0;
    let mut resizes = 0;
    let mut was_rehashing = false;
    for i in 0..300_000 {
        let before = d.work_counter();
        d.insert(&k(i), Vec::new()).unwrap();
        max_work = max_work.max(d.work_counter() - before);
        if d.is_rehashing() && !was_rehashing {
            resizes += 1;
        }
        was_rehashing = d.is_rehashing();
    }
    assert!(resizes >= 15, "{resizes}");
    assert!(
        max_work <= (REHASH_STEP * (EMPTY_VISITS_PER_STEP + 1)) as u64,
        "{max_work}"
    );
    // And the rehash keeps up: chains stay short on average.
    assert!(d.buckets() >= d.len());
}

#[test]
fn memory_estimate_returns_to_zero() {
    let mut d = Dict::new(0);
    for i in 0..10_000 {
        d.insert(&k(i), vec![0u8; 10]).unwrap();
    }
    assert!(d.bytes() > 10_000 * 10);
    d.update(&k(1), |v| v.extend_from_slice(&[1; 1000]))
        .unwrap();
    for i in 0..10_000 {
        d.remove(&k(i)).unwrap();
    }
    while d.rehash_step(100) {}
    let mut empty = Dict::new(0);
    empty.insert(b"x", Vec::new()).unwrap();
    empty.remove(b"x");
    // Only the small final table remains.
    assert!(
        d.bytes() <= empty.bytes() + 1024,
        "{} {}",
        d.bytes(),
        empty.bytes()
    );
}

#[test]
fn free_step_is_bounded_and_complete() {
    let mut d = Dict::new(0);
    for i in 0..20_000 {
        d.insert(&k(i), k(i)).unwrap();
    }
    let mut steps = 0;
    loop {
        let before = d.work_counter();
        let more = d.free_step(100);
        assert!(d.work_counter() - before <= 100 + 64);
        steps += 1;
        if !more {
            break;
        }
    }
    assert!(steps >= 200);
    assert_eq!(d.len(), 0);
    assert_eq!(d.bytes(), 0);
}

#[test]
fn reserve_empty_avoids_rehash() {
    let mut d = Dict::new(0);
    d.reserve_empty(10_000);
    for i in 0..10_000 {
        d.insert(&k(i), Vec::new()).unwrap();
        assert!(!d.is_rehashing());
    }
    d.reserve_empty(usize::MAX); // not empty: ignored
}

fn full_scan(d: &Dict) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut c = 0;
    loop {
        c = d.scan(c, |e| out.push(e.key().to_vec()));
        if c == 0 {
            return out;
        }
    }
}

#[test]
fn scan_empty_and_full() {
    let mut d = Dict::new(0);
    assert_eq!(d.scan(0, |_| panic!()), 0);
    for i in 0..1000 {
        d.insert(&k(i), Vec::new()).unwrap();
    }
    let got: BTreeSet<_> = full_scan(&d).into_iter().collect();
    assert_eq!(got.len(), 1000);
}

#[test]
fn scan_guarantee_across_grow_and_shrink() {
    // Keys present for the whole scan must all be returned, while other
    // keys are added (forcing growth) and removed (forcing shrinking)
    // between SCAN calls, including mid-rehash.
    for (seed, stable_n) in [(1u64, 300usize), (2, 3000)] {
        let mut d = Dict::new(seed);
        for i in 0..stable_n {
            d.insert(format!("stable:{i}").as_bytes(), Vec::new())
                .unwrap();
        }
        let mut seen = BTreeSet::new();
        let mut c = 0;
        let mut round = 0usize;
        loop {
            c = d.scan(c, |e| {
                seen.insert(e.key().to_vec());
            });
            // Grow for a while, then shrink.
            if round < 40 {
                for j in 0..500 {
                    d.insert(format!("tmp:{round}:{j}").as_bytes(), Vec::new())
                        .unwrap();
                }
            } else if round < 80 {
                for j in 0..500 {
                    d.remove(format!("tmp:{}:{j}", round - 40).as_bytes());
                }
            }
            round += 1;
            if c == 0 {
                break;
            }
        }
        for i in 0..stable_n {
            assert!(
                seen.contains(format!("stable:{i}").as_bytes()),
                "seed {seed} key {i}"
            );
        }
    }
}

#[test]
fn long_chain_drop_does_not_recurse() {
    // Build a 200k-long chain by hand and drop it.
    let mut head: Link = None;
    for _ in 0..200_000 {
        head = Some(Box::new(Entry {
            key: Box::new([]),
            val: Vec::new(),
            next: head,
        }));
    }
    drop(head);
}
