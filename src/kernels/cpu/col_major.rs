//! Products whose right-hand side is column-major (`rhs.rs == 1`), such as `x Wᵀ` with a
//! row-major weight `W` — every linear layer's forward. The `gemm` crate is slower on them
//! than on row-major operands, and far slower than one matrix-vector product per row when
//! there are only a few rows, so they are rerouted:
//!
//! - fewer rows than one vector holds elements (`lanes`: 8 `f32` with AVX2): one
//!   matrix-vector product per row (the one-row kernel reads the columns contiguously),
//!   rows spread over the threads — for the dtypes and row counts the decode kernel
//!   ([`super::gemv`]) does not take;
//! - few rows against at least `L1d / (16 · size)` columns (512 `f32` with a 32 KiB L1d),
//!   row-major left-hand side: `dstᵀ = rhsᵀ lhsᵀ`, where `rhsᵀ` is row-major as it stands
//!   and `lhsᵀ` a copy, into a temporary that one transposing pass adds into `dst`. This
//!   copies `lhs` and the result instead of the whole right-hand side, which pays while
//!   there are few rows against many columns: "few" is below `4 · lanes` rows (32 `f32`
//!   with AVX2), or below `k / (2 · lanes)` when `n ≤ k` (127 for `2048 × 2048`); with
//!   more rows the chunked route is as fast or faster;
//! - otherwise, at least `2 · chunk` columns, `chunk = 8 · lanes` (64 `f32` with AVX2):
//!   the right-hand side is transposed `chunk` columns at a time into a small row-major
//!   buffer (at most `512 × chunk`, never the whole matrix), each chunk one
//!   single-threaded row-major product into its columns of `dst`, each thread an equal
//!   range of columns, 512 of the inner dimension at a time ([`DEPTH_BLOCK`]).
//!
//! Threads: candle's setting (`RAYON_NUM_THREADS`, else all cores), on rayon's pool.
//!
//! **Thresholds that travel.** The crossovers were measured on an AMD EPYC with AVX2 and a
//! 32 KiB L1d (`benches/RESULTS.md`, "Column-major products"): 8, 32 and `k / 16` rows,
//! 512 and 64 columns for `f32`. They are not kept as constants but as the rules above, in
//! the quantity each one scales with — the vector width in elements of the dtype
//! (`lanes`, from the instruction set the CPU reports) and the L1 data cache (from sysfs or
//! CPUID, [`mod@super::machine`]) — which give those measured values on that machine and
//! scale with a wider vector (AVX-512), a narrower one (the portable code), another dtype
//! or another cache elsewhere.

use candle_core::WithDType;
use rayon::prelude::*;

use super::machine::{machine, Machine};
use super::transpose::{par_transpose, transpose_columns};
use super::{gemm_raw, Accum, MatProduct, MatRef};

/// How much of the inner dimension the chunked route multiplies at a time: about the
/// depth the `gemm` crate blocks by itself (`gemm_common::cache::kernel_params` evens a
/// deeper inner dimension into blocks of at most its L1-derived depth, which is at least
/// 512: 1100 goes as 3 × 367 there). With blocks of at most 512 every call's own depth
/// block is its whole depth, whichever of the `gemm` crate's paths a chunk takes. Each block of `lhs` (`m × 512`) is read
/// by all of a thread's chunks while it is in the L2 cache (1 MiB at `m = 512` rows of
/// `f32`), where the whole depth went through every chunk, re-read from L3 or memory once
/// per chunk. `x Wᵀ` on an Intel Xeon (2 MiB L2, 2 threads, f32, 512 rows; 20
/// interleaved rounds, medians, two runs): 15.6 / 21.0 against 16.5 / 22.3 ms at
/// `d = 2048`, 86.2 / 95.6 against 90.5 / 99.8 at 4096, even at 1024 and at 2048 rows
/// (whose blocks do not fit in L2); blocks of 256 were slower than the whole depth
/// (`benches/RESULTS.md`, "Depth blocks of the chunked route").
const DEPTH_BLOCK: usize = 512;

