//! The row order of a training epoch over a sharded store: shards in a shuffled order, their rows
//! streamed through a shuffle buffer. It is computed from indices alone, so resuming at batch b
//! of epoch e recomputes the order and skips b batches — no data is touched.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// A permutation of `0..sum(shard_rows)`, fixed by (`seed`, `epoch`). Reading in this order
/// touches the shards one after another, keeping the memory-mapped reads mostly sequential.
pub fn epoch_order(shard_rows: &[usize], seed: u64, epoch: u64, shuffle_buffer: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(mix(seed) ^ epoch);
    let mut starts = Vec::with_capacity(shard_rows.len());
    let mut total = 0usize;
    for &rows in shard_rows {
        starts.push(total);
        total += rows;
    }
    let mut shards: Vec<usize> = (0..shard_rows.len()).collect();
    shards.shuffle(&mut rng);

    let capacity = shuffle_buffer.max(1);
    let mut buffer: Vec<u32> = Vec::with_capacity(capacity.min(total));
    let mut order = Vec::with_capacity(total);
    for &s in &shards {
        for row in starts[s]..starts[s] + shard_rows[s] {
            let row = row as u32;
            if buffer.len() < capacity {
                buffer.push(row);
            } else {
                let slot = rng.random_range(0..capacity);
                order.push(std::mem::replace(&mut buffer[slot], row));
            }
        }
    }
    // Drain in random order.
    buffer.shuffle(&mut rng);
    order.extend(buffer);
    order
}

/// SplitMix64 finaliser: spreads the seed so that (seed, epoch) pairs do not collide by xor.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_permutation(order: &[u32], n: usize) -> bool {
        let mut seen = vec![false; n];
        order.len() == n
            && order
                .iter()
                .all(|&r| (r as usize) < n && !std::mem::replace(&mut seen[r as usize], true))
    }

    #[test]
    fn is_a_deterministic_permutation_that_changes_per_epoch() {
        let shards = [100, 100, 37];
        for buffer in [0, 1, 16, 1000] {
            let a = epoch_order(&shards, 7, 0, buffer);
            assert!(is_permutation(&a, 237), "buffer {buffer}");
            assert_eq!(a, epoch_order(&shards, 7, 0, buffer));
            assert_ne!(a, epoch_order(&shards, 7, 1, buffer));
            assert_ne!(a, epoch_order(&shards, 8, 0, buffer));
        }
    }

    #[test]
    fn a_small_buffer_keeps_rows_near_their_shard() {
        // With a buffer of 1 the rows of each shard come out in order, shard by shard.
        let order = epoch_order(&[5, 5], 1, 0, 1);
        let first = order[0] / 5;
        assert_eq!(order[..5].iter().map(|r| r / 5).collect::<Vec<_>>(), vec![first; 5]);
        assert!(order[..5].windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn empty_input_gives_an_empty_order() {
        assert!(epoch_order(&[], 1, 0, 8).is_empty());
    }
}
