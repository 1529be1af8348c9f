//! Products whose right-hand side is column-major (`rhs.rs == 1`), such as `x Wᵀ` with a
//! row-major weight `W` — every linear layer's forward. The `gemm` crate is slow on them
//! (on one AVX-512 core about 0.8× its row-major speed for `512 × 1024 × 1024`, and 5–10×
//! slower than one matrix-vector product per row for 4–16 rows), so they are rerouted:
//!
//! - 2 to 15 rows: one matrix-vector product per row (the one-row kernel reads the
//!   columns contiguously), rows spread over the threads;
//! - 16 rows or more, at least `2 · CHUNK` columns: the right-hand side is transposed
//!   `CHUNK` columns at a time into a small row-major buffer (`k × CHUNK`, never the
//!   whole matrix), each chunk one single-threaded row-major product into its columns of
//!   `dst`, chunks spread over the threads.
//!
//! Threads: candle's setting (`RAYON_NUM_THREADS`, else all cores), on rayon's pool.
//! Measured with `cargo bench --bench fused` and `benches/peft_compare.py` (see
//! `benches/RESULTS.md`).

use candle_core::WithDType;
use rayon::prelude::*;

use super::{gemm_raw, MatRef};

/// Columns transposed per chunk.
const CHUNK: usize = 64;

/// Row counts below this go row by row.
const ROW_BY_ROW_BELOW: usize = 16;

/// Runs `dst = (accumulate ? dst : 0) + beta · lhs · rhs` by one of the reroutes above and
/// returns `Some`, or `None` when the product should go straight to `gemm` (a row-major
/// `rhs`, one row, or too few columns). The caller has checked the shapes and that `dst`
/// holds the `m × n` result at row stride `dst_rs ≥ n`.
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
    let product = Product {
        lhs,
        rhs,
        accumulate,
        beta,
    };
    if m < ROW_BY_ROW_BELOW {
        return Some(product.row_by_row(dst, dst_rs));
    }
    if n >= 2 * CHUNK {
        return Some(product.chunked(dst, dst_rs));
    }
    None
}

/// The operands of one rerouted product.
#[derive(Clone, Copy)]
struct Product<'a, T> {
    lhs: MatRef<'a, T>,
    rhs: MatRef<'a, T>,
    accumulate: bool,
    beta: T,
}

/// A destination pointer shared by threads that write disjoint elements.
#[derive(Clone, Copy)]
struct SharedDst<T>(*mut T);

// SAFETY: only used by `Product::chunked`, whose tasks write disjoint column ranges.
unsafe impl<T> Send for SharedDst<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedDst<T> {}

impl<T: WithDType> Product<'_, T> {
    fn row_by_row(self, dst: &mut [T], dst_rs: usize) -> candle_core::Result<()> {
        let (m, n) = (self.lhs.rows, self.rhs.cols);
        dst.par_chunks_mut(dst_rs)
            .take(m)
            .enumerate()
            .try_for_each(|(i, out)| {
                let lhs = self.lhs;
                let row = MatRef::new(
                    lhs.data.get(i * lhs.rs..).unwrap_or(&[]),
                    1,
                    lhs.cols,
                    lhs.rs,
                    lhs.cs,
                )?;
                if out.len() < n {
                    candle_core::bail!("fused linear: destination row {i} shorter than {n}");
                }
                // SAFETY: `out` is this task's own row, with at least `n` elements.
                unsafe {
                    gemm_raw(
                        out.as_mut_ptr(),
                        dst_rs,
                        row,
                        self.rhs,
                        self.accumulate,
                        self.beta,
                        gemm::Parallelism::None,
                    )
                };
                Ok(())
            })
    }

    fn chunked(self, dst: &mut [T], dst_rs: usize) -> candle_core::Result<()> {
        let (k, n) = (self.rhs.rows, self.rhs.cols);
        let shared = SharedDst(dst.as_mut_ptr());
        (0..n.div_ceil(CHUNK)).into_par_iter().try_for_each(|c| {
            let j0 = c * CHUNK;
            let width = CHUNK.min(n - j0);
            let mut block = vec![T::from_f64(0.0); k * width];
            transpose_columns(self.rhs, j0, width, &mut block);
            let block = MatRef::contiguous(&block, k, width)?;
            let dst = shared;
            // SAFETY: columns `j0..j0 + width` of the caller's checked `m × n` destination;
            // the chunks' column ranges are disjoint, so no two tasks touch one element.
            unsafe {
                gemm_raw(
                    dst.0.add(j0),
                    dst_rs,
                    self.lhs,
                    block,
                    self.accumulate,
                    self.beta,
                    gemm::Parallelism::None,
                )
            };
            Ok(())
        })
    }
}

/// Source columns copied together by [`transpose_columns`].
const GROUP: usize = 8;

/// Copies columns `j0..j0 + width` of the column-major `rhs` (`k` rows) into `out` as a
/// row-major `k × width` matrix. Each source column is contiguous; `GROUP` of them are
/// read side by side from start to end (a few sequential streams, which the hardware
/// prefetcher follows even when `rhs` is not in cache) and each output row gets `GROUP`
/// adjacent elements at a time. Reading a short piece of every column of the chunk in
/// turn instead (one stream per column) was 3–4× slower on a cold weight.
fn transpose_columns<T: WithDType>(rhs: MatRef<T>, j0: usize, width: usize, out: &mut [T]) {
    let k = rhs.rows;
    if width == 0 {
        return;
    }
    let column = |j: usize| -> &[T] {
        let start = (j0 + j) * rhs.cs;
        rhs.data.get(start..start + k).unwrap_or(&[])
    };
    let mut jb = 0;
    while jb < width {
        let cols: [&[T]; GROUP] = std::array::from_fn(|g| column(jb + g));
        if jb + GROUP <= width && cols.iter().all(|c| c.len() == k) {
            for (kk, row) in out.chunks_exact_mut(width).take(k).enumerate() {
                if let Some(dst) = row.get_mut(jb..jb + GROUP) {
                    for (d, col) in dst.iter_mut().zip(&cols) {
                        // `kk < k == col.len()`: in bounds.
                        #[allow(clippy::indexing_slicing)]
                        {
                            *d = col[kk];
                        }
                    }
                }
            }
            jb += GROUP;
        } else {
            // The last columns of the chunk (fewer than `GROUP`), one at a time.
            let col = column(jb);
            for (slot, &v) in out.iter_mut().skip(jb).step_by(width.max(1)).zip(col) {
                *slot = v;
            }
            jb += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every width around the group size, chunk offsets and row counts, against reading the
    /// column-major source element by element.
    #[test]
    fn transpose_columns_matches_elementwise_copy() -> candle_core::Result<()> {
        for (k, n) in [(1, 20), (5, 19), (16, 33), (9, 64)] {
            // rhs (k × n) column-major: element (i, j) at j * k + i.
            let data: Vec<f64> = (0..k * n).map(|v| v as f64).collect();
            let rhs = MatRef::new(&data, k, n, 1, k)?;
            for j0 in [0, 1, 3] {
                for width in 1..=(n - j0).min(2 * GROUP + 1) {
                    let mut out = vec![f64::NAN; k * width];
                    transpose_columns(rhs, j0, width, &mut out);
                    for i in 0..k {
                        for j in 0..width {
                            assert_eq!(
                                out[i * width + j],
                                rhs.at(i, j0 + j),
                                "k {k} j0 {j0} w {width}"
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
