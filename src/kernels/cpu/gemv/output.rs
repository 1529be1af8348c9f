//! Where the decode kernel's products go: its two forms leave a product's `m × n` result
//! in their own layouts ([`Products`]), and one pass writes it to the destination, as is
//! or transposed ([`Orientation`]), applying `beta` and [`Accum`] (so a bias pre-fill and
//! the low-rank term stay in one output buffer).
//!
//! Each of the four layout and orientation pairs has its own loop over runs of the
//! destination's rows, reading the products at a fixed stride, with no index arithmetic
//! per element. Three of them went through one general loop that worked out each
//! element's place (the row-major form's blocks as they stand already wrote runs), which
//! took 2.3–4.4× as long, the same bits either way (an Intel Xeon, family 6 model 207,
//! `f32`, `Accum::Add`, the two alternating in one process; `benches/RESULTS.md`, "Writing
//! the decode kernel's products"): `dB` transposed at `r = 8`, `d = 1024` 38 → 13 µs, the
//! one-row forward's 2048 dots 3.2 → 1.2 µs, 4 rows' 12.8 → 5.2.

use candle_core::WithDType;

use super::super::same_type::same_slice;
use super::super::Accum;

/// Where a product's `m × n` result goes in the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Orientation {
    /// Element `(i, j)` to `dst(i, j)`.
    AsIs,
    /// Element `(i, j)` to `dst(j, i)`: the product is the transpose of the one asked
    /// for ([`super::transposed`]).
    Transposed,
}

/// The shape of a product's result and what to do with the destination's contents.
#[derive(Clone, Copy)]
pub(super) struct Output<T> {
    pub m: usize,
    pub n: usize,
    pub accum: Accum,
    pub beta: T,
}

/// A product's `m × n` result as the kernel's forms leave it, before it reaches the
/// destination.
pub(super) enum Products<F> {
    /// Element `(i, j)` at `j · m + i` ([`super::dots`]).
    Dots(Vec<F>),
    /// The row-major form's per-task blocks ([`super::row_major::products`]): the task at
    /// column `first` (a multiple of the `usize`) holds its `m × width` block row-major
    /// from `first · m`.
    Blocks(Vec<F>, usize),
}

impl<F: WithDType> Products<F> {
    /// Writes the `out.m × out.n` result to `dst` (row stride `dst_rs`) as `orientation`
    /// says: `dst = beta · product` ([`Accum::Replace`]) or `dst += beta · product`
    /// ([`Accum::Add`]). `F` is `T`, the kernel's dtype (checked).
    pub(super) fn apply<T: WithDType>(
        &self,
        dst: &mut [T],
        dst_rs: usize,
        out: Output<T>,
        orientation: Orientation,
    ) -> candle_core::Result<()> {
        let Output { m, n, accum, beta } = out;
        let (Products::Dots(values) | Products::Blocks(values, _)) = self;
        let Some(values) = same_slice::<F, T>(values).filter(|v| v.len() == m * n) else {
            candle_core::bail!(
                "fused linear: the decode kernel's products do not fill a {m}x{n} result"
            )
        };
        if m == 0 || n == 0 {
            return Ok(());
        }
        let rows = dst.chunks_mut(dst_rs.max(1));
        match (self, orientation) {
            // Row `i` of the result: every `m`-th product from the `i`-th.
            (Products::Dots(_), Orientation::AsIs) => {
                for (i, row) in rows.take(m).enumerate() {
                    let src = values.get(i..).unwrap_or(&[]);
                    write_run(row, src.iter().step_by(m), accum, beta);
                }
            }
            // Column `j` of the result, `m` products in a run, is row `j` of `dst`.
            (Products::Dots(_), Orientation::Transposed) => {
                for (row, src) in rows.take(n).zip(values.chunks_exact(m)) {
                    write_run(row, src.iter(), accum, beta);
                }
            }
            // Row `i` of each block is a run of destination row `i`.
            (Products::Blocks(_, per_task), Orientation::AsIs) => {
                for (i, row) in rows.take(m).enumerate() {
                    for (first, width, block) in blocks(values, m, n, *per_task) {
                        let src = block.get(i * width..(i + 1) * width).unwrap_or(&[]);
                        let run = row.get_mut(first..first + width).unwrap_or(&mut []);
                        write_run(run, src.iter(), accum, beta);
                    }
                }
            }
            // A block's column, every `width`-th product, is a run of a destination row.
            (Products::Blocks(_, per_task), Orientation::Transposed) => {
                let mut rows = rows.take(n);
                for (_, width, block) in blocks(values, m, n, *per_task) {
                    for (column, row) in rows.by_ref().take(width).enumerate() {
                        let src = block.get(column..).unwrap_or(&[]);
                        write_run(row, src.iter().step_by(width), accum, beta);
                    }
                }
            }
        }
        Ok(())
    }
}

