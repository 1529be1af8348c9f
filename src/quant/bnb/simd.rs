//! Whole blocks of 4-bit codes expanded into f32 values with AVX2: each block's 16 values
//! (`code · scale`, rounded to the weight's bf16 or f16) held in two 8-lane registers,
//! eight codes at a time turned into indices and looked up with two permutes and a blend.
//! The values are the portable expansion's, bit for bit.

use crate::cpu_features::avx2_fma_f16c;

/// How [`super::Bnb4Blocks::dequantize_into`] expands whole blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lanes {
    /// Plain Rust, a value at a time.
    Portable,
    /// AVX2 + FMA (and F16C), eight values at a time (x86-64 CPUs that report them).
    Avx2,
}

impl Lanes {
    /// The widest this CPU runs, no wider than `allowed`.
    pub(crate) fn best(allowed: Lanes) -> Lanes {
        match allowed {
            Lanes::Avx2 if avx2_fma_f16c() => Lanes::Avx2,
            _ => Lanes::Portable,
        }
    }
}

/// How dequantized values are rounded: to the quant state's dtype, held in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rounding {
    /// To the nearest bf16, ties to even.
    Bf16,
    /// To the nearest f16, ties to even (subnormals kept, overflow to infinity), as
    /// `half::f16::from_f32` rounds.
    F16,
    /// Not at all (an f32 weight).
    None,
}

/// Expands whole blocks with AVX2: `out` holds `scales.len()` blocks of `blocksize`
/// values (a multiple of 8), `packed` their codes, two a byte, the first in the high
/// nibble; each value rounded as `round` says. `false` (nothing written) when the sizes do
/// not fit or the CPU lacks AVX2 + FMA + F16C.
pub(crate) fn expand_blocks_avx2(
    packed: &[u8],
    scales: &[f32],
    code: &[f32; 16],
    blocksize: usize,
    round: Rounding,
    out: &mut [f32],
) -> bool {
    let fits = blocksize > 0
        && blocksize.is_multiple_of(8)
        && out.len() == scales.len() * blocksize
        && packed.len() * 2 == out.len();
    if !fits || !avx2_fma_f16c() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above), and the sizes fit (checked
        // above: every read and write below stays inside `packed`, `scales` and `out`).
        unsafe { x86::expand(packed, scales, code, blocksize, round, out) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (code, round);
        false
    }
}

/// `out[r] = Σ_k xs[r][k] · w_k` over whole blocks with AVX2, `w` the blocks' values (as
/// [`expand_blocks_avx2`] gives them), eight products at a time per input row, summed in
/// f32 (for at most [`MAX_DOT_ROWS`] rows). `false` (nothing written) when the sizes do not
/// fit or the CPU lacks AVX2 + FMA + F16C.
pub(crate) fn dot_blocks_avx2(
    packed: &[u8],
    scales: &[f32],
    code: &[f32; 16],
    blocksize: usize,
    round: Rounding,
    xs: &[&[f32]],
    out: &mut [f32],
) -> bool {
    let values = scales.len() * blocksize;
    let fits = blocksize > 0
        && blocksize.is_multiple_of(8)
        && packed.len() * 2 == values
        && xs.len() <= MAX_DOT_ROWS
        && out.len() == xs.len()
        && xs.iter().all(|x| x.len() == values);
    if !fits || !avx2_fma_f16c() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above), and the sizes fit (checked
        // above: every read below stays inside `packed`, `scales` and each `xs[r]`).
        unsafe { x86::dot(packed, scales, code, blocksize, round, xs, out) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (code, round);
        false
    }
}

