//! The AVX-512 register block of [`super`]: up to [`ROWS`] rows by [`COLS`] columns of
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
//! `beta`, are added to what [`Start`] says and stored once.

use std::arch::x86_64::{
    __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_load_ps, _mm512_mask_storeu_ps,
    _mm512_maskz_loadu_ps, _mm512_mul_ps, _mm512_set1_ps, _mm512_setzero_ps,
};

use super::{accumulate, lanes_within, prefetch_destination, Start, Tile, Vectors, COLS, ROWS};

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
    let lhs = (rows, rows_rs);
    // SAFETY: the caller's contract, for every row count.
    unsafe { for_rows!(tile.rows, block(depth, lhs, cols, tile)) }
}

/// AVX-512F's registers for [`accumulate`].
struct Avx512;

impl Vectors for Avx512 {
    type Reg = __m512;
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        // SAFETY: the caller's AVX-512F.
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load_aligned(at: *const f32) -> __m512 {
        // SAFETY: the caller's contract: AVX-512F, `at` 64-byte aligned with 16 values.
        unsafe { _mm512_load_ps(at) }
    }
    #[inline(always)]
    unsafe fn splat(value: f32) -> __m512 {
        // SAFETY: the caller's AVX-512F.
        unsafe { _mm512_set1_ps(value) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: the caller's AVX-512F.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
}

/// Lane masks of the [`VECTORS`] vectors of a row `width` columns wide.
fn masks(width: usize) -> [u16; VECTORS] {
    lanes_within::<VECTORS>(width, 16).map(|lanes| ((1u32 << lanes) - 1) as u16)
}

/// [`multiply`] for `R` rows.
#[inline(always)]
unsafe fn block<const R: usize>(
    depth: usize,
    lhs: (*const f32, usize),
    cols: *const f32,
    tile: Tile,
) {
    // SAFETY: within the caller's contract: `R` rows of `depth` values at `rows_rs`,
    // `depth · COLS` column values, `tile.width` columns of `R` destination rows and of a
    // `Start::Row` (the masks keep the loads and stores inside them; the destination is
    // read only with `Start::Dst`).
    unsafe {
        prefetch_destination::<R>(&tile, tile.width);
        let sums = accumulate::<Avx512, R, VECTORS>(depth, lhs, cols);
        let masks = masks(tile.width);
        let beta = _mm512_set1_ps(tile.beta);
        let row: Option<[__m512; VECTORS]> = match tile.start {
            Start::Row(values) => {
                let mut row = [_mm512_setzero_ps(); VECTORS];
                for (v, (slot, &mask)) in row.iter_mut().zip(&masks).enumerate() {
                    *slot = _mm512_maskz_loadu_ps(mask, values.wrapping_add(16 * v));
                }
                Some(row)
            }
            Start::Zero | Start::Dst => None,
        };
        for (i, sum) in sums.iter().enumerate() {
            let out = tile.out.add(i * tile.out_rs);
            for (v, (&s, &mask)) in sum.iter().zip(&masks).enumerate() {
                let at = out.wrapping_add(16 * v);
                let mut value = _mm512_mul_ps(s, beta);
                if tile.start == Start::Dst {
                    value = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), value);
                } else if let Some(&start) = row.as_ref().and_then(|row| row.get(v)) {
                    value = _mm512_add_ps(start, value);
                }
                _mm512_mask_storeu_ps(at, mask, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{masks, COLS};

    #[test]
    fn masks_cover_exactly_the_width() {
        for width in 1..=COLS {
            let masks = masks(width);
            let lanes: u32 = masks.iter().map(|m| m.count_ones()).sum();
            assert_eq!(lanes as usize, width, "width {width}");
            for (v, m) in masks.iter().enumerate() {
                let want = width.saturating_sub(16 * v).min(16);
                assert_eq!(
                    m.trailing_ones() as usize,
                    want,
                    "width {width}, vector {v}"
                );
            }
        }
    }
}
