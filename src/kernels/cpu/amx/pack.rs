//! `f32` operands as three bfloat16 planes, packed in the tile layouts of
//! [`super::tiles::block_32x32`].
//!
//! Each `f32` `x` is written `x = high + middle + low`, three bfloat16 values (8
//! significant bits each) rounded to nearest in turn from `x` and its remainders, so that
//! together they hold all 24 bits of `x`'s significand (exactly for every finite `x` of
//! at least `2⁻¹¹⁰` in size; below that the low plane is subnormal or zero). A product `x · y` is then the sum
//! of nine plane products; the kernel adds the six whose size is at least `2⁻¹⁶` of
//! `x · y` (high·high, high·middle, middle·high, middle·middle, high·low, low·high), each
//! exact in `f32`, and leaves out three of at most about `2⁻²⁴` of it (the size of one
//! rounding of an `f32` product).
//!
//! Layouts, per block of 32 along the inner dimension (a *depth block*): three planes
//! (high, middle, low) of two tiles (halves) each:
//! - a **row panel** (32 rows of the left operand): per plane, 32 rows × 32 depth, each
//!   row 32 consecutive depth elements (rows 0–15 the first tile, 16–31 the second);
//! - a **column panel** (32 columns of the right operand): per plane and half, a tile of
//!   16 depth pairs × 16 columns, each tile row the pairs `(k, k + 1)` of its 16 columns
//!   side by side (the "VNNI" layout `TDPBF16PS` multiplies by).
//!
//! Elements past the matrix's edge (rows, columns or depth) are packed as zeros, which
//! add nothing to the sums.

use super::super::MatRef;
use super::tiles::{TILE_ELEMS, TILE_ROWS};

/// Rows of a row panel, columns of a column panel, and depth of a depth block.
pub(super) const BLOCK: usize = 32;

/// bfloat16 elements of one depth block of a panel: three planes of two tiles.
pub(super) const DEPTH_BLOCK_ELEMS: usize = 3 * 2 * TILE_ELEMS;

/// bfloat16 elements of one plane of a depth block (two tiles).
const PLANE_ELEMS: usize = 2 * TILE_ELEMS;

/// `x` rounded to the nearest bfloat16 (ties to even), as its bits; a finite `x` that
/// would round up to infinity (at least about `3.3962 · 10³⁸` in size) is truncated to
/// bfloat16's largest instead, and NaN stays NaN. Written with integer selects only, so
/// that the packing loops vectorize.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let magnitude = bits & 0x7fff_ffff;
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    // From here rounding could overflow (or `x` is not finite): truncate, and keep a NaN
    // quiet whatever its payload's low bits held.
    let truncate = magnitude >= 0x7f7f_8000;
    let quiet = u32::from(magnitude > 0x7f80_0000) << 6;
    let out = if truncate {
        (bits >> 16) | quiet
    } else {
        rounded
    };
    out as u16
}

/// A bfloat16's value.
#[inline(always)]
fn bf16_value(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// `x` as its high, middle and low bfloat16 planes (module docs). An infinity or NaN is
/// all in its high plane.
#[inline(always)]
pub(super) fn split(x: f32) -> [u16; 3] {
    let high = bf16_bits(x);
    let finite = x.to_bits() & 0x7f80_0000 != 0x7f80_0000;
    let rest = if finite { x - bf16_value(high) } else { 0.0 };
    let middle = bf16_bits(rest);
    let low = bf16_bits(rest - bf16_value(middle));
    [high, middle, low]
}

/// Depth blocks that `depth` elements of the inner dimension take.
pub(super) fn depth_blocks(depth: usize) -> usize {
    depth.div_ceil(BLOCK)
}

/// Up to 32 values (zeros past `src`'s end) as three plane rows of 32.
#[target_feature(enable = "avx512f")]
fn split_32(src: &[f32]) -> [[u16; BLOCK]; 3] {
    let mut x = [0f32; BLOCK];
    x.iter_mut().zip(src).for_each(|(d, &s)| *d = s);
    let mut planes = [[0u16; BLOCK]; 3];
    let [high, middle, low] = &mut planes;
    for (&x, ((h, m), l)) in x
        .iter()
        .zip(high.iter_mut().zip(middle.iter_mut()).zip(low.iter_mut()))
    {
        [*h, *m, *l] = split(x);
    }
    planes
}

/// Depth block `block` (32 elements, fewer at the end) of a line.
fn block_of(line: &[f32], block: usize) -> &[f32] {
    let start = (block * BLOCK).min(line.len());
    line.get(start..(start + BLOCK).min(line.len()))
        .unwrap_or(&[])
}

/// Staging for the packing, kept between calls: lines of an operand copied out when
/// their elements are not adjacent.
#[derive(Default)]
pub(super) struct Packer {
    copy: Vec<f32>,
}

impl Packer {
    /// Lines `line0 .. line0 + 32` of `view` (its rows) at depth `k0 .. k0 + depth` (its
    /// columns): borrowed when their elements are adjacent, else copied out; lines past
    /// the view's edge are empty.
    fn lines<'a>(
        &'a mut self,
        view: MatRef<'a, f32>,
        line0: usize,
        k0: usize,
        depth: usize,
    ) -> [&'a [f32]; BLOCK] {
        let present = BLOCK.min(view.rows().saturating_sub(line0));
        let depth = depth.min(view.cols().saturating_sub(k0));
        let mut out: [&[f32]; BLOCK] = [&[]; BLOCK];
        if view.row(0).is_some() {
            for (l, line) in out.iter_mut().enumerate().take(present) {
                *line = view
                    .row(line0 + l)
                    .and_then(|row| row.get(k0..k0 + depth))
                    .unwrap_or(&[]);
            }
            return out;
        }
        self.copy.clear();
        for l in 0..present {
            self.copy
                .extend((k0..k0 + depth).map(|d| view.at(line0 + l, d)));
        }
        for (line, copied) in out.iter_mut().zip(self.copy.chunks_exact(depth.max(1))) {
            *line = copied;
        }
        out
    }

    /// Packs rows `row0 .. row0 + 32` and depth `k0 .. k0 + depth` of `lhs` as a row
    /// panel into `out` (`depth_blocks(depth) · DEPTH_BLOCK_ELEMS` long).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    pub(super) unsafe fn row_panel(
        &mut self,
        lhs: MatRef<f32>,
        row0: usize,
        k0: usize,
        depth: usize,
        out: &mut [u16],
    ) {
        let lines = self.lines(lhs, row0, k0, depth);
        // SAFETY: the caller's contract.
        unsafe { row_panel_of(&lines, out) }
    }

    /// Packs columns `col0 .. col0 + 32` and depth `k0 .. k0 + depth` of `rhs` as a
    /// column panel into `out` (`depth_blocks(depth) · DEPTH_BLOCK_ELEMS` long).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    pub(super) unsafe fn column_panel(
        &mut self,
        rhs: MatRef<f32>,
        col0: usize,
        k0: usize,
        depth: usize,
        out: &mut [u16],
    ) {
        if rhs.row(0).is_some() && rhs.t().row(0).is_none() {
            // SAFETY: the caller's contract.
            unsafe { column_panel_by_rows(rhs, col0, k0, depth, out) };
            return;
        }
        let lines = self.lines(rhs.t(), col0, k0, depth);
        // SAFETY: the caller's contract.
        unsafe { column_panel_of(&lines, out) }
    }
}

