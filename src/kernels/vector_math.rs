//! Element-wise f32 math in a form the compiler vectorizes, for the models' fused CPU ops
//! (the softmax of the attention and softmax ops, the cross-entropy loss and its gradient,
//! SiLU, RMSNorm): [`exp`], reductions in fixed-order lanes ([`max`], [`sum`], [`dot`],
//! [`dot3`], [`sum_exp`]), and [`on_widest_vectors`], which runs such loops compiled for
//! AVX-512F or AVX2 + FMA when the CPU has them (the crate's baseline is SSE2).
//!
//! `f32::exp` is a call into libm per element; [`exp`] computes Cephes' `expf` (range
//! reduction by `ln 2` in two parts, a degree-7 polynomial, the exponent put in by integer
//! arithmetic) with plain arithmetic and selects only, so a loop over a slice becomes vector
//! code (4 lanes with the baseline x86-64 SSE2, 8 or 16 under [`on_widest_vectors`]). The
//! relative error is below 1.2e-7, one f32 epsilon (8.0e-8 at worst over the 2 million
//! points the tests below check against f64), for every input from −86.98 up to
//! `ln f32::MAX` (88.72). Below −86.98 the result is 0 (the true value is below 2.2e-38;
//! libm gives it, as a subnormal below −87.34), above `ln f32::MAX` +∞, and NaN stays NaN.

use crate::kernels::{machine, Isa};

/// Runs `f` compiled for the widest vector instruction set this CPU has (AVX-512F, AVX2 +
/// FMA, else the baseline): an element-wise loop inlined into `f` (slice loops over
/// [`exp`] and plain arithmetic) becomes 16- or 8-lane vector code instead of the
/// baseline x86-64's 4 SSE2 lanes. The arithmetic is the same on every path (no
/// contraction into fused multiply-adds), so results do not depend on the set.
///
/// Mark the closure `#[inline(always)]`: one the compiler does not inline into the
/// wrapper is compiled for the baseline (an `exp` map and a sum in one closure ran at
/// 1.2 ns per element without the attribute and 0.43 with it, one Intel Xeon core).
#[inline(always)]
pub(crate) fn on_widest_vectors<R>(f: impl FnOnce() -> R) -> R {
    match machine().isa {
        // SAFETY: `machine()` reports a set only when the CPU has it.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => return unsafe { avx512(f) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => return unsafe { avx2(f) },
        // Elsewhere `machine()` reports the portable set only.
        _ => {}
    }
    f()
}

/// `f` compiled with AVX-512F.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `f` compiled with AVX2 and FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `ln 2` split in two: `LN2_HI` has few enough bits that `n · LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// Adding and subtracting `1.5 · 2²³` rounds an f32 of magnitude below 2²² to an integer.
const ROUND: f32 = 12_582_912.0;
/// Inputs below this give 0: from here up, `n ≥ −125`, so `2ⁿ⁻¹` is a normal f32.
const LOWEST: f32 = -86.98;
/// `ln f32::MAX`: inputs from here up give +∞.
const HIGHEST: f32 = 88.722_83;

/// `eˣ` (see the module docs for its accuracy and range).
///
/// Written for the vectorizer: no float-to-int conversion (Rust's saturating `as` is not
/// vectorized; the integer `n` is read from the bits of the rounded sum instead, with
/// wrapping arithmetic) and no branches, only selects. NaN propagates through the
/// arithmetic (the clamp keeps it, the selects do not replace it).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let clamped = x.clamp(LOWEST, HIGHEST);
    let t = clamped * LOG2_E + ROUND;
    let n = t - ROUND;
    // `t`'s bits are ROUND's plus n (|n| < 2²²), so this is n as an integer.
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits());
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
    let poly = p * r2 + r + 1.0;
    // 2ⁿ = 2 · 2ⁿ⁻¹, with n from −125 to 128: 2ⁿ⁻¹ is always a normal f32 (2¹²⁸ is not).
    let half_two_n = f32::from_bits(n_int.wrapping_add(126) << 23);
    let y = (poly * 2.0) * half_two_n;
    let y = if x < LOWEST { 0.0 } else { y };
    if x >= HIGHEST {
        f32::INFINITY
    } else {
        y
    }
}

/// Running sums and maxima are kept in this many lanes, added (or compared) in a fixed
/// order, so that reductions vectorize at any width up to 512-bit f32 vectors and their
/// results do not depend on the instruction set or the threads.
const LANES: usize = 16;

/// Elements per tile of [`sum_exp`]: its exponentials go to a stack buffer first.
const TILE: usize = 256;

/// The largest element of `xs` (−∞ for an empty slice; NaN elements are skipped, as
/// `f32::max` does).
#[inline(always)]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(x);
        }
    }
    lanes.iter().copied().fold(tail, f32::max)
}

