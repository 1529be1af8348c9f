//! The x86-64 in-place kernels: the driver (one pass over the rows of `W` per call, the
//! input's group sums computed once), the Q8_0 block, and the helpers the k-quant blocks
//! (`x86/k_quants.rs`) share. Each block's kernel is written once over the vector width
//! (`x86/lanes.rs`) and runs with 8 lanes (AVX2 + FMA + F16C) or 16 (AVX-512F).

use std::arch::x86_64::{__m256, _mm256_broadcastss_ps, _mm_cvtph_ps, _mm_cvtsi32_si128};

use super::super::super::super::prefetch::prefetch;
use super::super::unpack::{Block, Q8_0};
use super::super::{avx2_available, avx512_available, portable_rows, row_bytes_of};
use lanes::{Avx2, Avx512, BlockLanes};

mod k_quants;
mod lanes;

/// Two running totals per input row (alternate groups or blocks go to alternate totals:
/// two dependency chains).
type Acc<V, const N: usize> = [[<V as BlockLanes>::F; 2]; N];

/// How far ahead of its reads a kernel asks for `W`'s blocks ([`prefetch_ahead`]): about
/// one memory latency (~100 ns on servers) of one core streaming 20–40 GB/s. A task's rows
/// are one contiguous stream of blocks, where the f32 decode kernel reads four rows of `W`
/// at once (1 KiB ahead each). With several input rows the kernels do more work per cache
/// line of `W`, and the hardware prefetchers alone then leave them waiting on memory: on an
/// AMD EPYC Zen 5 (AVX-512), 4 input rows against 16 layers of `4096 × 4096` (Q8_0, Q4_K,
/// Q6_K) took 1.2–1.5 ms per layer without and 0.9–1.2 with, flat from 1 to 4 KiB ahead;
/// one input row ran the same either way.
const PREFETCH_BYTES: usize = 2048;

/// Asks for the cache lines [`PREFETCH_BYTES`] past those of `block` (one block of `B`).
#[inline(always)]
fn prefetch_ahead<B: Block>(block: &[u8]) {
    for line in (0..B::BYTES).step_by(64) {
        prefetch(block.as_ptr().wrapping_add(PREFETCH_BYTES + line));
    }
}

/// Running total `parity % 2` of one input row.
#[inline(always)]
fn total<V>(acc: &mut [V; 2], parity: usize) -> &mut V {
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
    /// The CPU has `V`'s instruction sets and AVX2, FMA and F16C; `block.len() ==
    /// Self::BYTES`; every `x` has at least `at + Self::VALUES` elements and every
    /// `sums[i]` (when read) at least `(at + Self::VALUES) / SUM_GROUP`.
    unsafe fn block<V: BlockLanes, const N: usize>(
        block: &[u8],
        at: usize,
        xs: &[&[f32]; N],
        sums: &[&[f32]; N],
        acc: &mut Acc<V, N>,
    );
}

/// The in-place kernel for block type `B` and `N` input rows: with AVX-512F when `WIDE`
/// and the CPU has it, else with AVX2 (the portable one on a CPU without AVX2, FMA and
/// F16C, or for input rows that are not whole blocks).
pub(in super::super) fn rows<B: InPlace, const N: usize, const WIDE: bool>(
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
        // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C, the rows' lengths fit and the
        // sums cover every group of them (checked just above).
        Some(sums) if fits && WIDE && avx512_available() => unsafe {
            rows_avx512::<B, N>(rows, xs, &sums, out)
        },
        // SAFETY: as above, with AVX2, FMA and F16C.
        Some(sums) if fits && avx2_available() => unsafe {
            rows_avx2::<B, N>(rows, xs, &sums, out)
        },
        _ => portable_rows::<B, N>(rows, xs, &[], out),
    }
}

/// [`rows`]'s kernel with AVX2.
///
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
    // SAFETY: the caller's guarantees, and the features this function enables.
    unsafe { rows_with::<Avx2, B, N>(rows, xs, sums, out) }
}

/// [`rows`]'s kernel with AVX-512F.
///
/// # Safety
/// As [`rows_avx2`], and the CPU has AVX-512F.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn rows_avx512<B: InPlace, const N: usize>(
    rows: &[u8],
    xs: &[&[f32]; N],
    sums: &[&[f32]; N],
    out: &mut [f32],
) {
    // SAFETY: the caller's guarantees, and the features this function enables.
    unsafe { rows_with::<Avx512, B, N>(rows, xs, sums, out) }
}

/// The driver over `V`'s vectors, inlined into the function that enables `V`'s features.
///
/// # Safety
/// As [`rows_avx2`], and the CPU has `V`'s instruction sets.
#[inline(always)]
unsafe fn rows_with<V: BlockLanes, B: InPlace, const N: usize>(
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
        // SAFETY (every block below): `row` holds `d_in / VALUES` whole blocks, so block
        // `b`'s values end at `(b + 1) · VALUES ≤ d_in`; the CPU features are the caller's.
        let mut acc = [[unsafe { V::zero() }; 2]; N];
        for (b, block) in row.chunks_exact(B::BYTES).enumerate() {
            prefetch_ahead::<B>(block);
            unsafe { B::block::<V, N>(block, b * B::VALUES, xs, sums, &mut acc) };
        }
        for (o, [a0, a1]) in out.iter_mut().zip(acc) {
            *o = unsafe { V::sum(a0, a1) };
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

/// Q8_0, `w = d · q`: each vector of weights formed once (`d · q`, candle's dequantized
/// value) and multiply-added with every input row, alternate vectors of the block into
/// alternate running totals (which one is fixed at compile time, so the totals stay in
/// registers).
impl InPlace for Q8_0 {
    const SUM_GROUP: Option<usize> = None;

    #[inline(always)]
    unsafe fn block<V: BlockLanes, const N: usize>(
        block: &[u8],
        at: usize,
        xs: &[&[f32]; N],
        _sums: &[&[f32]; N],
        acc: &mut Acc<V, N>,
    ) {
        // SAFETY (all below): the CPU features are the caller's; the block is 34 bytes, so
        // bytes `2 + W c .. 2 + W (c + 1)` lie inside for `c < 32 / W`, and every row has
        // `at + 32` values (the caller's guarantee).
        unsafe {
            let d = V::broadcast(half_lanes(block, 0), 0);
            for c in 0..32 / V::WIDTH {
                let w = V::mul(d, V::to_f32(V::signed_bytes(block, 2 + V::WIDTH * c)));
                for (acc, x) in acc.iter_mut().zip(xs) {
                    let total = total(acc, c);
                    *total = V::fma(*total, V::load(x, at + V::WIDTH * c), w);
                }
            }
        }
    }
}
