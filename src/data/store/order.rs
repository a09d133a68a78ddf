//! The row order of a training epoch: a seeded pseudo-random permutation of all rows of the
//! store, computed one position at a time in O(1) memory, so it costs nothing at 1.28 M rows and
//! does not depend on how the rows are stored (a class-sorted store is mixed as well as any).
//!
//! The permutation is a 4-round Feistel network on the smallest even-width bit domain holding the
//! rows (at most 4× their count), with out-of-range values walked through the cycle until they
//! land in range: a bijection of 0..n for every (seed, epoch). Resuming at any step recomputes
//! the same order without touching data.

use std::ops::Range;

/// The order of one epoch: `row(position)` for position in 0..n.
#[derive(Clone, Debug)]
pub struct EpochOrder {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl EpochOrder {
    /// The order of epoch `epoch` of a store of `n` rows, fixed by `seed`.
    pub fn new(n: usize, seed: u64, epoch: u64) -> Self {
        let bits = (usize::BITS - n.saturating_sub(1).leading_zeros()).max(2);
        let half_bits = bits.div_ceil(2);
        let base = mix(mix(seed) ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
        let keys = [mix(base), mix(base ^ 1), mix(base ^ 2), mix(base ^ 3)];
        Self { n: n as u64, half_bits, keys }
    }

    pub fn len(&self) -> usize {
        self.n as usize
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The store row visited at `position` (< len).
    pub fn row(&self, position: usize) -> u32 {
        debug_assert!((position as u64) < self.n);
        let mut x = position as u64;
        loop {
            x = self.feistel(x);
            if x < self.n {
                return x as u32;
            }
        }
    }

    /// The rows visited at `positions`.
    pub fn rows(&self, positions: Range<usize>) -> Vec<u32> {
        positions.map(|p| self.row(p)).collect()
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (x >> self.half_bits, x & mask);
        for key in self.keys {
            (left, right) = (right, left ^ (mix(right ^ key) & mask));
        }
        (left << self.half_bits) | right
    }
}

/// SplitMix64 finaliser: a well-mixing 64-bit hash.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_permutation(order: &EpochOrder) -> bool {
        let n = order.len();
        let mut seen = vec![false; n];
        (0..n).all(|p| {
            let r = order.row(p) as usize;
            r < n && !std::mem::replace(&mut seen[r], true)
        })
    }

    #[test]
    fn is_a_deterministic_permutation_that_changes_per_epoch_and_seed() {
        for n in [1, 2, 3, 5, 16, 17, 1000, 65_537, 1_281_167] {
            let order = EpochOrder::new(n, 7, 0);
            assert!(is_permutation(&order), "n = {n}");
            if n > 16 {
                let a = order.rows(0..16);
                assert_eq!(a, EpochOrder::new(n, 7, 0).rows(0..16));
                assert_ne!(a, EpochOrder::new(n, 7, 1).rows(0..16));
                assert_ne!(a, EpochOrder::new(n, 8, 0).rows(0..16));
            }
        }
        assert!(EpochOrder::new(0, 1, 0).is_empty());
    }

    #[test]
    fn positions_spread_over_the_store() {
        // Rows of one batch come from all over a store (no trace of the stored order): the mean
        // row of each batch of 1,000 is near the store's middle.
        let n = 100_000;
        let order = EpochOrder::new(n, 3, 0);
        for b in 0..100 {
            let rows = order.rows(b * 1000..(b + 1) * 1000);
            let mean = rows.iter().map(|&r| r as f64).sum::<f64>() / 1000.0;
            // σ of the mean of 1,000 uniform rows ≈ n/√12/√1000 ≈ 913; allow 5σ.
            assert!((mean - n as f64 / 2.0).abs() < 4600.0, "batch {b}: mean row {mean}");
        }
    }

    #[test]
    fn mixes_a_class_sorted_store_like_a_uniform_shuffle() {
        // 200,000 rows stored sorted by class (1,000 classes of 200), batches of 2,048: a uniform
        // shuffle puts ≈ 1000·(1 − (1 − 1/1000)^2048) ≈ 871 distinct classes in each batch. The
        // Feistel order must match a true Fisher–Yates shuffle batch for batch.
        use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
        let (n, classes, b) = (200_000usize, 1000usize, 2048usize);
        let class = |row: u32| row as usize * classes / n;
        let distinct = |rows: &[u32]| {
            let mut seen = vec![false; classes];
            rows.iter().filter(|&&r| !std::mem::replace(&mut seen[class(r)], true)).count()
        };
        let stats = |per_batch: Vec<usize>| {
            let mean = per_batch.iter().sum::<usize>() as f64 / per_batch.len() as f64;
            (mean, *per_batch.iter().min().unwrap())
        };
        let order = EpochOrder::new(n, 11, 0);
        let feistel =
            stats((0..n / b).map(|i| distinct(&order.rows(i * b..(i + 1) * b))).collect());
        let mut shuffled: Vec<u32> = (0..n as u32).collect();
        shuffled.shuffle(&mut StdRng::seed_from_u64(11));
        let fisher_yates = stats(shuffled.chunks_exact(b).map(distinct).collect());
        let expected = classes as f64 * (1.0 - (1.0 - 1.0 / classes as f64).powi(b as i32));
        // The mean over 97 batches has σ ≈ 0.6 classes; the worst batch is ≈ 3σ of one batch low.
        assert!((fisher_yates.0 - expected).abs() < 3.0, "Fisher–Yates {fisher_yates:?}");
        assert!((feistel.0 - expected).abs() < 3.0, "Feistel {feistel:?} vs {expected:.1}");
        assert!(
            feistel.1 + 15 >= fisher_yates.1,
            "Feistel {feistel:?}, Fisher–Yates {fisher_yates:?}"
        );
    }
}
