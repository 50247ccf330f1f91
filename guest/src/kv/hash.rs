//! A small seeded hash for the keyspace.
//!
//! std's `RandomState` (SipHash) is unavailable without std and slower than
//! needed for short keys; this is the folded-multiply construction used by
//! wyhash/ahash's fallback: one 64x64->128 multiply per 8 input bytes, a
//! strong final mix, and a seed so bucket placement is not fixed across boots.

const P0: u64 = 0xa076_1d64_78bd_642f;
const P1: u64 = 0xe703_7ed1_a0b4_28db;
const P2: u64 = 0x8ebc_6af0_9c88_c6e3;

#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

#[inline]
fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Hashes `data` with `seed`.
pub fn hash_bytes(seed: u64, data: &[u8]) -> u64 {
    let mut h = seed ^ P0 ^ (data.len() as u64).wrapping_mul(P1);
    let mut chunks = data.chunks_exact(16);
    for c in &mut chunks {
        h = fold_mul(read_u64(c) ^ P1, read_u64(&c[8..]) ^ h);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        // Pad the tail to 16 bytes; the length mixed in above keeps
        // "a" and "a\0" apart.
        let mut tail = [0u8; 16];
        tail[..rest.len()].copy_from_slice(rest);
        h = fold_mul(read_u64(&tail) ^ P1, read_u64(&tail[8..]) ^ h);
    }
    fold_mul(h ^ P2, h.rotate_left(29) ^ P0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_and_seeded() {
        assert_ne!(hash_bytes(0, b"a"), hash_bytes(0, b"a\0"));
        assert_ne!(hash_bytes(0, b""), hash_bytes(0, b"\0"));
        assert_ne!(hash_bytes(1, b"key"), hash_bytes(2, b"key"));
        assert_eq!(hash_bytes(7, b"key:1"), hash_bytes(7, b"key:1"));
    }

    #[test]
    fn low_bits_spread_for_sequential_keys() {
        // Bucket index uses the low bits; sequential keys must spread evenly.
        let mut counts = [0u32; 64];
        for i in 0..64_000u32 {
            let k = alloc::format!("key:{i}");
            counts[(hash_bytes(0, k.as_bytes()) & 63) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{c}");
        }
    }
}