/// The route thresholds for elements of `size` bytes on a machine (the module docs' rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Thresholds {
    /// Columns transposed per chunk.
    chunk: usize,
    /// Row counts below this go row by row.
    row_by_row_below: usize,
    /// Row counts from `row_by_row_below` up to below this go through transposes (with at
    /// least `via_transposes_min_cols` columns).
    via_transposes_below: usize,
    /// Products with `n ≤ k` also go through transposes below `k / deep_divisor` rows.
    deep_divisor: usize,
    /// The fewest columns for which the transposed route is taken.
    via_transposes_min_cols: usize,
}

/// Columns transposed per chunk of the chunked route for elements of `size` bytes on
/// `machine`: `8 · lanes` (128 `f32` with AVX-512, 64 with AVX2). The products of
/// [`super::thin`] are at most this wide or deep.
pub(super) fn chunk_width(size: usize, machine: &Machine) -> usize {
    8 * machine.isa.lanes(size)
}

impl Thresholds {
    fn new(size: usize, machine: &Machine) -> Self {
        let lanes = machine.isa.lanes(size);
        Self {
            chunk: chunk_width(size, machine),
            row_by_row_below: lanes,
            via_transposes_below: 4 * lanes,
            deep_divisor: 2 * lanes,
            via_transposes_min_cols: (machine.l1d / (16 * size.max(1))).max(1),
        }
    }

    /// The thresholds for `T` on this machine.
    fn of<T>() -> Self {
        Self::new(std::mem::size_of::<T>(), machine())
    }

    /// The fewest columns the chunked route takes: two chunks (one per thread of two).
    fn chunked_min_cols(&self) -> usize {
        2 * self.chunk
    }
}

/// The fewest columns of a column-major right-hand side with which a product of many rows
/// takes the chunked route, for `T` on this machine (`2 · chunk`: 256 `f32` with AVX-512,
/// 128 with AVX2). A caller that chooses the width of its products (the quantized weight's
/// dequantized tiles, [`super::quant`]) makes them at least this wide: narrower ones go to
/// the `gemm` crate as they stand, which reads such a right-hand side slowly and packs the
/// left-hand side again for every product.
pub(super) fn chunked_route_min_cols<T>() -> usize {
    Thresholds::of::<T>().chunked_min_cols()
}

/// Whether an `lhs · rhs` product of `T` would take the chunked route on this machine
/// (many rows against a column-major right-hand side): the products that
/// [`super::packed`] takes in its place for `f32` on AVX-512 or AVX2, leaving the rows-few routes
/// here their measured crossovers.
pub(super) fn takes_chunked<T>(lhs: &MatRef<T>, rhs: &MatRef<T>) -> bool {
    route_by(lhs, rhs, &Thresholds::of::<T>()) == Some(Route::Chunked)
}

/// Whether [`reroute`] takes `product` (one of the reroutes above is its route).
#[cfg(target_arch = "x86_64")]
pub(super) fn takes<T>(product: &MatProduct<T>) -> bool {
    route_by(&product.lhs, &product.rhs, &Thresholds::of::<T>()).is_some()
}

/// The reroutes above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    RowByRow,
    ViaTransposes,
    Chunked,
}

/// The reroute for an `lhs · rhs` product, or `None` when it should go straight to `gemm`
/// (a row-major `rhs`, one row, or too few columns).
fn route_by<T>(lhs: &MatRef<T>, rhs: &MatRef<T>, th: &Thresholds) -> Option<Route> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rs != 1 || rhs.cs == 1 || k < 2 || m < 2 {
        return None;
    }
    if m < th.row_by_row_below {
        return Some(Route::RowByRow);
    }
    if lhs.cs == 1 && n >= th.via_transposes_min_cols {
        let few_rows = m < th.via_transposes_below;
        let few_for_a_deep_product = n <= k && m < k / th.deep_divisor;
        if few_rows || few_for_a_deep_product {
            return Some(Route::ViaTransposes);
        }
    }
    (n >= th.chunked_min_cols()).then_some(Route::Chunked)
}

