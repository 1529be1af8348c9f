//! The k-quant blocks read in place. Q4_K and Q5_K: 8 groups of 32, `w = a_g · q − b_g`
//! with 4-bit `q` (plus a fifth bit for Q5_K); Q6_K: 16 groups of 16, `w = a_g · (q − 32)`
//! with 6-bit `q`. Per group and input row the kernel sums `x · q` (small integers
//! converted to f32) and scales the sum by `a_g` once; the offsets (`b_g · Σ x`, `32 a_g ·
//! Σ x`) come from the per-call group sums, one multiply-add per 8 groups.

use std::arch::x86_64::{
    __m256, __m256i, _mm256_and_si256, _mm256_cvtepi32_ps, _mm256_cvtepu8_epi32, _mm256_fmadd_ps,
    _mm256_fnmadd_ps, _mm256_mul_ps, _mm256_or_si256, _mm256_permutevar8x32_ps, _mm256_set1_epi32,
    _mm256_set1_ps, _mm256_setzero_ps, _mm256_slli_epi32, _mm256_srl_epi32, _mm256_srli_epi32,
    _mm_cvtsi32_si128, _mm_cvtsi64_si128,
};

use super::super::super::unpack::{k4_scale_bytes, Block, Q4K, Q5K, Q6K};
use super::{bytes8, half_lanes, signed_bytes8, total, x8, Acc, InPlace};

/// `a` (8 lanes) in all 8 lanes, from lane `lane`.
#[target_feature(enable = "avx2")]
#[inline]
fn lane(a: __m256, lane: usize) -> __m256 {
    _mm256_permutevar8x32_ps(a, _mm256_set1_epi32(lane as i32))
}

/// `v >> bits` in every 32-bit lane (`bits` < 32).
#[target_feature(enable = "avx2")]
#[inline]
fn shift_right(v: __m256i, bits: usize) -> __m256i {
    _mm256_srl_epi32(v, _mm_cvtsi32_si128(bits as i32))
}

/// The `(d · sc, dmin · m)` of a Q4_K / Q5_K block's 8 groups as two 8-lane vectors
/// ([`k4_scale_bytes`] widened), each product exact in f32 as in candle's `to_float`.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn k4_scales(block: &[u8]) -> (__m256, __m256) {
    let (scales, mins) = k4_scale_bytes(block);
    let lanes =
        |bytes: u64| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes as i64)));
    (
        _mm256_mul_ps(half_lanes(block, 0), lanes(scales)),
        _mm256_mul_ps(half_lanes(block, 2), lanes(mins)),
    )
}

/// The Q4_K / Q5_K layout, which differ only in Q5_K's fifth bit per value.
trait K4Layout: Block {
    /// Whether the block has the 32 high-bit bytes `qh` (Q5_K) before its nibbles.
    const FIFTH_BIT: bool;
}

impl K4Layout for Q4K {
    const FIFTH_BIT: bool = false;
}

impl K4Layout for Q5K {
    const FIFTH_BIT: bool = true;
}

/// Q4_K (nibbles at byte 16) or Q5_K (high bits `qh` at 16, nibbles at 48). Bytes
/// `qs + 32j .. qs + 32j + 32` hold group `2j` in their low nibbles and group `2j + 1` in
/// their high ones; Q5_K's fifth bits are bits `2j`, `2j + 1` of `qh[l]`.
impl<B: K4Layout> InPlace for B {
    const SUM_GROUP: Option<usize> = Some(32);

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block<const N: usize>(
        block: &[u8],
        at: usize,
        xs: &[&[f32]; N],
        sums: &[&[f32]; N],
        acc: &mut Acc<N>,
    ) {
        let (a, b) = k4_scales(block);
        for (acc, sums) in acc.iter_mut().zip(sums) {
            // SAFETY: the block's 8 group sums start at `at / 32` (the caller's guarantee).
            acc[0] = _mm256_fnmadd_ps(b, unsafe { x8(sums, at / 32) }, acc[0]);
        }
        let qs = if B::FIFTH_BIT { 48 } else { 16 };
        let (low_nibble, one, two) = (
            _mm256_set1_epi32(0xF),
            _mm256_set1_epi32(1),
            _mm256_set1_epi32(2),
        );
        for j in 0..4 {
            let mut low = [_mm256_setzero_ps(); N];
            let mut high = [_mm256_setzero_ps(); N];
            for c in 0..4 {
                // SAFETY: `qs + 32j + 8c + 8 ≤ qs + 128`, the block's end.
                let wide = unsafe { bytes8(block, qs + 32 * j + 8 * c) };
                let mut q_low = _mm256_and_si256(wide, low_nibble);
                let mut q_high = _mm256_srli_epi32::<4>(wide);
                if B::FIFTH_BIT {
                    // SAFETY: `qh` is bytes 16 .. 48 and `16 + 8c + 8 ≤ 48`.
                    let h = shift_right(unsafe { bytes8(block, 16 + 8 * c) }, 2 * j);
                    q_low =
                        _mm256_or_si256(q_low, _mm256_slli_epi32::<4>(_mm256_and_si256(h, one)));
                    q_high =
                        _mm256_or_si256(q_high, _mm256_slli_epi32::<3>(_mm256_and_si256(h, two)));
                }
                let (q_low, q_high) = (_mm256_cvtepi32_ps(q_low), _mm256_cvtepi32_ps(q_high));
                let v = at + 64 * j + 8 * c;
                for ((low, high), x) in low.iter_mut().zip(&mut high).zip(xs) {
                    // SAFETY: values `v .. v + 40` lie within the block's 256 (the caller's
                    // guarantee covers them).
                    let (x_low, x_high) = unsafe { (x8(x, v), x8(x, v + 32)) };
                    *low = _mm256_fmadd_ps(x_low, q_low, *low);
                    *high = _mm256_fmadd_ps(x_high, q_high, *high);
                }
            }
            let (a_low, a_high) = (lane(a, 2 * j), lane(a, 2 * j + 1));
            for ((acc, low), high) in acc.iter_mut().zip(low).zip(high) {
                acc[0] = _mm256_fmadd_ps(a_low, low, acc[0]);
                acc[1] = _mm256_fmadd_ps(a_high, high, acc[1]);
            }
        }
    }
}

