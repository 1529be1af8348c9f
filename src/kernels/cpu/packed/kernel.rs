//! The register block of [`super`]: up to [`ROWS`] rows by [`COLS`] columns of the
//! destination held in 24 AVX-512 registers while the left-hand side's rows (in place, or
//! from a row panel) and a packed column panel stream past, one multiply-add per register
//! per step of depth.
//!
//! Per step of depth the block loads the column panel's 64 values (four vectors, 64-byte
//! aligned) and broadcasts each row's value against all four: 4 loads and 6 broadcasts
//! for 24 FMAs (the shape of the `gemm` crate's `x4x6`). In a prototype of this route on
//! an Intel Xeon (model 207; `benches/RESULTS.md`, "A wider register block") this block
//! took 0.92–0.995 × the time of the first version's 14 × 32 (2 loads and 14 broadcasts
//! for 28 FMAs) for the same products, paired. The rows' values come from the left-hand
//! side's own rows or from a packed row panel (rows [`STRIDE`] apart), at a stride given
//! per call. At the end of a call its sums, scaled by
//! `beta`, are added to the destination's values, to a bias row, or to nothing ([`Start`]),
//! and stored once.

use std::arch::x86_64::{
    __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_load_ps, _mm512_mask_storeu_ps,
    _mm512_maskz_loadu_ps, _mm512_mul_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm_prefetch,
    _MM_HINT_T0,
};

/// Rows of the destination per block: 6 rows of four vectors are 24 accumulators, which
/// with the four column vectors and a broadcast use 29 of AVX-512's 32 registers (7 rows
/// would need 33).
pub(super) const ROWS: usize = 6;

/// `f32` vectors per row of a block.
const VECTORS: usize = 4;

/// Columns of the destination per block: [`VECTORS`] `f32` vectors.
pub(super) const COLS: usize = 16 * VECTORS;

/// The depth of a step of the base product: [`ROWS`] rows' slice this deep is 9 KiB, so
/// it stays in L1 while the column panels (96 KiB each) stream from L2. On an
/// Intel Xeon (model 207) depths of 256, 384 and 512 ran within the host's noise of each
/// other with this block, none ahead in every case (`benches/RESULTS.md`, "A wider
/// register block").
pub(super) const DEPTH: usize = 384;

/// The row panel's row stride, and the deepest step a call takes: [`DEPTH`] and room for
/// a second term up to 64 deep (a LoRA factor pair's rank) in the same step.
pub(super) const STRIDE: usize = DEPTH + 64;

/// Where a block's sums go: `width` (1 to [`COLS`]) columns of `rows` rows of a row-major
/// destination at row stride `out_rs`, scaled by `beta`, added to what [`Start`] says.
#[derive(Clone, Copy)]
pub(super) struct Tile {
    pub out: *mut f32,
    pub out_rs: usize,
    pub rows: usize,
    pub width: usize,
    pub beta: f32,
    pub start: Start,
}

/// What a block's scaled sums are added to before they are stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Start {
    /// Nothing: the destination is written without being read, so it may be memory not
    /// yet initialized.
    Zero,
    /// The destination's own values.
    Dst,
    /// The same `width` values (a bias, from the block's first column) on every row; the
    /// destination is written without being read.
    Row(*const f32),
}

/// The block's sums over `depth` (at most [`STRIDE`]) steps into `tile`, the rows' values
/// read from `rows`, row `i` at `i · rows_rs` (a packed row panel at [`STRIDE`], or the
/// left-hand side's own rows).
///
/// # Safety
/// AVX-512F must be available. `rows` holds `tile.rows` (1 to [`ROWS`]) rows of at least
/// `depth` values at stride `rows_rs`; `cols` holds `depth · COLS` values at a
/// 64-byte boundary; `tile.out` is valid for writes of `tile.width` elements at each of its
/// `tile.rows` rows (and for reads, of initialized values, with [`Start::Dst`]), and no
/// other thread touches them during the call; a [`Start::Row`] pointer is valid for reads
/// of `tile.width` values.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn multiply(
    depth: usize,
    rows: *const f32,
    rows_rs: usize,
    cols: *const f32,
    tile: Tile,
) {
    debug_assert!((1..=ROWS).contains(&tile.rows) && depth <= STRIDE);
    let lhs = (rows, rows_rs);
    // SAFETY: the caller's contract, for every row count.
    unsafe {
        match tile.rows {
            0 => {}
            1 => block::<1>(depth, lhs, cols, tile),
            2 => block::<2>(depth, lhs, cols, tile),
            3 => block::<3>(depth, lhs, cols, tile),
            4 => block::<4>(depth, lhs, cols, tile),
            5 => block::<5>(depth, lhs, cols, tile),
            _ => block::<ROWS>(depth, lhs, cols, tile),
        }
    }
}

/// Lane masks of the [`VECTORS`] vectors of a row `width` columns wide.
fn masks(width: usize) -> [u16; VECTORS] {
    std::array::from_fn(|v| match width.saturating_sub(16 * v) {
        0 => 0,
        lanes @ 1..=15 => (1u16 << lanes) - 1,
        _ => u16::MAX,
    })
}

/// [`multiply`] for `R` rows.
#[inline(always)]
unsafe fn block<const R: usize>(
    depth: usize,
    (rows, rows_rs): (*const f32, usize),
    cols: *const f32,
    tile: Tile,
) {
    // SAFETY: within the caller's contract: `R` rows of `depth` values at `rows_rs`,
    // `depth · COLS` column values, `tile.width` columns of `R` destination rows and of a
    // `Start::Row` (the masks keep the loads and stores inside them; the destination is
    // read only with `Start::Dst`).
    unsafe {
        for i in 0..R {
            // The destination block is written (and perhaps read) once at the end: start
            // it on its way now.
            let row = tile.out.wrapping_add(i * tile.out_rs) as *const i8;
            for line in 0..VECTORS {
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(64 * line));
            }
        }
        let mut sums: [[__m512; VECTORS]; R] = [[_mm512_setzero_ps(); VECTORS]; R];
        let (mut a, mut b) = (rows, cols);
        for _ in 0..depth {
            let column: [__m512; VECTORS] = std::array::from_fn(|v| _mm512_load_ps(b.add(16 * v)));
            for (i, sum) in sums.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*a.add(i * rows_rs));
                for (s, &c) in sum.iter_mut().zip(&column) {
                    *s = _mm512_fmadd_ps(ai, c, *s);
                }
            }
            a = a.add(1);
            b = b.add(COLS);
        }
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