/// Most input rows [`dot_blocks_avx2`] takes at once.
pub(crate) const MAX_DOT_ROWS: usize = 4;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Rounding;

    /// Rounds eight f32 to bf16 (ties to even; finite values), kept as f32.
    #[target_feature(enable = "avx2,fma")]
    fn round_bf16(v: __m256) -> __m256 {
        let bits = _mm256_castps_si256(v);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb);
        let rounded = _mm256_and_si256(
            _mm256_add_epi32(bits, bias),
            _mm256_set1_epi32(0xffff_0000_u32 as i32),
        );
        _mm256_castsi256_ps(rounded)
    }

    /// Rounds eight f32 to f16 (ties to even) and back: F16C's conversions, which keep
    /// subnormals and overflow to infinity as `half::f16::from_f32` does.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn round_f16(v: __m256) -> __m256 {
        _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
    }

    /// Block `b`'s 16 values in two registers (codes 0..8 and 8..16).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block_table(
        lo_code: __m256,
        hi_code: __m256,
        scale: f32,
        round: Rounding,
    ) -> (__m256, __m256) {
        let s = _mm256_set1_ps(scale);
        let (lo, hi) = (_mm256_mul_ps(lo_code, s), _mm256_mul_ps(hi_code, s));
        match round {
            Rounding::Bf16 => (round_bf16(lo), round_bf16(hi)),
            Rounding::F16 => (round_f16(lo), round_f16(hi)),
            Rounding::None => (lo, hi),
        }
    }

    /// The eight values whose codes are the four bytes `four` (high nibble first).
    #[target_feature(enable = "avx2,fma")]
    fn lookup(four: i32, lo: __m256, hi: __m256) -> __m256 {
        // Bytes b0..b3 to b0 b0 b1 b1 b2 b2 b3 b3.
        let duplicate = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1);
        let bytes = _mm_shuffle_epi8(_mm_cvtsi32_si128(four), duplicate);
        let idx = _mm256_and_si256(
            _mm256_srlv_epi32(
                _mm256_cvtepu8_epi32(bytes),
                _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0),
            ),
            _mm256_set1_epi32(0x0f),
        );
        let from_lo = _mm256_permutevar8x32_ps(lo, idx);
        let from_hi = _mm256_permutevar8x32_ps(hi, idx);
        // Bit 3 of the code picks the high half.
        let high_half = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
        _mm256_blendv_ps(from_lo, from_hi, high_half)
    }

    /// The sum of eight lanes.
    #[target_feature(enable = "avx2,fma")]
    fn sum_lanes(v: __m256) -> f32 {
        let halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps::<1>(pairs, pairs)))
    }

    /// See [`super::dot_blocks_avx2`].
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `blocksize` is a positive multiple of 8, `packed.len() ·
    /// 2 == scales.len() · blocksize == xs[r].len()` for every `r`, `xs.len() ==
    /// out.len() <= 4`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot(
        packed: &[u8],
        scales: &[f32],
        code: &[f32; 16],
        blocksize: usize,
        round: Rounding,
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        // SAFETY (every access below): `code` has 16 values; value `at` of the blocks is
        // inside each `xs[r]`, its code in byte `at / 2` of `packed`; each step reads 4
        // bytes and 8 floats at offsets below the blocks' end.
        let (lo_code, hi_code) = unsafe {
            (
                _mm256_loadu_ps(code.as_ptr()),
                _mm256_loadu_ps(code.as_ptr().add(8)),
            )
        };
        let mut acc = [_mm256_setzero_ps(); super::MAX_DOT_ROWS];
        for (b, &scale) in scales.iter().enumerate() {
            let (lo, hi) = block_table(lo_code, hi_code, scale, round);
            let first = b * blocksize;
            for at in (first..first + blocksize).step_by(8) {
                let four = unsafe { packed.as_ptr().add(at / 2).cast::<i32>().read_unaligned() };
                let w = lookup(four, lo, hi);
                for (a, x) in acc.iter_mut().zip(xs) {
                    let x = unsafe { _mm256_loadu_ps(x.as_ptr().add(at)) };
                    *a = _mm256_fmadd_ps(w, x, *a);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = sum_lanes(a);
        }
    }

    /// See [`super::expand_blocks_avx2`].
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `blocksize` is a positive multiple of 8, `out.len() ==
    /// scales.len() · blocksize` and `packed.len() · 2 == out.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn expand(
        packed: &[u8],
        scales: &[f32],
        code: &[f32; 16],
        blocksize: usize,
        round: Rounding,
        out: &mut [f32],
    ) {
        // SAFETY (every access below): `code` has 16 values; block `b`'s codes are bytes
        // `b · blocksize / 2 ..` of `packed` and its values `b · blocksize ..` of `out`,
        // inside both by the caller's sizes; each step reads 4 bytes and writes 8 floats
        // at an offset that is a multiple of 4 (8) below the block's end.
        let (lo_code, hi_code) = unsafe {
            (
                _mm256_loadu_ps(code.as_ptr()),
                _mm256_loadu_ps(code.as_ptr().add(8)),
            )
        };
        for (b, &scale) in scales.iter().enumerate() {
            let (lo, hi) = block_table(lo_code, hi_code, scale, round);
            let first = b * blocksize;
            for at in (first..first + blocksize).step_by(8) {
                let four = unsafe { packed.as_ptr().add(at / 2).cast::<i32>().read_unaligned() };
                let w = lookup(four, lo, hi);
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(at), w) };
            }
        }
    }
}
