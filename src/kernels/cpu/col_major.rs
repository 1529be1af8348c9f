//! Products whose right-hand side is column-major (`rhs.rs == 1`), such as `x Wᵀ` with a
//! row-major weight `W` — every linear layer's forward. The `gemm` crate is slow on them
//! (about 0.8× its row-major speed for `512 × 1024 × 1024` on one AVX-512 core, and
//! 0.2–0.3× for 4–32 rows), so they are rerouted:
//!
//! - 2 to 15 rows: one matrix-vector product per row (the one-row kernel reads the
//!   columns contiguously);
//! - 16 rows or more, at least [`CHUNK`] · 2 columns: the right-hand side is transposed
//!   [`CHUNK`] columns at a time into a small row-major buffer (`k × CHUNK`, never the whole
//!   matrix), each chunk one row-major product into its columns of `dst`.
//!
//! Measured with `cargo bench --bench fused` (see `benches/RESULTS.md`).

use candle_core::WithDType;

use super::{gemm_into, MatRef};

/// Columns transposed per chunk.
pub(super) const CHUNK: usize = 64;

/// Row counts below this go row by row.
const ROW_BY_ROW_BELOW: usize = 16;

/// Runs `dst = (accumulate ? dst : 0) + beta · lhs · rhs` by one of the reroutes above and
/// returns `Some`, or `None` when the product should go straight to `gemm` (a row-major
/// `rhs`, one row, or too few columns). The caller has checked the shapes and `dst`.
pub(super) fn reroute<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    accumulate: bool,
    beta: T,
) -> Option<candle_core::Result<()>> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rs != 1 || rhs.cs == 1 || k < 2 || m < 2 {
        return None;
    }
    if m < ROW_BY_ROW_BELOW {
        return Some(row_by_row(dst, dst_rs, lhs, rhs, accumulate, beta));
    }
    if n >= 2 * CHUNK {
        return Some(chunked(dst, dst_rs, lhs, rhs, accumulate, beta));
    }
    None
}

fn row_by_row<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    accumulate: bool,
    beta: T,
) -> candle_core::Result<()> {
    for i in 0..lhs.rows {
        let row = MatRef::new(
            lhs.data.get(i * lhs.rs..).unwrap_or(&[]),
            1,
            lhs.cols,
            lhs.rs,
            lhs.cs,
        )?;
        let Some(out) = dst.get_mut(i * dst_rs..) else {
            candle_core::bail!("fused linear: destination row {i} out of range");
        };
        gemm_into(out, dst_rs, row, rhs, accumulate, beta)?;
    }
    Ok(())
}

fn chunked<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    accumulate: bool,
    beta: T,
) -> candle_core::Result<()> {
    let (k, n) = (rhs.rows, rhs.cols);
    let mut buf = vec![T::from_f64(0.0); k * CHUNK];
    let mut j0 = 0;
    while j0 < n {
        let width = CHUNK.min(n - j0);
        let block = buf.get_mut(..k * width).unwrap_or_default();
        transpose_columns(rhs, j0, width, block);
        let Some(out) = dst.get_mut(j0..) else {
            candle_core::bail!("fused linear: destination column {j0} out of range");
        };
        let block = MatRef::contiguous(block, k, width)?;
        gemm_into(out, dst_rs, lhs, block, accumulate, beta)?;
        j0 += width;
    }
    Ok(())
}

/// Copies columns `j0..j0 + width` of the column-major `rhs` (`k` rows) into `out` as a
/// row-major `k × width` matrix, in 16 × 16 tiles.
fn transpose_columns<T: WithDType>(rhs: MatRef<T>, j0: usize, width: usize, out: &mut [T]) {
    const TILE: usize = 16;
    let k = rhs.rows;
    for kb in (0..k).step_by(TILE) {
        let rows = TILE.min(k - kb);
        for j in 0..width {
            // Column j0 + j, rows kb..kb + rows: contiguous in the column-major source.
            let start = (j0 + j) * rhs.cs + kb;
            let Some(col) = rhs.data.get(start..start + rows) else {
                continue;
            };
            for (t, &v) in col.iter().enumerate() {
                if let Some(slot) = out.get_mut((kb + t) * width + j) {
                    *slot = v;
                }
            }
        }
    }
}
