//! The k-quant blocks read in place. Q4_K and Q5_K: 8 groups of 32, `w = a_g · q − b_g`
//! with 4-bit `q` (plus a fifth bit for Q5_K); Q6_K: 16 groups of 16, `w = a_g · (q − 32)`
//! with 6-bit `q`. For one or two input rows the Q4_K / Q5_K kernel sums `x · q` (small
//! integers converted to f32) per group and row and scales the sum by `a_g` once; for more
//! rows, and for Q6_K, it forms `a_g · q` once and multiply-adds it into every row. The
//! offsets (`b_g · Σ x`, `32 a_g · Σ x`) come from the per-call group sums, one
//! multiply-add per 8 groups.

use std::arch::x86_64::{
    __m256, _mm256_cvtepi32_ps, _mm256_cvtepi8_epi32, _mm256_cvtepu8_epi32, _mm256_mul_ps,
    _mm256_set1_ps, _mm_cvtsi64_si128,
};

use super::super::super::unpack::{k4_scale_bytes, Block, Q4K, Q5K, Q6K};
use super::{half_lanes, total, Acc, BlockLanes, InPlace};

/// The 8 bytes of `block` at `at` (little-endian; 0 past the end: callers pass whole blocks).
#[inline(always)]
fn eight_bytes(block: &[u8], at: usize) -> i64 {
    block
        .get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, i64::from_le_bytes)
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

/// The `(a_g, 32 a_g)` of half `half` of a Q6_K block's 16 groups (`a_g = d · sc_g`, the
/// `i8` scales at byte 192) as two 8-lane vectors.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn q6_scales(block: &[u8], half: usize) -> (__m256, __m256) {
    let sc = _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(eight_bytes(block, 192 + 8 * half)));
    let a = _mm256_mul_ps(half_lanes(block, 208), _mm256_cvtepi32_ps(sc));
    (a, _mm256_mul_ps(_mm256_set1_ps(32.0), a))
}

/// From this many input rows on, the Q4_K / Q5_K kernel forms each vector of weights
/// `a_g · q` once and multiply-adds it into every row's totals (one multiply per vector of
/// weights, shared by the rows), as Q6_K does; below it, each row sums `x · q` per group
/// and scales the sum (more independent chains for one or two rows, whose per-group sums
/// fit in registers). The per-group sums of four rows need 16 vector registers on top of
/// the totals, which spilled with 16 lanes.
const SCALED_WEIGHTS_FROM: usize = 3;

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

    #[inline(always)]
    unsafe fn block<V: BlockLanes, const N: usize>(
        block: &[u8],
        at: usize,
        xs: &[&[f32]; N],
        sums: &[&[f32]; N],
        acc: &mut Acc<V, N>,
    ) {
        // SAFETY (all below): the CPU features are the caller's; the reads lie inside the
        // block's 144 (176) bytes and the rows' values `at .. at + 256` and group sums
        // `at / 32 .. at / 32 + 8` (the caller's guarantee), as each comment says.
        unsafe {
            let (a, b) = k4_scales(block);
            for (acc, sums) in acc.iter_mut().zip(sums) {
                acc[0] = V::minus_offsets(acc[0], b, sums, at / 32);
            }
            let qs = if B::FIFTH_BIT { 48 } else { 16 };
            let (low_nibble, one, two) = (V::splat(0xF), V::splat(1), V::splat(2));
            for j in 0..4 {
                let mut low = [V::zero(); N];
                let mut high = [V::zero(); N];
                for c in 0..32 / V::WIDTH {
                    // `qs + 32j + W (c + 1) ≤ qs + 128`, the block's end.
                    let wide = V::bytes(block, qs + 32 * j + V::WIDTH * c);
                    let mut q_low = V::and(wide, low_nibble);
                    let mut q_high = V::shift_right(wide, 4);
                    if B::FIFTH_BIT {
                        // `qh` is bytes 16 .. 48 and `16 + W (c + 1) ≤ 48`.
                        let h = V::shift_right(V::bytes(block, 16 + V::WIDTH * c), 2 * j);
                        q_low = V::or(q_low, V::shift_left(V::and(h, one), 4));
                        q_high = V::or(q_high, V::shift_left(V::and(h, two), 3));
                    }
                    let (q_low, q_high) = (V::to_f32(q_low), V::to_f32(q_high));
                    // Values `v .. v + 32 + W` lie within the block's 256.
                    let v = at + 64 * j + V::WIDTH * c;
                    if N >= SCALED_WEIGHTS_FROM {
                        let w_low = V::mul(V::broadcast(a, 2 * j), q_low);
                        let w_high = V::mul(V::broadcast(a, 2 * j + 1), q_high);
                        for (acc, x) in acc.iter_mut().zip(xs) {
                            acc[0] = V::fma(acc[0], V::load(x, v), w_low);
                            acc[1] = V::fma(acc[1], V::load(x, v + 32), w_high);
                        }
                    } else {
                        for ((low, high), x) in low.iter_mut().zip(&mut high).zip(xs) {
                            *low = V::fma(*low, V::load(x, v), q_low);
                            *high = V::fma(*high, V::load(x, v + 32), q_high);
                        }
                    }
                }
                if N < SCALED_WEIGHTS_FROM {
                    let (a_low, a_high) = (V::broadcast(a, 2 * j), V::broadcast(a, 2 * j + 1));
                    for ((acc, low), high) in acc.iter_mut().zip(low).zip(high) {
                        acc[0] = V::fma(acc[0], a_low, low);
                        acc[1] = V::fma(acc[1], a_high, high);
                    }
                }
            }
        }
    }
}