/// A row panel of 32 lines (module docs): each line's depth block `b` split into the
/// three planes' row of tile row `line` of that block.
#[target_feature(enable = "avx512f")]
fn row_panel_of(lines: &[&[f32]], out: &mut [u16]) {
    for (r, line) in lines.iter().enumerate() {
        for (block, pieces) in out.chunks_exact_mut(DEPTH_BLOCK_ELEMS).enumerate() {
            let planes = split_32(block_of(line, block));
            // Per plane, rows 0–15 fill the first tile and 16–31 the second: 32 rows of
            // 32 in order.
            for (plane, piece) in planes.iter().zip(pieces.chunks_exact_mut(PLANE_ELEMS)) {
                if let Some(dst) = piece.get_mut(r * BLOCK..(r + 1) * BLOCK) {
                    dst.copy_from_slice(plane);
                }
            }
        }
    }
}

/// A column panel of 32 lines, one per column (module docs): per depth block and half,
/// the 16 columns' planes transposed into tile rows of depth pairs.
#[target_feature(enable = "avx512f")]
fn column_panel_of(lines: &[&[f32]], out: &mut [u16]) {
    for (block, pieces) in out.chunks_exact_mut(DEPTH_BLOCK_ELEMS).enumerate() {
        for (half, columns) in lines.chunks_exact(TILE_ROWS).enumerate() {
            let mut split = [[[0u16; BLOCK]; 3]; TILE_ROWS];
            for (s, column) in split.iter_mut().zip(columns) {
                *s = split_32(block_of(column, block));
            }
            for (p, piece) in pieces.chunks_exact_mut(PLANE_ELEMS).enumerate() {
                let Some(tile) = piece.get_mut(half * TILE_ELEMS..(half + 1) * TILE_ELEMS) else {
                    continue;
                };
                // Tile row `q` holds depth pair (2q, 2q + 1) of each of the 16 columns,
                // column `c` at elements (2c, 2c + 1).
                for (c, planes) in split.iter().enumerate() {
                    let Some(plane) = planes.get(p) else { continue };
                    for (row, pair) in tile.chunks_exact_mut(BLOCK).zip(plane.chunks_exact(2)) {
                        if let Some(dst) = row.get_mut(2 * c..2 * c + 2) {
                            dst.copy_from_slice(pair);
                        }
                    }
                }
            }
        }
    }
}

/// A column panel of a right operand with adjacent row elements (a weight `W` as it is
/// stored): each depth pair's two rows split, then interleaved into a tile row.
#[target_feature(enable = "avx512f")]
fn column_panel_by_rows(rhs: MatRef<f32>, col0: usize, k0: usize, depth: usize, out: &mut [u16]) {
    let cols = BLOCK.min(rhs.cols().saturating_sub(col0));
    let row = |d: usize| -> &[f32] {
        match d < depth {
            true => rhs
                .row(k0 + d)
                .and_then(|row| row.get(col0..col0 + cols))
                .unwrap_or(&[]),
            false => &[],
        }
    };
    for (block, pieces) in out.chunks_exact_mut(DEPTH_BLOCK_ELEMS).enumerate() {
        for q in 0..TILE_ROWS {
            let d = block * BLOCK + 2 * q;
            let (first, second) = (split_32(row(d)), split_32(row(d + 1)));
            for ((piece, first), second) in pieces
                .chunks_exact_mut(PLANE_ELEMS)
                .zip(&first)
                .zip(&second)
            {
                for (half, tile) in piece.chunks_exact_mut(TILE_ELEMS).enumerate() {
                    let lanes = half * TILE_ROWS..(half + 1) * TILE_ROWS;
                    let (Some(dst), Some(x0), Some(x1)) = (
                        tile.get_mut(q * BLOCK..(q + 1) * BLOCK),
                        first.get(lanes.clone()),
                        second.get(lanes),
                    ) else {
                        continue;
                    };
                    for ((d, &v0), &v1) in dst.chunks_exact_mut(2).zip(x0).zip(x1) {
                        d.copy_from_slice(&[v0, v1]);
                    }
                }
            }
        }
    }
}
