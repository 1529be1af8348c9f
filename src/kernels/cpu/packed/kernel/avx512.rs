//! The AVX-512 register block of [`super`]: up to [`ROWS`](super::ROWS) rows by [`COLS`] columns of
//! the destination held in 24 registers while the left-hand side's rows (in place, or
//! from a row panel) and a packed column panel stream past, one multiply-add per register
//! per step of depth.
//!
//! Per step of depth the block loads the column panel's 64 values (four vectors, 64-byte
//! aligned) and broadcasts each row's value against all four: 4 loads and 6 broadcasts
//! for 24 FMAs (the shape of the `gemm` crate's `x4x6`). In a prototype of this route on
//! an Intel Xeon (model 207; `benches/RESULTS.md`, "A wider register block") this block
//! took 0.92–0.995 × the time of the first version's 14 × 32 (2 loads and 14 broadcasts
//! for 28 FMAs) for the same products, paired. At the end of a call its sums, scaled by
//! `beta`, are added to what [`Start`](super::Start) says and stored once.

use std::arch::x86_64::{
    __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_load_ps, _mm512_mask_storeu_ps,
    _mm512_maskz_loadu_ps, _mm512_mul_ps, _mm512_set1_ps, _mm512_setzero_ps,
};

use super::{block, Tile, Vectors, COLS};

/// `f32` vectors per row of a block: 6 rows of four vectors are 24 accumulators, which
/// with the four column vectors and a broadcast use 29 of AVX-512's 32 registers (7 rows
/// would need 33).
const VECTORS: usize = COLS / 16;

/// Columns the block reads per step: the whole panel ([`super::PanelLayout`]).
pub(super) const BLOCK_COLS: usize = COLS;

/// [`super::multiply`] on AVX-512.
///
/// # Safety
/// AVX-512F must be available; the rest as for [`super::multiply`].
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn multiply(
    depth: usize,
    rows: *const f32,
    rows_rs: usize,
    cols: *const f32,
    tile: Tile,
) {
    // SAFETY: the caller's contract, with the whole tile one block of AVX-512's registers.
    unsafe { block::<Avx512, VECTORS>(depth, (rows, rows_rs), cols, tile) }
}

/// AVX-512F's registers for [`super::block`].
struct Avx512;

impl Vectors for Avx512 {
    type Reg = __m512;
    const LANES: usize = 16;
    one_intrinsic_ops!(__m512, zero: _mm512_setzero_ps, load: _mm512_load_ps,
        splat: _mm512_set1_ps, fma: _mm512_fmadd_ps, mul: _mm512_mul_ps, add: _mm512_add_ps);
    #[inline(always)]
    unsafe fn load_first(at: *const f32, lanes: usize) -> __m512 {
        // SAFETY: the caller's contract; a masked load reads only the lanes it keeps.
        unsafe { _mm512_maskz_loadu_ps(mask(lanes), at) }
    }
    #[inline(always)]
    unsafe fn store_first(at: *mut f32, lanes: usize, value: __m512) {
        // SAFETY: the caller's contract; a masked store writes only the lanes it keeps.
        unsafe { _mm512_mask_storeu_ps(at, mask(lanes), value) }
    }
}

/// The lane mask of a vector's first `lanes` (at most 16) lanes.
fn mask(lanes: usize) -> u16 {
    ((1u32 << lanes.min(16)) - 1) as u16
}

#[cfg(test)]
mod tests {
    use super::mask;

    #[test]
    fn masks_cover_exactly_the_first_lanes() {
        for lanes in 0..=16 {
            assert_eq!(mask(lanes).count_ones() as usize, lanes);
            assert_eq!(mask(lanes).trailing_ones() as usize, lanes);
        }
    }
}
