//! The AVX2 register block of [`super`]: a 6 × 64 tile as four blocks of [`ROWS`](super::ROWS) rows
//! by 16 columns, each held in 12 registers (with its two column vectors and a broadcast,
//! 15 of AVX2's 16). Per step of depth a block loads its 16 columns of the column panel
//! (one cache line of the block's strip, [`super::PanelLayout`]) and broadcasts each row's
//! value against both: 2 loads and 6 broadcasts for 12 FMAs, the shape of the `gemm`
//! crate's AVX2 `x2x6`. The rows' slice, read once per block, stays in L1.
//!
//! Full vectors are loaded and stored plainly; only a ragged edge uses AVX2's masked
//! loads and stores (slow on AMD's cores before Zen 4).

use std::arch::x86_64::{
    __m256, __m256i, _mm256_add_ps, _mm256_cmpgt_epi32, _mm256_fmadd_ps, _mm256_load_ps,
    _mm256_loadu_ps, _mm256_maskload_ps, _mm256_maskstore_ps, _mm256_mul_ps, _mm256_set1_epi32,
    _mm256_set1_ps, _mm256_setr_epi32, _mm256_setzero_ps, _mm256_storeu_ps,
};

use super::{block, BlockIsa, PanelLayout, Start, Tile, Vectors, COLS};

/// `f32` lanes of an AVX2 vector.
const LANES: usize = 8;

/// Vectors per row of a block.
const VECTORS: usize = 2;

/// Columns of a block: a quarter of the tile, and the width of a panel's strips.
pub(super) const BLOCK_COLS: usize = LANES * VECTORS;

/// [`super::multiply`] on AVX2: the tile's columns a block of [`BLOCK_COLS`] at a time.
///
/// # Safety
/// AVX2 and FMA must be available; the rest as for [`super::multiply`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn multiply(
    depth: usize,
    rows: *const f32,
    rows_rs: usize,
    cols: *const f32,
    tile: Tile,
) {
    let lhs = (rows, rows_rs);
    for first in (0..tile.width.min(COLS)).step_by(BLOCK_COLS) {
        let part = Tile {
            out: tile.out.wrapping_add(first),
            width: (tile.width - first).min(BLOCK_COLS),
            start: match tile.start {
                Start::Row(values) => Start::Row(values.wrapping_add(first)),
                start => start,
            },
            ..tile
        };
        // The block's strip of the panel, from `first · depth` (its column `first` at
        // step 0): 64-byte aligned as the panel is and `first` a multiple of 16.
        let cols = cols.wrapping_add(PanelLayout::of(BlockIsa::Avx2, depth).at(0, first));
        // SAFETY: the caller's contract, for columns `first ..` of the tile: `part.width`
        // of them from `part.out` (and from a `Start::Row` pointer), and the strip's
        // `depth · BLOCK_COLS` values of the panel's `depth · COLS`.
        unsafe { block::<Avx2, VECTORS>(depth, lhs, cols, part) }
    }
}

/// AVX2's registers for [`super::block`].
struct Avx2;

impl Vectors for Avx2 {
    type Reg = __m256;
    const LANES: usize = LANES;
    one_intrinsic_ops!(__m256, zero: _mm256_setzero_ps, load: _mm256_load_ps,
        splat: _mm256_set1_ps, fma: _mm256_fmadd_ps, mul: _mm256_mul_ps, add: _mm256_add_ps);
    #[inline(always)]
    unsafe fn load_first(at: *const f32, lanes: usize) -> __m256 {
        // SAFETY: the caller's contract; a masked load reads only the lanes it keeps.
        unsafe {
            match lanes {
                LANES => _mm256_loadu_ps(at),
                _ => _mm256_maskload_ps(at, mask(lanes)),
            }
        }
    }
    #[inline(always)]
    unsafe fn store_first(at: *mut f32, lanes: usize, value: __m256) {
        // SAFETY: the caller's contract; a masked store writes only the lanes it keeps.
        unsafe {
            match lanes {
                LANES => _mm256_storeu_ps(at, value),
                _ => _mm256_maskstore_ps(at, mask(lanes), value),
            }
        }
    }
}

/// The mask of a vector's first `lanes` lanes (fewer than [`LANES`]).
#[inline(always)]
unsafe fn mask(lanes: usize) -> __m256i {
    // SAFETY: register-only intrinsics, under the caller's AVX2.
    unsafe {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(lanes as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }
}
