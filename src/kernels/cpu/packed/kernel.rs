//! The register block of [`super`]: up to [`ROWS`] rows by [`COLS`] columns of the
//! destination held in 28 AVX-512 registers while a packed row panel and a packed column
//! panel stream past, one multiply-add per register per step of depth.
//!
//! Per step of depth the block loads the column panel's 32 values (two vectors, 64-byte
//! aligned) and broadcasts each row's value against both: 2 loads and `ROWS` broadcasts
//! for `2 · ROWS` FMAs, so the two FMA ports, not the loads, set the pace. Each row of the
//! row panel sits [`STRIDE`] elements after the last, so the broadcasts address it by a
//! constant displacement (no register per row). At the end of a call its sums, scaled by
//! `beta`, are added to the destination's values, to a bias row, or to nothing ([`Start`]),
//! and stored once.

use std::arch::x86_64::{
    __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_load_ps, _mm512_mask_storeu_ps,
    _mm512_maskz_loadu_ps, _mm512_mul_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm_prefetch,
    _MM_HINT_T0,
};

/// Rows of the destination per block: 14 rows of two vectors are 28 accumulators, which
/// with the two column vectors and a broadcast use 31 of AVX-512's 32 registers.
pub(super) const ROWS: usize = 14;

/// Columns of the destination per block: two `f32` vectors.
pub(super) const COLS: usize = 32;

/// The depth of a step of the base product: a row panel of [`ROWS`] rows this deep is
/// 21 KiB, two thirds of the smallest AVX-512 core's L1d (32 KiB) and under half of a
/// 48 KiB one, so it stays there while the column panels stream through. On an Intel
/// Xeon with a 48 KiB L1d, 384 and 512 ran `x Wᵀ` equally fast within the host's noise and
/// 256 up to 6% slower (`benches/RESULTS.md`, "Lorakit's own packed products").
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

/// The block's sums over `depth` (at most [`STRIDE`]) steps into `tile`.
///
/// # Safety
/// AVX-512F must be available. `rows` (packed at stride [`STRIDE`]) holds `tile.rows`
/// (1 to [`ROWS`]) rows of at least `depth` values; `cols` holds `depth · COLS` values at a
/// 64-byte boundary; `tile.out` is valid for writes of `tile.width` elements at each of its
/// `tile.rows` rows (and for reads, of initialized values, with [`Start::Dst`]), and no
/// other thread touches them during the call; a [`Start::Row`] pointer is valid for reads
/// of `tile.width` values.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn multiply(depth: usize, rows: *const f32, cols: *const f32, tile: Tile) {
    debug_assert!((1..=ROWS).contains(&tile.rows) && depth <= STRIDE);
    // SAFETY: the caller's contract, for every row count.
    unsafe {
        match tile.rows {
            0 => {}
            1 => block::<1>(depth, rows, cols, tile),
            2 => block::<2>(depth, rows, cols, tile),
            3 => block::<3>(depth, rows, cols, tile),
            4 => block::<4>(depth, rows, cols, tile),
            5 => block::<5>(depth, rows, cols, tile),
            6 => block::<6>(depth, rows, cols, tile),
            7 => block::<7>(depth, rows, cols, tile),
            8 => block::<8>(depth, rows, cols, tile),
            9 => block::<9>(depth, rows, cols, tile),
            10 => block::<10>(depth, rows, cols, tile),
            11 => block::<11>(depth, rows, cols, tile),
            12 => block::<12>(depth, rows, cols, tile),
            13 => block::<13>(depth, rows, cols, tile),
            _ => block::<ROWS>(depth, rows, cols, tile),
        }
    }
}

/// Lane masks of the two vectors of a row `width` columns wide.
fn masks(width: usize) -> (u16, u16) {
    let lane_mask = |lanes: usize| match lanes {
        0 => 0,
        1..=15 => (1u16 << lanes) - 1,
        _ => u16::MAX,
    };
    (
        lane_mask(width.min(16)),
        lane_mask(width.saturating_sub(16)),
    )
}

/// [`multiply`] for `R` rows.
#[inline(always)]
unsafe fn block<const R: usize>(depth: usize, rows: *const f32, cols: *const f32, tile: Tile) {
    // SAFETY: within the caller's contract: `R` rows of the row panel, `depth · COLS`
    // column values, `tile.width` columns of `R` destination rows and of a `Start::Row`
    // (the masks keep the loads and stores inside them; the destination is read only with
    // `Start::Dst`).
    unsafe {
        for i in 0..R {
            // The destination block is written (and perhaps read) once at the end: start
            // it on its way now.
            let row = tile.out.wrapping_add(i * tile.out_rs) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(row);
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(64));
        }
        let mut sums: [[__m512; 2]; R] = [[_mm512_setzero_ps(); 2]; R];
        let (mut a, mut b) = (rows, cols);
        for _ in 0..depth {
            let b0 = _mm512_load_ps(b);
            let b1 = _mm512_load_ps(b.add(16));
            for (i, sum) in sums.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*a.add(i * STRIDE));
                sum[0] = _mm512_fmadd_ps(ai, b0, sum[0]);
                sum[1] = _mm512_fmadd_ps(ai, b1, sum[1]);
            }
            a = a.add(1);
            b = b.add(COLS);
        }
        let (m0, m1) = masks(tile.width);
        let beta = _mm512_set1_ps(tile.beta);
        let row = match tile.start {
            Start::Row(values) => Some((
                _mm512_maskz_loadu_ps(m0, values),
                _mm512_maskz_loadu_ps(m1, values.wrapping_add(16)),
            )),
            Start::Zero | Start::Dst => None,
        };
        for (i, sum) in sums.iter().enumerate() {
            let out = tile.out.add(i * tile.out_rs);
            let mut v0 = _mm512_mul_ps(sum[0], beta);
            let mut v1 = _mm512_mul_ps(sum[1], beta);
            if tile.start == Start::Dst {
                v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, out), v0);
                v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, out.wrapping_add(16)), v1);
            } else if let Some((r0, r1)) = row {
                v0 = _mm512_add_ps(r0, v0);
                v1 = _mm512_add_ps(r1, v1);
            }
            _mm512_mask_storeu_ps(out, m0, v0);
            _mm512_mask_storeu_ps(out.wrapping_add(16), m1, v1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::masks;

    #[test]
    fn masks_cover_exactly_the_width() {
        for width in 1..=32usize {
            let (m0, m1) = masks(width);
            let lanes = m0.count_ones() + m1.count_ones();
            assert_eq!(lanes as usize, width, "width {width}");
            assert_eq!(m0.trailing_ones() as usize, width.min(16), "width {width}");
            assert_eq!(
                m1.trailing_ones() as usize,
                width.saturating_sub(16),
                "width {width}"
            );
        }
    }
}