/// Q6_K: 128 low-nibble bytes `ql`, 64 high-bit bytes `qh`, 16 `i8` scales, `d: f16`.
/// Half `h` of the block (128 values) reads `ql[64h ..][..64]` and `qh[32h ..][..32]`:
/// value `32k + l` (`k < 4`, `l < 32`) is nibble `k / 2` of `ql[64h + 32 (k % 2) + l]`
/// with bits `2k, 2k + 1` of `qh[32h + l]` on top, in group `2k + l / 16` of the half. The
/// four quarters of each `l` range come from the same three loads; each vector of weights
/// `a_g · q` is formed once and multiply-added with every input row.
impl InPlace for Q6K {
    const SUM_GROUP: Option<usize> = Some(16);

    #[inline(always)]
    unsafe fn block<V: BlockLanes, const N: usize>(
        block: &[u8],
        at: usize,
        xs: &[&[f32]; N],
        sums: &[&[f32]; N],
        acc: &mut Acc<V, N>,
    ) {
        // SAFETY (all below): the CPU features are the caller's; the reads lie inside the
        // block's 210 bytes and the rows' values `at .. at + 256` and group sums
        // `at / 16 .. at / 16 + 16` (the caller's guarantee), as each comment says.
        unsafe {
            let (low_nibble, bits_4_5) = (V::splat(0xF), V::splat(0x30));
            for half in 0..2 {
                let (a, offset) = q6_scales(block, half);
                let base = at + 128 * half;
                for (acc, sums) in acc.iter_mut().zip(sums) {
                    acc[0] = V::minus_offsets(acc[0], offset, sums, base / 16);
                }
                for c in 0..32 / V::WIDTH {
                    // `ql` bytes `64h + W c ..+ W` and `64h + 32 + W c ..+ W` lie in 0 .. 128,
                    // `qh` bytes `128 + 32h + W c ..+ W` in 128 .. 192.
                    let l = V::WIDTH * c;
                    let ql0 = V::bytes(block, 64 * half + l);
                    let ql1 = V::bytes(block, 64 * half + 32 + l);
                    let qh = V::bytes(block, 128 + 32 * half + l);
                    // Quarter k: nibble k / 2 of ql[k % 2], bits 2k, 2k + 1 of qh as bits 4, 5.
                    let quarters = [
                        (V::and(ql0, low_nibble), V::shift_left(qh, 4)),
                        (V::and(ql1, low_nibble), V::shift_left(qh, 2)),
                        (V::shift_right(ql0, 4), qh),
                        (V::shift_right(ql1, 4), V::shift_right(qh, 2)),
                    ];
                    for (k, (low, high)) in quarters.into_iter().enumerate() {
                        let q = V::to_f32(V::or(low, V::and(high, bits_4_5)));
                        let w = V::mul(V::broadcast(a, 2 * k + l / 16), q);
                        for (acc, x) in acc.iter_mut().zip(xs) {
                            // Values `base + 32k + l ..+ W` lie within the block's 256.
                            let total = total(acc, k);
                            *total = V::fma(*total, V::load(x, base + 32 * k + l), w);
                        }
                    }
                }
            }
        }
    }
}