/// Q6_K: 128 low-nibble bytes `ql`, 64 high-bit bytes `qh`, 16 `i8` scales, `d: f16`.
/// Half `h` of the block (128 values) reads `ql[64h ..][..64]` and `qh[32h ..][..32]`:
/// value `32k + l` (`k < 4`, `l < 32`) is nibble `k / 2` of `ql[64h + 32 (k % 2) + l]`
/// with bits `2k, 2k + 1` of `qh[32h + l]` on top, in group `2k + l / 16` of the half.
impl InPlace for Q6K {
    const SUM_GROUP: Option<usize> = Some(16);

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block<const N: usize>(
        block: &[u8],
        at: usize,
        xs: &[&[f32]; N],
        sums: &[&[f32]; N],
        acc: &mut Acc<N>,
    ) {
        let d = half_lanes(block, 208);
        let (low_nibble, bits_4_5) = (_mm256_set1_epi32(0xF), _mm256_set1_epi32(0x30));
        for half in 0..2 {
            // SAFETY: the scales are bytes 192 .. 208.
            let sc = unsafe { signed_bytes8(block, 192 + 8 * half) };
            let a = _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc));
            let offset = _mm256_mul_ps(_mm256_set1_ps(32.0), a);
            let base = at + 128 * half;
            for (acc, sums) in acc.iter_mut().zip(sums) {
                // SAFETY: the half's 8 group sums start at `base / 16` (the caller's
                // guarantee).
                acc[0] = _mm256_fnmadd_ps(offset, unsafe { x8(sums, base / 16) }, acc[0]);
            }
            // Chunk `c` (values `l = 8c .. 8c + 8` of each quarter `k`) lies in group
            // `2k + c / 2`: two chunks per group, the four quarters read from the same
            // three 8-byte loads.
            for group in 0..2 {
                let mut dot = [[_mm256_setzero_ps(); N]; 4];
                for c in 2 * group..2 * group + 2 {
                    // SAFETY: `ql` bytes `64h + 8c .. + 8` and `64h + 32 + 8c .. + 8` lie in
                    // 0 .. 128, `qh` bytes `128 + 32h + 8c .. + 8` in 128 .. 192.
                    let (ql0, ql1, qh) = unsafe {
                        (
                            bytes8(block, 64 * half + 8 * c),
                            bytes8(block, 64 * half + 32 + 8 * c),
                            bytes8(block, 128 + 32 * half + 8 * c),
                        )
                    };
                    // Quarter k: nibble k / 2 of ql[k % 2], bits 2k, 2k + 1 of qh as bits 4, 5.
                    let quarters = [
                        (
                            _mm256_and_si256(ql0, low_nibble),
                            _mm256_slli_epi32::<4>(qh),
                        ),
                        (
                            _mm256_and_si256(ql1, low_nibble),
                            _mm256_slli_epi32::<2>(qh),
                        ),
                        (_mm256_srli_epi32::<4>(ql0), qh),
                        (_mm256_srli_epi32::<4>(ql1), _mm256_srli_epi32::<2>(qh)),
                    ];
                    for (k, (dot, (low, high))) in dot.iter_mut().zip(quarters).enumerate() {
                        let q = _mm256_or_si256(low, _mm256_and_si256(high, bits_4_5));
                        let q = _mm256_cvtepi32_ps(q);
                        for (dot, x) in dot.iter_mut().zip(xs) {
                            // SAFETY: values `base + 32k + 8c .. + 8` lie within the
                            // block's 256 (the caller's guarantee).
                            let x = unsafe { x8(x, base + 32 * k + 8 * c) };
                            *dot = _mm256_fmadd_ps(x, q, *dot);
                        }
                    }
                }
                for (k, dot) in dot.into_iter().enumerate() {
                    let a_g = lane(a, 2 * k + group);
                    for (acc, dot) in acc.iter_mut().zip(dot) {
                        let total = total(acc, k);
                        *total = _mm256_fmadd_ps(a_g, dot, *total);
                    }
                }
            }
        }
    }
}
