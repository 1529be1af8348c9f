//! The x86-64 in-place kernels: the driver (one pass over the rows of `W` per call, the
//! input's group sums computed once), the Q8_0 block, and the helpers the k-quant blocks
//! (`x86/k_quants.rs`) share.

use std::arch::x86_64::{
    __m256, __m256i, _mm256_add_ps, _mm256_broadcastss_ps, _mm256_cvtepi32_ps,
    _mm256_cvtepi8_epi32, _mm256_cvtepu8_epi32, _mm256_fmadd_ps, _mm256_loadu_ps,
    _mm256_setzero_ps, _mm256_storeu_ps, _mm_cvtph_ps, _mm_cvtsi32_si128, _mm_loadl_epi64,
};

use super::super::unpack::{Block, Q8_0};
use super::super::{avx2_available, portable_rows, row_bytes_of};

mod k_quants;

/// Two 8-lane running totals per input row (alternate groups or blocks go to alternate
/// totals: two dependency chains).
type Acc<const N: usize> = [[__m256; 2]; N];

/// Running total `parity % 2` of one input row.
#[inline(always)]
fn total(acc: &mut [__m256; 2], parity: usize) -> &mut __m256 {
    let [even, odd] = acc;
    if parity.is_multiple_of(2) {
        even
    } else {
        odd
    }
}

/// A block type these kernels read in place.
///
/// Each group's input sum is computed once per product by the caller
/// (`RowDots::input_sums`), not per task.
pub(in super::super) trait InPlace: Block {
    /// Values per group whose input sums [`InPlace::block`] reads (`None`: it reads none).
    const SUM_GROUP: Option<usize>;

    /// `acc[i] += x_i[at ..] · w` over one whole block (`Self::BYTES` bytes), where
    /// `sums[i][k]` is the sum of `x_i`'s group `k` of `SUM_GROUP` values (empty when
    /// `SUM_GROUP` is `None`).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `block.len() == Self::BYTES`; every `x` has at
    /// least `at + Self::VALUES` elements and every `sums[i]` (when read) at least
    /// `(at + Self::VALUES) / SUM_GROUP`.
    unsafe fn block<const N: usize>(
        block: &[u8],
        at: usize,
        xs: &[&[f32]; N],
        sums: &[&[f32]; N],
        acc: &mut Acc<N>,
    );
}

/// The in-place kernel for block type `B` and `N` input rows (the portable one on a CPU
/// without AVX2, FMA and F16C, or for input rows that are not whole blocks).
pub(in super::super) fn rows<B: InPlace, const N: usize>(
    rows: &[u8],
    xs: &[&[f32]],
    sums: &[&[f32]],
    out: &mut [f32],
) {
    let Ok(xs) = <&[&[f32]; N]>::try_from(xs) else {
        return;
    };
    let d_in = xs.first().map_or(0, |x| x.len());
    let fits = d_in > 0 && d_in.is_multiple_of(B::VALUES) && xs.iter().all(|x| x.len() == d_in);
    let sums: Option<[&[f32]; N]> = match B::SUM_GROUP {
        Some(len) => <[&[f32]; N]>::try_from(sums)
            .ok()
            .filter(|s| s.iter().all(|s| s.len() == d_in / len)),
        None => Some([&[]; N]),
    };
    match sums {
        // SAFETY: the CPU has AVX2, FMA and F16C, the rows' lengths fit and the sums cover
        // every group of them (checked just above).
        Some(sums) if fits && avx2_available() => unsafe {
            rows_avx2::<B, N>(rows, xs, &sums, out)
        },
        _ => portable_rows::<B, N>(rows, xs, &[], out),
    }
}

/// # Safety
/// The CPU has AVX2, FMA and F16C; every `x` has the same length, a nonzero multiple of
/// `B::VALUES`, and `sums` are its group sums ([`InPlace::block`]).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<B: InPlace, const N: usize>(
    rows: &[u8],
    xs: &[&[f32]; N],
    sums: &[&[f32]; N],
    out: &mut [f32],
) {
    let row_bytes = row_bytes_of::<B>(xs);
    for (row, out) in rows
        .chunks_exact(row_bytes.max(1))
        .zip(out.chunks_exact_mut(N))
    {
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        for (b, block) in row.chunks_exact(B::BYTES).enumerate() {
            // SAFETY: `row` holds `d_in / VALUES` whole blocks, so block `b`'s values end at
            // `(b + 1) · VALUES ≤ d_in`; the CPU features are the caller's.
            unsafe { B::block(block, b * B::VALUES, xs, sums, &mut acc) };
        }
        for (o, [a0, a1]) in out.iter_mut().zip(acc) {
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds the 8 floats the store writes.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a0, a1)) };
            *o = lanes.iter().sum();
        }
    }
}

/// The little-endian f16 at `block[at..at + 2]` in all 8 lanes, by F16C's exact
/// conversion (0 past the end: callers pass whole blocks).
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn half_lanes(block: &[u8], at: usize) -> __m256 {
    let bits = match block.get(at..at + 2) {
        Some(&[lo, hi]) => i32::from(u16::from_le_bytes([lo, hi])),
        _ => 0,
    };
    _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// The 8 values of `x` at `at` (an 8-lane load).
///
/// # Safety
/// AVX2; `x` has at least `at + 8` elements.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn x8(x: &[f32], at: usize) -> __m256 {
    // SAFETY: the caller's length guarantee.
    unsafe { _mm256_loadu_ps(x.as_ptr().add(at)) }
}

/// The 8 bytes of `block` at `at`, zero-extended to 8 lanes of `u32`.
///
/// # Safety
/// AVX2; `block` has at least `at + 8` bytes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bytes8(block: &[u8], at: usize) -> __m256i {
    // SAFETY: the caller's length guarantee.
    _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(block.as_ptr().add(at).cast()) })
}

/// The 8 bytes of `block` at `at` as `i8`, sign-extended to 8 lanes of `i32`.
///
/// # Safety
/// AVX2; `block` has at least `at + 8` bytes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn signed_bytes8(block: &[u8], at: usize) -> __m256i {
    // SAFETY: the caller's length guarantee.
    _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(block.as_ptr().add(at).cast()) })
}

/// Q8_0, `w = d · q`: per block and input row, `d · Σ x q` (the integer-valued `q`
/// multiply-added in f32, scaled once).
impl InPlace for Q8_0 {
    const SUM_GROUP: Option<usize> = None;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block<const N: usize>(
        block: &[u8],
        at: usize,
        xs: &[&[f32]; N],
        _sums: &[&[f32]; N],
        acc: &mut Acc<N>,
    ) {
        let d = half_lanes(block, 0);
        let mut dot = [_mm256_setzero_ps(); N];
        for c in 0..4 {
            // SAFETY: the block is 34 bytes, so bytes `2 + 8c .. 10 + 8c` (c < 4) lie inside.
            let q = _mm256_cvtepi32_ps(unsafe { signed_bytes8(block, 2 + 8 * c) });
            for (dot, x) in dot.iter_mut().zip(xs) {
                // SAFETY: `at + 32` values per row (the caller's guarantee).
                *dot = _mm256_fmadd_ps(unsafe { x8(x, at + 8 * c) }, q, *dot);
            }
        }
        for (acc, dot) in acc.iter_mut().zip(dot) {
            let total = total(acc, at / Self::VALUES);
            *total = _mm256_fmadd_ps(d, dot, *total);
        }
    }
}
