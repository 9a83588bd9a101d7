//! Every random number in a run comes from ChaCha seeded by (seed, stream): never from the OS.
//!
//! Each concern draws from its own stream, so adding draws to one (say, the workload) leaves the
//! others (churn, population) unchanged; per-node streams make results independent of the order in
//! which nodes happen to be visited.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The generator used everywhere.
pub type SimRng = ChaCha8Rng;

/// Stream identifiers. A per-node stream is `base | node`.
pub mod stream {
    pub const POPULATION: u64 = 1;
    pub const CHURN: u64 = 2;
    pub const WORKLOAD: u64 = 3;
    pub const NETWORK: u64 = 4;
    pub const KAD: u64 = 5;
    pub const FAULTS: u64 = 6;
    pub const ADVERSARY: u64 = 7;
    /// Routing-table builds: `KAD_TABLE | (node << 20) | build number`.
    pub const KAD_TABLE: u64 = 1 << 62;
}

/// A generator for (seed, stream).
pub fn rng(seed: u64, stream: u64) -> SimRng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

/// Exponential with the given mean.
pub fn exp(r: &mut SimRng, mean: f64) -> f64 {
    let u: f64 = r.r#gen::<f64>();
    -mean * (1.0 - u).ln()
}

/// Weibull with shape `k` and scale `lambda`.
pub fn weibull(r: &mut SimRng, k: f64, lambda: f64) -> f64 {
    let u: f64 = r.r#gen::<f64>();
    lambda * (-(1.0 - u).ln()).powf(1.0 / k)
}

/// An index drawn with probability proportional to `weights` (which must not all be zero).
pub fn weighted(r: &mut SimRng, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut x = r.r#gen::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    weights.iter().rposition(|w| *w > 0.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_stream_give_the_same_numbers() {
        let a: Vec<u64> = (0..4).map(|_| rng(7, stream::CHURN).r#gen()).collect();
        let mut r1 = rng(7, stream::CHURN);
        let mut r2 = rng(7, stream::CHURN);
        let mut r3 = rng(7, stream::WORKLOAD);
        let x: u64 = r1.r#gen();
        assert_eq!(x, r2.r#gen::<u64>());
        assert_ne!(x, r3.r#gen::<u64>());
        assert_eq!(a[0], a[1]);
    }

    #[test]
    fn weighted_choice_never_picks_zero_weights() {
        let mut r = rng(1, 1);
        for _ in 0..1000 {
            assert_ne!(weighted(&mut r, &[0.0, 1.0, 0.0, 2.0]) % 2, 0);
        }
    }
}