/// Runs [`super::gemm_into`]'s product (`dst = beta · lhs · rhs`, or `+=` with
/// [`Accum::Add`]) by its route ([`route_by`]) and returns `Some`, or `None` when the
/// product should go straight to `gemm`. The caller has checked the shapes and that `dst`
/// holds the `m × n` result at row stride `dst_rs ≥ n`.
pub(super) fn reroute<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
) -> Option<candle_core::Result<()>> {
    let th = Thresholds::of::<T>();
    reroute_by(&th, dst, dst_rs, product)
}

/// [`reroute`] with given thresholds.
fn reroute_by<T: WithDType>(
    th: &Thresholds,
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
) -> Option<candle_core::Result<()>> {
    let (lhs, rhs, accum, beta) = product.parts();
    let product = Product {
        lhs,
        rhs,
        accum,
        beta,
        chunk: th.chunk.max(1),
    };
    Some(match route_by(&lhs, &rhs, th)? {
        Route::RowByRow => product.row_by_row(dst, dst_rs),
        Route::ViaTransposes => product.via_transposes(dst, dst_rs),
        Route::Chunked => product.chunked(dst, dst_rs),
    })
}

/// The operands of one rerouted product.
#[derive(Clone, Copy)]
struct Product<'a, T> {
    lhs: MatRef<'a, T>,
    rhs: MatRef<'a, T>,
    accum: Accum,
    beta: T,
    /// Columns per chunk of the chunked route.
    chunk: usize,
}

/// A destination pointer shared by threads that write disjoint elements.
#[derive(Clone, Copy)]
pub(super) struct SharedDst<T>(pub(super) *mut T);

// SAFETY: only used by `Product::chunked`, `Product::rhs_t_times` and the packed
// products (`super::packed`), whose tasks write disjoint ranges.
unsafe impl<T> Send for SharedDst<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedDst<T> {}

/// `0..len` cut into one contiguous range per thread of rayon's pool, in whole `unit`s
/// as evenly as the units allow, the last range ending at `len` (a part of a unit left
/// over goes with the last whole one, so no range is narrower than a unit unless `len`
/// is), as a parallel iterator of `(start, end)`. A range of one row or column would
/// reach the `gemm` crate as a one-column product, which it multiplies by other kernels
/// than a wider one, so the bits would depend on the thread count.
pub(super) fn even_ranges(
    len: usize,
    unit: usize,
) -> impl IndexedParallelIterator<Item = (usize, usize)> {
    let unit = unit.max(1);
    let units = (len / unit).max(1);
    let tasks = rayon::current_num_threads().clamp(1, units);
    (0..tasks).into_par_iter().map(move |task| {
        let start = (task * units / tasks * unit).min(len);
        let end = match task + 1 == tasks {
            true => len,
            false => ((task + 1) * units / tasks * unit).min(len),
        };
        (start, end)
    })
}

