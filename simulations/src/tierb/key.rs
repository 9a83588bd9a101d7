//! 256-bit Kademlia keys as four big-endian words, so that `Ord` on the array is numeric order and
//! XOR distances compare lexicographically.

use rand::Rng;
use sha2::{Digest, Sha256};

use crate::rng::SimRng;

pub type Key = [u64; 4];

pub fn random_key(r: &mut SimRng) -> Key {
    [r.r#gen(), r.r#gen(), r.r#gen(), r.r#gen()]
}

/// The key of a byte string, as Tidings derives record keys: SHA-256.
pub fn hash_key(parts: &[&[u8]]) -> Key {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    let d = h.finalize();
    let mut k = [0u64; 4];
    for (i, w) in k.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[i * 8..i * 8 + 8]);
        *w = u64::from_be_bytes(b);
    }
    k
}

pub fn xor(a: &Key, b: &Key) -> Key {
    [a[0] ^ b[0], a[1] ^ b[1], a[2] ^ b[2], a[3] ^ b[3]]
}

/// Common prefix length in bits (256 when equal).
pub fn cpl(a: &Key, b: &Key) -> u32 {
    for i in 0..4 {
        let x = a[i] ^ b[i];
        if x != 0 {
            return i as u32 * 64 + x.leading_zeros();
        }
    }
    256
}

/// `k` with its first `bits` bits kept and the rest set to 0 (`ones = false`) or 1.
pub fn prefix_bound(k: &Key, bits: u32, ones: bool) -> Key {
    let mut out = *k;
    for (i, w) in out.iter_mut().enumerate() {
        let start = i as u32 * 64;
        let keep = bits.saturating_sub(start).min(64);
        let mask: u64 = if keep == 0 { 0 } else { u64::MAX << (64 - keep) };
        *w = if ones { (*w & mask) | !mask } else { *w & mask };
    }
    out
}

/// `k` with bit `i` (0 = most significant) flipped.
pub fn flip_bit(k: &Key, i: u32) -> Key {
    let mut out = *k;
    let (w, b) = ((i / 64) as usize, i % 64);
    if let Some(word) = out.get_mut(w) {
        *word ^= 1u64 << (63 - b);
    }
    out
}

/// A key that shares the first `bits` bits with `target` and is random after them.
pub fn key_near(target: &Key, bits: u32, r: &mut SimRng) -> Key {
    let rnd = random_key(r);
    let lo = prefix_bound(target, bits, false);
    let mask_lo = prefix_bound(&[u64::MAX; 4], bits, false);
    [
        lo[0] | (rnd[0] & !mask_lo[0]),
        lo[1] | (rnd[1] & !mask_lo[1]),
        lo[2] | (rnd[2] & !mask_lo[2]),
        lo[3] | (rnd[3] & !mask_lo[3]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::rng;

    #[test]
    fn prefix_helpers_agree_with_common_prefix_length() {
        let mut r = rng(3, 3);
        let t = random_key(&mut r);
        for bits in [0, 1, 17, 63, 64, 65, 130, 255] {
            let near = key_near(&t, bits, &mut r);
            assert!(cpl(&t, &near) >= bits);
            assert!(prefix_bound(&t, bits, false) <= near && near <= prefix_bound(&t, bits, true));
        }
        assert_eq!(cpl(&t, &flip_bit(&t, 70)), 70);
        assert_eq!(cpl(&t, &t), 256);
    }
}