/// `Σ xs` in [`LANES`] running sums.
#[inline(always)]
pub(crate) fn sum(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += x;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ a[i] · b[i]` over the shorter slice, in [`LANES`] running sums (`f32` here, `f64`
/// in the host linear algebra).
#[inline(always)]
pub(crate) fn dot<T>(a: &[T], b: &[T]) -> T
where
    T: Copy + Default + std::ops::Add<Output = T> + std::ops::Mul<Output = T> + std::iter::Sum,
{
    let len = a.len().min(b.len());
    let (a, b) = (
        a.get(..len).unwrap_or_default(),
        b.get(..len).unwrap_or_default(),
    );
    let mut lanes = [T::default(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: T = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x * y)
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for ((lane, &x), &y) in lanes.iter_mut().zip(xa).zip(xb) {
            *lane = *lane + x * y;
        }
    }
    lanes.iter().copied().sum::<T>() + tail
}

/// `Σ (x[i] − shift)²`, in [`LANES`] running sums (a row's centred sum of squares).
#[inline(always)]
pub(crate) fn sum_sq_dev(xs: &[f32], shift: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&x| (x - shift) * (x - shift))
        .sum();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += (x - shift) * (x - shift);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ (a[i] · b[i]) · c[i]` over the shortest slice, in [`LANES`] running sums.
#[inline(always)]
pub(crate) fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let len = a.len().min(b.len()).min(c.len());
    let a = a.get(..len).unwrap_or_default();
    let (b, c) = (
        b.get(..len).unwrap_or_default(),
        c.get(..len).unwrap_or_default(),
    );
    let mut lanes = [0f32; LANES];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let tail: f32 = (ca.remainder().iter().zip(cb.remainder()))
        .zip(cc.remainder())
        .map(|((x, y), z)| x * y * z)
        .sum();
    for ((xa, xb), xc) in ca.zip(cb).zip(cc) {
        for (((lane, &x), &y), &z) in lanes.iter_mut().zip(xa).zip(xb).zip(xc) {
            *lane += x * y * z;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ exp(x − shift)` over `xs`: each tile's exponentials into a stack buffer, then summed
/// ([`sum`]). Two loops, because one loop that both exponentiates and accumulates in lanes
/// is not vectorized (2.4 ms against 0.9 for 8,192 rows of 256 on one Intel Xeon core).
#[inline(always)]
pub(crate) fn sum_exp(xs: &[f32], shift: f32) -> f32 {
    let mut tile = [0f32; TILE];
    let mut total = 0f32;
    for chunk in xs.chunks(TILE) {
        let tile = tile.get_mut(..chunk.len()).unwrap_or_default();
        exp_into(tile, chunk, shift, 1.0);
        total += sum(tile);
    }
    total
}

/// `dst[i] = scale · exp(src[i] − shift)` (over the shorter of the two).
#[inline(always)]
pub(crate) fn exp_into(dst: &mut [f32], src: &[f32], shift: f32, scale: f32) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = scale * exp(x - shift);
    }
}

/// `xs[i] = scale · exp(xs[i] − shift)` in place.
#[inline(always)]
pub(crate) fn scaled_exp_in_place(xs: &mut [f32], shift: f32, scale: f32) {
    for x in xs.iter_mut() {
        *x = scale * exp(*x - shift);
    }
}

/// Soft-capping in place, `x ← cap · tanh(x / cap)` (−∞ stays −∞), each element's slope
/// `1 − tanh²` (0 for −∞) written to `slopes` (over the shorter of the two). `tanh` is
/// `1 − 2 / (e^(2x / cap) + 1)` from [`exp`]: branch-free, absolute error a few 1e-8.
#[inline(always)]
pub(crate) fn soft_cap_in_place(xs: &mut [f32], slopes: &mut [f32], cap: f32) {
    let k = 2.0 / cap;
    for (x, slope) in xs.iter_mut().zip(slopes.iter_mut()) {
        let th = 1.0 - 2.0 / (exp(*x * k) + 1.0);
        let masked = *x == f32::NEG_INFINITY;
        *slope = if masked { 0.0 } else { 1.0 - th * th };
        *x = if masked { f32::NEG_INFINITY } else { cap * th };
    }
}

/// `xs[i] = exp(xs[i] − shift)` in place; returns their sum ([`sum`]).
#[inline(always)]
pub(crate) fn exp_in_place_sum(xs: &mut [f32], shift: f32) -> f32 {
    scaled_exp_in_place(xs, shift, 1.0);
    sum(xs)
}

#[cfg(test)]
mod tests {
    use super::exp;

    /// `cap · tanh(x / cap)` and `1 − tanh²` against f64 on a grid, and the edges: ±∞
    /// (−∞ stays −∞ with slope 0, +∞ goes to the cap), NaN.
    #[test]
    fn soft_cap_is_tanh() {
        let cap = 30f32;
        let mut xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.05).collect();
        xs.extend([f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 1e-30, -1e-30]);
        let mut got = xs.clone();
        let mut slopes = vec![f32::NAN; xs.len()];
        super::soft_cap_in_place(&mut got, &mut slopes, cap);
        for ((&x, &g), &s) in xs.iter().zip(&got).zip(&slopes) {
            if x.is_nan() {
                assert!(g.is_nan());
                continue;
            }
            if x == f32::NEG_INFINITY {
                assert!(g == f32::NEG_INFINITY && s == 0.0);
                continue;
            }
            let th = (f64::from(x) / f64::from(cap)).tanh();
            let (want, want_slope) = (f64::from(cap) * th, 1.0 - th * th);
            // A few ulp of the cap (ulp(30) = 1.9e-6).
            assert!((f64::from(g) - want).abs() <= 1e-5, "{x}: {g} vs {want}");
            assert!(
                (f64::from(s) - want_slope).abs() <= 4e-7,
                "{x}: slope {s} vs {want_slope}"
            );
        }
    }

    /// Relative error against f64 `exp` on a dense grid over the normal range, and the
    /// edges: underflow to 0, overflow to +∞, NaN, −∞.
    #[test]
    fn exp_is_within_one_f32_epsilon_of_f64() {
        let mut worst = 0f64;
        let (lo, hi, steps) = (-86.98f64, 88.72f64, 2_000_000);
        for i in 0..=steps {
            let x = (lo + (hi - lo) * i as f64 / steps as f64) as f32;
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max((got - want).abs() / want);
        }
        for x in [0.0f32, -0.0, 1.0, -1.0, 1e-8, -1e-8, 0.5, 10.0, -10.0] {
            let want = f64::from(x).exp();
            worst = worst.max((f64::from(exp(x)) - want).abs() / want);
        }
        assert!(worst < 1.2e-7, "worst relative error {worst:e}");
        assert_eq!(exp(-87.0), 0.0);
        assert!(exp(88.72).is_finite());
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    /// The slice helpers equal the element-wise function, with tails shorter than 8.
    #[test]
    fn slice_helpers_match_the_scalar_function() {
        // Lengths below one lane block, with a lane tail, and past two tiles with a tail.
        for len in [0usize, 5, 21, 600] {
            let xs: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
            let shift = 1.5f32;
            let want: Vec<f32> = xs.iter().map(|&x| exp(x - shift)).collect();
            let want_sum: f64 = want.iter().map(|&v| f64::from(v)).sum();
            let got = super::sum_exp(&xs, shift);
            assert!(
                (f64::from(got) - want_sum).abs() <= 1e-5 * want_sum,
                "{len}"
            );
            let mut dst = vec![0f32; xs.len()];
            super::exp_into(&mut dst, &xs, shift, 2.0);
            let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
            assert_eq!(dst, twice);
            let mut inplace = xs.clone();
            let sum = super::exp_in_place_sum(&mut inplace, shift);
            assert_eq!(inplace, want);
            assert!(
                (f64::from(sum) - want_sum).abs() <= 1e-5 * want_sum,
                "{len}"
            );
            let plain: f64 = xs.iter().map(|&v| f64::from(v)).sum();
            let scale: f64 = xs.iter().map(|&v| f64::from(v.abs())).sum();
            assert!(
                (f64::from(super::sum(&xs)) - plain).abs() <= 1e-6 * scale,
                "{len}"
            );
            let want_max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(super::max(&xs), want_max, "{len}");
        }
        // Dot products against f64, lengths with and without a lane tail.
        for len in [0usize, 7, 16, 53] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.3).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7).cos()).collect();
            let c: Vec<f32> = (0..len).map(|i| 1.0 + i as f32 * 0.01).collect();
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            assert!((f64::from(super::dot(&a, &b)) - want).abs() < 1e-5, "{len}");
            let want3: f64 = (a.iter().zip(&b).zip(&c))
                .map(|((&x, &y), &z)| f64::from(x) * f64::from(y) * f64::from(z))
                .sum();
            assert!(
                (f64::from(super::dot3(&a, &b, &c)) - want3).abs() < 1e-5,
                "{len}"
            );
            let want_sq: f64 = c.iter().map(|&z| (f64::from(z) - 1.2).powi(2)).sum();
            assert!(
                (f64::from(super::sum_sq_dev(&c, 1.2)) - want_sq).abs() < 1e-5 * (1.0 + want_sq),
                "{len}"
            );
        }
        // The maximum skips NaN wherever it sits (a lane or the tail).
        let mut xs: Vec<f32> = (0..37).map(|i| i as f32).collect();
        xs[3] = f32::NAN;
        xs[36] = f32::NAN;
        assert_eq!(super::max(&xs), 35.0);
    }
}
