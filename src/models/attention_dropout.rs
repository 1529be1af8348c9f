//! Dropout on attention probabilities inside the fused attention op: which entries are
//! kept is a pure function of a per-call seed and the entry's index (SplitMix64's output
//! stream), so rows are dropped in parallel in any order and the choice can be recomputed
//! (the op's tests rebuild the mask for the composed reference).
//!
//! Each entry is kept when a uniform draw in `[0, 1)` (24 bits, as an f32 uniform has) is
//! at least `p`, and scaled by `1 / (1 − p)`: candle-nn's `dropout` and PyTorch's, in
//! distribution.

use rayon::prelude::*;

/// SplitMix64's increment (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Entries per parallel task.
const CHUNK: usize = 1 << 14;

/// Dropout with probability `p` on the entries of one call.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dropout {
    p: f32,
    seed: u64,
}

impl Dropout {
    /// Dropout with probability `p` and a fresh random seed; `None` for `p <= 0` (nothing
    /// dropped). Callers check `p < 1`.
    pub(super) fn new(p: f32) -> Option<Self> {
        (p > 0.0).then(|| Self::with_seed(p, rand::random()))
    }

    /// Dropout with probability `p` whose choices follow from `seed`.
    pub(super) fn with_seed(p: f32, seed: u64) -> Self {
        Self { p, seed }
    }

    /// Whether the entry at `index` is kept.
    pub(super) fn keeps(&self, index: usize) -> bool {
        let bits = mix(self.seed.wrapping_add((index as u64).wrapping_mul(GOLDEN)));
        // The top 24 bits as a uniform draw in [0, 1), exactly representable in f32.
        let uniform = (bits >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
        uniform >= self.p
    }

    /// `probs` with the dropped entries zero and the kept ones scaled by `1 / (1 − p)`.
    pub(super) fn apply(&self, probs: &[f32]) -> Vec<f32> {
        let scale = 1.0 / (1.0 - self.p);
        let mut out = vec![0f32; probs.len()];
        out.par_chunks_mut(CHUNK)
            .zip(probs.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(chunk, (dst, src))| {
                let first = chunk * CHUNK;
                for (i, (d, &p)) in dst.iter_mut().zip(src).enumerate() {
                    *d = if self.keeps(first + i) {
                        p * scale
                    } else {
                        0.0
                    };
                }
            });
        out
    }
}

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::Dropout;

    /// The kept share is `1 − p` within a few standard deviations, kept entries are scaled
    /// by `1 / (1 − p)`, and the choice depends on the seed.
    #[test]
    fn keeps_one_minus_p_and_scales_the_kept() {
        let n = 1 << 18;
        for p in [0.1f32, 0.5, 0.9] {
            let drop = Dropout::with_seed(p, 7);
            let out = drop.apply(&vec![1f32; n]);
            let kept = out.iter().filter(|&&x| x != 0.0).count();
            let want = f64::from(1.0 - p) * n as f64;
            let sd = (n as f64 * f64::from(p) * f64::from(1.0 - p)).sqrt();
            assert!(
                (kept as f64 - want).abs() < 5.0 * sd,
                "p {p}: kept {kept} of {n}"
            );
            let scale = 1.0 / (1.0 - p);
            assert!(out.iter().all(|&x| x == 0.0 || x == scale), "p {p}");
            for (i, &x) in out.iter().enumerate().take(1000) {
                assert_eq!(x != 0.0, drop.keeps(i), "p {p}, entry {i}");
            }
        }
        let (a, b) = (Dropout::with_seed(0.5, 1), Dropout::with_seed(0.5, 2));
        let differ = (0..1000).filter(|&i| a.keeps(i) != b.keeps(i)).count();
        assert!(
            (350..650).contains(&differ),
            "{differ} of 1000 choices differ"
        );
    }

    /// Neighbouring entries are independent: the share of kept pairs is `(1 − p)²`.
    #[test]
    fn neighbours_are_independent() {
        let (n, p) = (1usize << 18, 0.5f32);
        let drop = Dropout::with_seed(p, 12_345);
        let both = (0..n)
            .filter(|&i| drop.keeps(i) && drop.keeps(i + 1))
            .count();
        let want = 0.25 * n as f64;
        let sd = (n as f64 * 0.25 * 0.75).sqrt();
        assert!(
            (both as f64 - want).abs() < 6.0 * sd,
            "{both} of {n} pairs both kept"
        );
    }
}
