//! Dropout inside the fused ops (the attention op's probabilities, the fused linear's
//! low-rank input): which entries are kept is a pure function of a per-call 64-bit seed
//! and the entry's index (a counter-based generator: two rounds of Chris Wellons'
//! `lowbias32` integer hash, keyed by the seed's halves), so entries are dropped in
//! parallel in any order, and a backward recomputes the choice instead of keeping a mask
//! (the ops' tests rebuild it for their composed references). The hash is 32-bit integer
//! arithmetic, which vectorizes on AVX2 and AVX-512 (in a scratch timing on an AMD EPYC
//! Zen 4, one round over 512 Ki entries took 0.10 ms on one thread, where a 64-bit
//! SplitMix64 loop took 0.75 ms).
//!
//! Each entry is kept when a uniform draw in `[0, 1)` (24 bits, as an f32 uniform has) is
//! at least `p`, and scaled by `1 / (1 − p)`: candle-nn's `dropout` and PyTorch's, in
//! distribution.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Entries per parallel task.
const CHUNK: usize = 1 << 14;

/// Dropout with probability `p` on the entries of one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dropout {
    p: f32,
    seed: u64,
    /// An entry is kept when the top 24 bits of its hash are at least this: `⌈p · 2²⁴⌉`
    /// (the 24-bit uniform draw `k / 2²⁴ ≥ p` exactly when `k ≥ ⌈p · 2²⁴⌉`).
    threshold: u32,
}

impl Dropout {
    /// Dropout with probability `p` and a fresh random seed; `None` for `p <= 0` (nothing
    /// dropped). Callers check `p < 1`.
    pub(crate) fn new(p: f32) -> Option<Self> {
        (p > 0.0).then(|| Self::with_seed(p, rand::random()))
    }

    /// Dropout with probability `p` whose choices follow from `seed`.
    pub(crate) fn with_seed(p: f32, seed: u64) -> Self {
        let threshold = (f64::from(p) * f64::from(1u32 << 24)).ceil() as u32;
        Self { p, seed, threshold }
    }

    /// Whether the entry at `index` is kept: the top 24 bits of its hash, a uniform draw
    /// in `[0, 1)` at f32's resolution, are at least `p`. Branch-free integer arithmetic,
    /// so loops over it vectorize.
    #[inline(always)]
    pub(crate) fn keeps(&self, index: usize) -> bool {
        let index = index as u64;
        let (low, high) = (index as u32, (index >> 32) as u32);
        let (key_low, key_high) = (self.seed as u32, (self.seed >> 32) as u32);
        let bits = lowbias32(lowbias32(low ^ key_low) ^ key_high ^ high);
        bits >> 8 >= self.threshold
    }

