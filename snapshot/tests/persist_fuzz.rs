//! The state-file parser never panics: random bytes, and random mutations
//! of a valid file (with the length and checksum fixed up afterwards, so
//! mutations reach the field parser instead of stopping at the checksum).
//! 3 properties × 3000 cases = 9000 cases per run:
//! `cargo test -p snapvm-snapshot --test persist_fuzz` (PROPTEST_CASES overrides).

use proptest::prelude::*;
use snapvm_snapshot::persist::format::{self, decode, encode, ChunkEntry, Header, RegionEntry};

fn valid() -> Vec<u8> {
    let cs = 4096;
    let h = Header {
        chunk_size: cs,
        image_len: 5 * cs,
        regions: vec![
            RegionEntry {
                guest_addr: 0,
                len: 3 * cs,
                file_offset: 0,
            },
            RegionEntry {
                guest_addr: 1 << 32,
                len: 2 * cs,
                file_offset: 3 * cs,
            },
        ],
        chunks: (0..5)
            .map(|i| match i {
                1 | 3 => ChunkEntry::zero(),
                4 => ChunkEntry::inherited(0xdead_0004),
                _ => ChunkEntry::data(0xdead_0000 + i),
            })
            .collect(),
        // Version 2: the parent block and inherited chunks are fuzzed too.
        parent: Some(format::ParentRef {
            path: "snap-000001".into(),
            state_crc: 0x1234_5678,
            state_len: 999,
        }),
    };
    encode(&h, b"opaque vm state")
}

/// Makes the preamble length and trailing checksum consistent again.
fn fix_up(mut s: Vec<u8>) -> Vec<u8> {
    if s.len() >= 28 {
        let n = s.len() as u64;
        s[16..24].copy_from_slice(&n.to_le_bytes());
        let end = s.len() - 4;
        let crc = format::checksum(&s[..end]);
        s[end..].copy_from_slice(&crc.to_le_bytes());
    }
    s
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

fn apply(s: &mut Vec<u8>, m: &Mutation) {
    if s.is_empty() {
        return;
    }
    let at = |i: usize, s: &Vec<u8>| i % s.len();
    match m {
        Mutation::Flip(i, b) => {
            let i = at(*i, s);
            s[i] ^= b;
        }
        Mutation::Set(i, b) => {
            let i = at(*i, s);
            s[i] = *b;
        }
        Mutation::Truncate(i) => {
            let i = at(*i, s);
            s.truncate(i);
        }
        Mutation::Insert(i, v) => {
            let i = at(*i, s);
            s.splice(i..i, v.iter().copied());
        }
        Mutation::Remove(i, n) => {
            let i = at(*i, s);
            let e = (i + n).min(s.len());
            s.drain(i..e);
        }
    }
}

/// If the decoder accepts something, it must be internally consistent.
fn check(bytes: &[u8]) {
    if let Ok((h, blob)) = decode(bytes) {
        assert!(h.validate().is_ok());
        assert_eq!(encode(&h, &blob), bytes, "accepted input must re-encode");
    }
}

/// 3000 per property, or `PROPTEST_CASES` (an explicit `with_cases`
/// would otherwise ignore the variable).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn random_bytes_never_panic(
        prefix in any::<bool>(),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut s = if prefix { valid()[..12].to_vec() } else { Vec::new() };
        s.extend(body);
        check(&s);
        check(&fix_up(s));
    }

    #[test]
    fn mutated_file_never_panics(ms in prop::collection::vec(mutation(), 1..6)) {
        let mut s = valid();
        for m in &ms {
            apply(&mut s, m);
        }
        check(&s);
    }

    #[test]
    fn mutated_file_with_fixed_checksum_never_panics(
        ms in prop::collection::vec(mutation(), 1..6),
    ) {
        let mut s = valid();
        for m in &ms {
            apply(&mut s, m);
        }
        check(&fix_up(s));
    }
}

#[test]
fn valid_file_accepted() {
    let s = valid();
    let (h, blob) = decode(&s).expect("valid");
    assert_eq!(h.chunks.len(), 5);
    assert_eq!(blob, b"opaque vm state");
}