/// `run = beta · src` ([`Accum::Replace`]) or `run += beta · src` ([`Accum::Add`]), as
/// far as both go (each caller's `src` ends where the result's run does).
#[inline(always)]
fn write_run<'a, T: WithDType>(
    run: &mut [T],
    src: impl Iterator<Item = &'a T>,
    accum: Accum,
    beta: T,
) {
    match accum {
        Accum::Replace => run.iter_mut().zip(src).for_each(|(d, &v)| *d = beta * v),
        Accum::Add => run.iter_mut().zip(src).for_each(|(d, &v)| *d += beta * v),
    }
}

/// The row-major form's blocks of an `m × n` result in `values` (`m · n` of them), in
/// order: each task's first column, its width (`per_task`, less in the last; at least 1)
/// and its `m × width` block.
fn blocks<T>(
    values: &[T],
    m: usize,
    n: usize,
    per_task: usize,
) -> impl Iterator<Item = (usize, usize, &[T])> {
    let per_task = per_task.max(1);
    (0..n).step_by(per_task).map(move |first| {
        let width = per_task.min(n - first);
        let block = values.get(first * m..(first + width) * m).unwrap_or(&[]);
        (first, width, block)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element `(i, j)` of an `m × n` result in the layouts the [`Products`] docs give:
    /// the dots column by column; the blocks, task by task, each row-major.
    fn at(products: &Products<f64>, m: usize, n: usize, i: usize, j: usize) -> f64 {
        match products {
            Products::Dots(v) => v[j * m + i],
            Products::Blocks(v, per_task) => {
                let first = j / per_task * per_task;
                let width = (*per_task).min(n - first);
                v[first * m + i * width + (j - first)]
            }
        }
    }

    /// Every layout, orientation and [`Accum`], with blocks that do and do not divide the
    /// result (and one wider than it), single rows and columns and a padded destination:
    /// each destination element is `beta ·` its product (plus what was there, with
    /// [`Accum::Add`]), and the padding keeps its values.
    #[test]
    fn every_layout_lands_where_its_docs_say() -> candle_core::Result<()> {
        for (m, n) in [(3, 10), (1, 7), (5, 1), (4, 16)] {
            let values: Vec<f64> = (0..m * n).map(|v| v as f64 + 0.5).collect();
            let layouts = [
                Products::Dots(values.clone()),
                Products::Blocks(values.clone(), 4),
                Products::Blocks(values.clone(), 3),
                Products::Blocks(values.clone(), 64),
            ];
            for products in &layouts {
                for orientation in [Orientation::AsIs, Orientation::Transposed] {
                    for (accum, beta) in [(Accum::Replace, 2.0), (Accum::Add, -0.5)] {
                        let (rows, cols) = match orientation {
                            Orientation::AsIs => (m, n),
                            Orientation::Transposed => (n, m),
                        };
                        let dst_rs = cols + 2;
                        let start: Vec<f64> = (0..rows * dst_rs).map(|v| -(v as f64)).collect();
                        let mut dst = start.clone();
                        let out = Output { m, n, accum, beta };
                        products.apply(&mut dst, dst_rs, out, orientation)?;
                        for (r, row) in dst.chunks(dst_rs).enumerate() {
                            for (c, &got) in row.iter().enumerate() {
                                let old = start[r * dst_rs + c];
                                let want = match (c < cols, orientation) {
                                    (false, _) => old,
                                    (true, Orientation::AsIs) => at(products, m, n, r, c),
                                    (true, Orientation::Transposed) => at(products, m, n, c, r),
                                };
                                let want = match (c < cols, accum) {
                                    (false, _) => want,
                                    (true, Accum::Replace) => beta * want,
                                    (true, Accum::Add) => old + beta * want,
                                };
                                assert_eq!(got, want, "{m}x{n} {orientation:?} at ({r}, {c})");
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Products that do not fill the result, or of another dtype than the destination,
    /// are an error, and the destination is left as it was.
    #[test]
    fn a_short_or_mistyped_result_is_an_error() {
        let out = Output {
            m: 2,
            n: 3,
            accum: Accum::Replace,
            beta: 1.0,
        };
        let mut dst = vec![7.0f64; 6];
        let short = Products::Blocks(vec![1.0f64; 5], 2);
        assert!(short.apply(&mut dst, 3, out, Orientation::AsIs).is_err());
        let mut dst32 = vec![7.0f32; 6];
        let out32 = Output {
            m: 2,
            n: 3,
            accum: Accum::Replace,
            beta: 1.0f32,
        };
        let mistyped = Products::Dots(vec![1.0f64; 6]);
        assert!(mistyped
            .apply(&mut dst32, 3, out32, Orientation::AsIs)
            .is_err());
        assert!(dst.iter().all(|&v| v == 7.0) && dst32.iter().all(|&v| v == 7.0));
    }
}