    /// Entries `0..len` as factors: the scale where kept, 0 where dropped (the tests'
    /// reference for the fused ops' dropout).
    #[cfg(test)]
    pub(crate) fn factors(&self, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                if self.keeps(i) {
                    self.scale() as f32
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// The factor kept entries are scaled by, `1 / (1 − p)`.
    pub(crate) fn scale(&self) -> f64 {
        1.0 / (1.0 - f64::from(self.p))
    }

    /// `src` with the dropped entries zero and the kept ones scaled by `1 / (1 − p)`; entry
    /// `i` of `src` is entry `first + i` of the call.
    pub(crate) fn apply<T: WithDType>(&self, src: &[T], first: usize) -> Vec<T> {
        let mut out = vec![T::zero(); src.len()];
        self.add_kept(&mut out, src, first);
        out
    }

    /// `dst += keep ⊙ src / (1 − p)`, entry `i` being entry `first + i` of the call (the
    /// backward of dropout, added onto a gradient).
    pub(crate) fn add_kept<T: WithDType>(&self, dst: &mut [T], src: &[T], first: usize) {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(chunk, (dst, src))| self.add_kept_run(dst, src, first + chunk * CHUNK));
    }

    /// [`Dropout::add_kept`] on the calling thread.
    ///
    /// The loop vectorizes (the hash in 32-bit lanes, the factor a select between two
    /// values) because its closure owns copies of the dropout, the scale and zero (`move`).
    /// Borrowing them, as it did until 2026-12-07, the compiler chose between the two
    /// factors' addresses and loaded the one chosen, and the loop stayed scalar: 17% of the
    /// samples in a `perf` profile of LoRA steps with dropout on an AMD EPYC Zen 4; the step
    /// took 0.85–0.86 × the time once it vectorized (medians; 0.88 by minima;
    /// `benches/RESULTS.md`, "LoRA's dropout, vectorized").
    pub(crate) fn add_kept_run<T: WithDType>(&self, dst: &mut [T], src: &[T], first: usize) {
        let (dropout, scale, zero) = (*self, T::from_f64(self.scale()), T::zero());
        crate::kernels::vector_math::on_widest_vectors(
            #[inline(always)]
            move || {
                for (i, (d, &x)) in dst.iter_mut().zip(src).enumerate() {
                    let factor = if dropout.keeps(first + i) {
                        scale
                    } else {
                        zero
                    };
                    *d += x * factor;
                }
            },
        );
    }
}

/// `x` with each entry zeroed with probability `p` (in `[0, 1)`; callers check it) and
/// the rest scaled by `1 / (1 − p)`, differentiable: candle-nn's `dropout`, its choices
/// drawn by [`Dropout`] for f32 and f64 CPU tensors (one parallel pass each way, no mask
/// kept: the backward draws it again), candle-nn's own elsewhere.
pub(crate) fn dropout(x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
    let fused = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    match Dropout::new(p as f32) {
        None => Ok(x.clone()),
        Some(dropout) if fused => x.contiguous()?.apply_op1(DropoutOp(dropout)),
        Some(_) => candle_nn::ops::dropout(x, p as f32),
    }
}

/// [`dropout`] as a candle op: its own backward is the same mask on the gradient.
struct DropoutOp(Dropout);

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "lorakit-dropout"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("dropout: the input must be contiguous")
        };
        let out = match storage {
            CpuStorage::F32(data) => CpuStorage::F32(self.0.apply(in_range(data, start, end)?, 0)),
            CpuStorage::F64(data) => CpuStorage::F64(self.0.apply(in_range(data, start, end)?, 0)),
            _ => candle_core::bail!("dropout: f32 or f64 tensors only"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// `data[start..end]`, or an error naming the overrun.
fn in_range<T>(data: &[T], start: usize, end: usize) -> candle_core::Result<&[T]> {
    match data.get(start..end) {
        Some(slice) => Ok(slice),
        None => candle_core::bail!(
            "dropout: elements {start}..{end} outside a buffer of {}",
            data.len()
        ),
    }
}

/// Chris Wellons' `lowbias32`: a bijection on `u32` with low avalanche bias (from his
/// hash-prospector search).
#[inline(always)]
fn lowbias32(mut z: u32) -> u32 {
    z ^= z >> 16;
    z = z.wrapping_mul(0x7feb_352d);
    z ^= z >> 15;
    z = z.wrapping_mul(0x846c_a68b);
    z ^ (z >> 16)
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
            let out = drop.apply(&vec![1f32; n], 0);
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
            // An offset call continues the same stream.
            let tail = drop.apply(&vec![1f32; 100], n - 100);
            assert_eq!(tail, out[n - 100..], "p {p}");
        }
        let (a, b) = (Dropout::with_seed(0.5, 1), Dropout::with_seed(0.5, 2));
        let differ = (0..1000).filter(|&i| a.keeps(i) != b.keeps(i)).count();
        assert!(
            (350..650).contains(&differ),
            "{differ} of 1000 choices differ"
        );
    }

    /// Adding the kept entries onto a destination is, entry by entry, `d + x · factor` with
    /// the factor `1 / (1 − p)` or 0 as [`Dropout::keeps`] says, bit for bit (no fused
    /// multiply-add, no other order), over a run of indices that crosses 2³² from an offset
    /// that is not a multiple of any vector width, for f32 and f64. It checks the vector set
    /// the process runs on (`LORAKIT_CPU_ISA=avx2` or `scalar` for the others), and the
    /// vector code itself only in an optimized build (`cargo test --release`, which CI
    /// runs too: the test profile's `opt-level` 1 does not vectorize loops).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn adding_the_kept_is_the_per_entry_arithmetic_bit_for_bit() {
        fn check<T: candle_core::WithDType + std::fmt::Debug>(isa: &str) {
            let drop = Dropout::with_seed(0.3, 99);
            let (n, first) = (1000, (1usize << 32) - 13);
            let src: Vec<T> = (0..n)
                .map(|i| T::from_f64((i as f64 * 0.37).sin()))
                .collect();
            let start: Vec<T> = (0..n)
                .map(|i| T::from_f64((i as f64 * 0.11).cos()))
                .collect();
            let mut dst = start.clone();
            drop.add_kept_run(&mut dst, &src, first);
            let scale = T::from_f64(drop.scale());
            for i in 0..n {
                let factor = if drop.keeps(first + i) {
                    scale
                } else {
                    T::zero()
                };
                let want = start[i] + src[i] * factor;
                assert_eq!(
                    dst[i].to_f64().to_bits(),
                    want.to_f64().to_bits(),
                    "{isa} {i}"
                );
            }
        }
        let isa = format!("{:?}", crate::kernels::machine().isa);
        check::<f32>(&isa);
        check::<f64>(&isa);
    }

    /// As a candle op: the kept entries scaled, the dropped ones zero, and the gradient the
    /// same mask (the backward draws the forward's choices again); a strided input is
    /// dropped as its contiguous copy; p = 0 is the identity.
    #[test]
    fn the_op_masks_the_gradient_as_the_value() {
        let dev = candle_core::Device::Cpu;
        let x = candle_core::Var::from_tensor(
            &candle_core::Tensor::rand(1f32, 2.0, (64, 48), &dev).unwrap(),
        )
        .unwrap();
        let y = super::dropout(&x.as_tensor().t().unwrap(), 0.25).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let dx = grads.get(x.as_tensor()).unwrap().t().unwrap();
        let (y, dx) = (
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            dx.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let x_t = x
            .as_tensor()
            .t()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let kept = y.iter().filter(|&&v| v != 0.0).count();
        assert!((2000..2600).contains(&kept), "{kept} of {} kept", y.len());
        for ((&yv, &g), &xv) in y.iter().zip(&dx).zip(&x_t) {
            if yv == 0.0 {
                assert_eq!(g, 0.0);
            } else {
                assert!((yv - xv / 0.75).abs() < 1e-6 && (g - 1.0 / 0.75).abs() < 1e-6);
            }
        }
        let same = super::dropout(x.as_tensor(), 0.0).unwrap();
        let diff = (same - x.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
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