/// The width of the chunk at `j0` of a task's columns ending at `end`: `chunk`, or all
/// that is left when less than `chunk + unit` is (so the last chunk is at least a unit
/// wide, never the one-column piece that the `gemm` crate would multiply by other kernels,
/// and the bits do not depend on how the columns were cut into tasks).
fn chunk_at(j0: usize, end: usize, chunk: usize, unit: usize) -> usize {
    let rest = end.saturating_sub(j0);
    match rest < chunk + unit {
        true => rest,
        false => chunk,
    }
}

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
                        self.accum,
                        self.beta,
                        gemm::Parallelism::None,
                    )
                };
                Ok(())
            })
    }

    /// `dstᵀ = rhsᵀ lhsᵀ` with both factors row-major (`rhsᵀ` is, `lhsᵀ` is copied) into a
    /// temporary, added into `dst` by a transposing pass.
    fn via_transposes(self, dst: &mut [T], dst_rs: usize) -> candle_core::Result<()> {
        let (m, k, n) = (self.lhs.rows, self.lhs.cols, self.rhs.cols);
        let zero = T::from_f64(0.0);
        // lhsᵀ (k × m), row-major: the rows of the row-major lhs are its columns.
        let mut lhs_t = vec![zero; k * m];
        par_transpose(self.lhs.t(), &mut lhs_t, m, |d, v| *d = v);
        let mut dst_t = vec![zero; n * m];
        self.rhs_t_times(MatRef::contiguous(&lhs_t, k, m)?, &mut dst_t)?;
        let (accum, beta) = (self.accum, self.beta);
        // dst_t read as the column-major m × n product.
        let product = MatRef::new(&dst_t, m, n, 1, m)?;
        par_transpose(product, dst, dst_rs, |d, v| {
            *d = match accum {
                Accum::Replace => beta * v,
                Accum::Add => *d + beta * v,
            }
        });
        Ok(())
    }

    /// `dst_t = rhsᵀ · lhs_t` (`n × m`, row stride `m`) for [`Product::via_transposes`],
    /// `rhsᵀ`'s rows (the output's rows) split evenly over the threads, one
    /// single-threaded `gemm` call each. The `gemm` crate's own threading splits these
    /// products less evenly: it lays `lhs_t`'s few columns along its vectors, and at 20 or
    /// 24 of them (`f32`, AVX-512) the split ran 10–15% faster on an AMD EPYC
    /// (`benches/RESULTS.md`, "Where the dots stop paying"). Products below the `gemm`
    /// crate's threading threshold stay one call on this thread, as `gemm` would keep them.
    fn rhs_t_times(self, lhs_t: MatRef<'_, T>, dst_t: &mut [T]) -> candle_core::Result<()> {
        let (k, m, n) = (lhs_t.rows, lhs_t.cols, self.rhs.cols);
        let one = T::from_f64(1.0);
        if m.saturating_mul(n).saturating_mul(k) < gemm::get_threading_threshold() {
            // SAFETY: `dst_t` holds the `n × m` result at row stride `m`.
            unsafe {
                gemm_raw(
                    dst_t.as_mut_ptr(),
                    m,
                    self.rhs.t(),
                    lhs_t,
                    Accum::Replace,
                    one,
                    gemm::Parallelism::None,
                )
            };
            return Ok(());
        }
        let shared = SharedDst(dst_t.as_mut_ptr());
        even_ranges(n, self.chunk.div_ceil(2)).try_for_each(|(start, end)| {
            let rows = self.rhs.cols_range(start, end - start)?.t();
            let dst = shared;
            // SAFETY: rows `start..end` of the `n × m` buffer `dst_t`; the ranges are
            // disjoint, so no two calls touch one element.
            unsafe {
                gemm_raw(
                    dst.0.add(start * m),
                    m,
                    rows,
                    lhs_t,
                    Accum::Replace,
                    one,
                    gemm::Parallelism::None,
                )
            };
            Ok(())
        })
    }

    /// The columns in units of half a chunk, split evenly over the threads (each thread
    /// one contiguous range, taken a chunk at a time): equal-width chunks spread by
    /// work-stealing left one thread idle for the last chunk whenever their count was odd
    /// (11 chunks of 128 for 1408 columns: 6 against 5). A task's last chunk takes what
    /// is left when less than a chunk and a half is ([`chunk_at`]). A deep product goes
    /// [`DEPTH_BLOCK`] of its inner dimension at a time, each block through all of the
    /// thread's chunks, accumulating into `dst`.
    fn chunked(self, dst: &mut [T], dst_rs: usize) -> candle_core::Result<()> {
        let (k, n) = (self.rhs.rows, self.rhs.cols);
        let (chunk, unit) = (self.chunk, self.chunk.div_ceil(2));
        let kc = DEPTH_BLOCK.min(k).max(1);
        let shared = SharedDst(dst.as_mut_ptr());
        even_ranges(n, unit).try_for_each(|(start, end)| {
            let widest = (chunk + unit).min(end - start);
            let mut block = vec![T::from_f64(0.0); kc * widest];
            for k0 in (0..k).step_by(kc) {
                let depth = kc.min(k - k0);
                let lhs = self.lhs.cols_range(k0, depth)?;
                let rhs = self.rhs.rows_range(k0, depth)?;
                let accum = if k0 == 0 { self.accum } else { Accum::Add };
                let mut j0 = start;
                while j0 < end {
                    let width = chunk_at(j0, end, chunk, unit);
                    let block = block.get_mut(..depth * width).unwrap_or_default();
                    transpose_columns(rhs, j0, width, block, width, |d, v| *d = v);
                    let block = MatRef::contiguous(block, depth, width)?;
                    let dst = shared;
                    // SAFETY: columns `j0..j0 + width` of the caller's checked `m × n`
                    // destination; the tasks' column ranges are disjoint, and a task's
                    // products run one after another, so no two calls touch one element
                    // at once.
                    unsafe {
                        gemm_raw(
                            dst.0.add(j0),
                            dst_rs,
                            lhs,
                            block,
                            accum,
                            self.beta,
                            gemm::Parallelism::None,
                        )
                    };
                    j0 += width.max(1);
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::machine::Isa;
    use super::super::{assert_matches_triple_loop, gemm_into, on_threads, test_values as vals};
    use super::*;

    /// The machine the crossovers were measured on: AVX2, 32 KiB L1d.
    const MEASURED_ON: Machine = Machine {
        isa: Isa::Avx2,
        l1d: 32 << 10,
        l2: 512 << 10,
        decode_kernel: false,
    };

    /// The chunked and transposed routes give the same bits on 1, 2, 3 and 5 threads, at
    /// widths that leave a one-column piece over for some thread counts (129 = 2 · 64 + 1
    /// with the AVX2 thresholds' 64-column chunks): the `gemm` crate multiplies a one-column
    /// product by other kernels than a wider one.
    #[test]
    fn routes_give_the_same_bits_on_any_thread_count() -> candle_core::Result<()> {
        let th = Thresholds::new(8, &MEASURED_ON);
        for (m, k, n, want) in [
            (100, 1030, 129, Route::Chunked),
            (100, 300, 161, Route::Chunked),
            (40, 1100, 513, Route::ViaTransposes),
        ] {
            let lhs_data = vals(m * k, 0.37);
            let lhs = MatRef::contiguous(&lhs_data, m, k)?;
            let rhs_data = vals(k * n, 0.71);
            let rhs = MatRef::new(&rhs_data, k, n, 1, k)?;
            assert_eq!(route_by(&lhs, &rhs, &th), Some(want), "{m}x{k}x{n}");
            let run = |threads: usize| -> candle_core::Result<Vec<f64>> {
                let mut dst = vec![0.0; m * n];
                let product = MatProduct::new(lhs, rhs, Accum::Replace, 0.5);
                on_threads(threads, || reroute_by(&th, &mut dst, n, product))?
                    .unwrap_or_else(|| candle_core::bail!("{m}x{k}x{n}: not rerouted"))?;
                Ok(dst)
            };
            let one = run(1)?;
            for threads in [2, 3, 5] {
                let many = run(threads)?;
                let same = one
                    .iter()
                    .zip(&many)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{m}x{k}x{n} ({want:?}): 1 and {threads} threads differ"
                );
            }
        }
        Ok(())
    }

    /// The rules give the measured `f32` crossovers on the machine they were measured on,
    /// and scale with the vector width and the dtype.
    #[test]
    fn thresholds_reproduce_the_measured_crossovers() {
        let th = Thresholds::new(4, &MEASURED_ON);
        let want = Thresholds {
            chunk: 64,
            row_by_row_below: 8,
            via_transposes_below: 32,
            deep_divisor: 16,
            via_transposes_min_cols: 512,
        };
        assert_eq!(th, want);
        let wide = Thresholds::new(
            4,
            &Machine {
                isa: Isa::Avx512,
                l1d: 48 << 10,
                ..MEASURED_ON
            },
        );
        assert_eq!(
            (
                wide.row_by_row_below,
                wide.chunk,
                wide.via_transposes_min_cols
            ),
            (16, 128, 768)
        );
        let f64_avx2 = Thresholds::new(8, &MEASURED_ON);
        assert_eq!(
            (f64_avx2.row_by_row_below, f64_avx2.via_transposes_below),
            (4, 16)
        );
    }

    /// Every route (and the straight `gemm` call) at the thresholds of the machine they
    /// were measured on, `f64` (the decode kernel, which takes the fewest rows first in
    /// `gemm_into`, is bypassed), a row-major, a column-major and a
    /// padded row-major `lhs`, a column-major `rhs` that is a slice of a taller matrix, a
    /// padded destination, accumulation and `beta`, against an f64 triple loop.
    #[test]
    fn every_route_matches_a_triple_loop() -> candle_core::Result<()> {
        let th = Thresholds::new(4, &MEASURED_ON);
        let shapes = [
            (3, 40, 50),     // row by row
            (8, 40, 515),    // via transposes (few rows; one call, below gemm's threading)
            (40, 700, 520),  // via transposes (fewer than k / 16 rows, n ≤ k; split)
            (20, 40, 150),   // chunked
            (70, 9, 200),    // chunked, short k
            (20, 1100, 150), // chunked, three depth blocks
            (9, 30, 20),     // straight to gemm
        ];
        let mut seen = Vec::new();
        for (m, k, n) in shapes {
            let lhs_data = vals(m * k, 0.37);
            let lhs_t_data: Vec<f64> = (0..k * m).map(|v| lhs_data[(v % m) * k + v / m]).collect();
            // rhs (k × n) column-major inside a (k + 3)-row buffer: column j at j * (k + 3).
            let rhs_data = vals((k + 3) * n, 0.71);
            let rhs = MatRef::new(&rhs_data, k, n, 1, k + 3)?;
            // Rows padded to k + 2 with NaN (a slice of a wider matrix).
            let lhs_padded: Vec<f64> = (0..m * (k + 2))
                .map(|v| match v % (k + 2) < k {
                    true => lhs_data[(v / (k + 2)) * k + v % (k + 2)],
                    false => f64::NAN,
                })
                .collect();
            let lhs_views = [
                MatRef::contiguous(&lhs_data, m, k)?,
                MatRef::new(&lhs_t_data, m, k, 1, m)?,
                MatRef::new(&lhs_padded, m, k, k + 2, 1)?,
            ];
            for lhs in lhs_views {
                seen.push(route_by(&lhs, &rhs, &th));
                for (accum, beta) in [(Accum::Replace, 1.0), (Accum::Add, -0.5)] {
                    let dst_rs = n + 2;
                    let start = vals(m * dst_rs, 1.3);
                    let mut dst = start.clone();
                    match reroute_by(
                        &th,
                        &mut dst,
                        dst_rs,
                        MatProduct::new(lhs, rhs, accum, beta),
                    ) {
                        Some(done) => done?,
                        None => gemm_into(&mut dst, dst_rs, lhs, rhs, accum, beta)?,
                    }
                    let product = MatProduct::new(lhs, rhs, accum, beta);
                    let route = format!("{:?}", route_by(&lhs, &rhs, &th));
                    assert_matches_triple_loop(&dst, &start, dst_rs, product, 1e-12, &route);
                }
            }
        }
        for want in [
            Some(Route::RowByRow),
            Some(Route::ViaTransposes),
            Some(Route::Chunked),
            None,
        ] {
            assert!(
                seen.contains(&want),
                "route {want:?} not exercised: {seen:?}"
            );
        }
        Ok(())
    }
}
