//! Copying the columns of a column-major matrix into the rows of a row-major one (a
//! transpose), for the column-major reroutes of [`super::col_major`] and the row-major
//! copies of a column-major right-hand side that the decode kernel ([`super::gemv`]) and
//! the thin split ([`super::thin`]) make.
//!
//! Each source column is contiguous. `GROUP` of them are read side by side from start to
//! end (a few sequential streams, which the hardware prefetcher follows even when the
//! source is not in cache) and each output row gets `GROUP` adjacent elements at a time,
//! rather than a short piece of every column in turn (one stream per column, which it does
//! not follow: see `benches/RESULTS.md`, "Column-major products").

use candle_core::WithDType;
use rayon::prelude::*;

use super::{MatRef, Scratch};

/// Source columns copied together.
const GROUP: usize = 8;

/// Output rows per task of [`par_transpose`].
const ROWS_PER_TASK: usize = 64;

/// For each row `i < src.rows` and column `j < width`, `store(&mut out[i * out_rs + j],
/// src(i, j0 + j))`. `src` must be column-major (`rs == 1`); elements outside `src` or `out`
/// are skipped (the callers' views are checked).
pub(super) fn transpose_columns<T: WithDType>(
    src: MatRef<T>,
    j0: usize,
    width: usize,
    out: &mut [T],
    out_rs: usize,
    store: impl Fn(&mut T, T),
) {
    let k = src.rows;
    if width == 0 || k == 0 || out_rs < width {
        return;
    }
    let column = |j: usize| -> &[T] {
        let start = (j0 + j) * src.cs;
        src.data.get(start..start + k).unwrap_or(&[])
    };
    let mut jb = 0;
    while jb < width {
        let cols: [&[T]; GROUP] = std::array::from_fn(|g| column(jb + g));
        if jb + GROUP <= width && cols.iter().all(|c| c.len() == k) {
            for (i, row) in out.chunks_mut(out_rs).take(k).enumerate() {
                if let Some(dst) = row.get_mut(jb..jb + GROUP) {
                    for (d, col) in dst.iter_mut().zip(&cols) {
                        // `i < k == col.len()`: in bounds.
                        #[allow(clippy::indexing_slicing)]
                        {
                            store(d, col[i]);
                        }
                    }
                }
            }
            jb += GROUP;
        } else {
            // The last columns (fewer than `GROUP`), one at a time.
            for (slot, &v) in out.iter_mut().skip(jb).step_by(out_rs).zip(column(jb)) {
                store(slot, v);
            }
            jb += 1;
        }
    }
}

/// Where [`row_major_copy`] copies: on the calling thread, or spread over rayon's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CopyOn {
    /// The calling thread (a small copy on the decode path, where waking the pool costs
    /// more than it saves).
    CallingThread,
    /// Rayon's pool, [`ROWS_PER_TASK`] output rows a task ([`par_transpose`]).
    Pool,
}

/// A row-major copy of the column-major `src` (`rs == 1`), `src.rows × src.cols` at row
/// stride `src.cols`, in a pooled buffer that the transpose writes whole.
pub(super) fn row_major_copy<T: WithDType>(src: MatRef<T>, on: CopyOn) -> Scratch<T> {
    let (k, n) = (src.rows, src.cols);
    let mut copy = Scratch::overwritten(k * n);
    match on {
        CopyOn::CallingThread => transpose_columns(src, 0, n, &mut copy, n, |d, v| *d = v),
        CopyOn::Pool => par_transpose(src, &mut copy, n, |d, v| *d = v),
    }
    copy
}

/// [`transpose_columns`] of all of `src`'s columns, output rows spread over rayon's pool
/// in blocks of [`ROWS_PER_TASK`].
pub(super) fn par_transpose<T: WithDType>(
    src: MatRef<T>,
    out: &mut [T],
    out_rs: usize,
    store: impl Fn(&mut T, T) + Sync,
) {
    let width = src.cols;
    if out_rs == 0 {
        return;
    }
    out.par_chunks_mut(ROWS_PER_TASK * out_rs)
        .enumerate()
        .for_each(|(blk, out)| {
            let first = blk * ROWS_PER_TASK;
            let rows = ROWS_PER_TASK.min(src.rows.saturating_sub(first));
            let block = MatRef {
                data: src.data.get(first..).unwrap_or(&[]),
                rows,
                ..src
            };
            transpose_columns(block, 0, width, out, out_rs, &store);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every width around the group size, column offsets and row counts (more than one
    /// task's rows included), against reading the source element by element.
    #[test]
    fn transposes_match_elementwise_copy() -> candle_core::Result<()> {
        for (k, n) in [(1, 20), (5, 19), (16, 33), (9, 64), (ROWS_PER_TASK + 3, 11)] {
            // src (k × n) column-major: element (i, j) at j * k + i.
            let data: Vec<f64> = (0..k * n).map(|v| v as f64).collect();
            let src = MatRef::new(&data, k, n, 1, k)?;
            for j0 in [0, 1, 3] {
                for width in 1..=(n - j0).min(2 * GROUP + 1) {
                    for out_rs in [width, width + 2] {
                        let mut out = vec![f64::NAN; k * out_rs];
                        transpose_columns(src, j0, width, &mut out, out_rs, |d, v| *d = v);
                        for i in 0..k {
                            for j in 0..width {
                                assert_eq!(out[i * out_rs + j], src.at(i, j0 + j));
                            }
                        }
                    }
                }
            }
            // The parallel whole-matrix version, accumulating.
            let mut out = vec![1.0; k * (n + 1)];
            par_transpose(src, &mut out, n + 1, |d, v| *d += 2.0 * v);
            for i in 0..k {
                for j in 0..n {
                    assert_eq!(out[i * (n + 1) + j], 1.0 + 2.0 * src.at(i, j));
                }
                assert_eq!(out[i * (n + 1) + n], 1.0);
            }
        }
        Ok(())
    }
}
