//! CPU kernels of the fused low-rank linear: strided matrix views ([`MatRef`]) and the
//! products that accumulate into one output buffer ([`gemm_into`], [`product_into`]),
//! each offered to the routes of [`mod@route`] in turn. The layer's forward and backward
//! built from them are in [`mod@low_rank`], the views over candle's buffers in
//! [`mod@views`].

use candle_core::WithDType;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(any(feature = "openblas", feature = "mkl"))]
mod blas;
mod col_major;
mod gemv;
mod in_place;
mod low_rank;
mod machine;
#[cfg(target_arch = "x86_64")]
mod packed;
mod pool;
mod prefetch;
mod quant;
mod route;
mod rowwise;
mod same_type;
mod scaled;
mod thin;
mod transpose;
mod views;

pub(crate) use in_place::AddProduct;
pub(crate) use low_rank::{backward, dropped_copy, forward, Backward, Forward, Need};
pub(crate) use machine::{machine, Isa};
pub(crate) use pool::{Pooled, Scratch};
pub(crate) use quant::WeightMat;
pub(crate) use scaled::{scaled_backward, scaled_forward, ScaledForward, ScaledNeed, ScaledSaved};
pub(crate) use views::{
    as_rows, gather_strided, gather_vec, mat_of_layout, output_shape, slice_of, with_slice,
};

/// A read-only strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T: Copy> MatRef<'a, T> {
    /// A view, checked to stay inside `data`.
    pub(crate) fn new(
        data: &'a [T],
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    ) -> candle_core::Result<Self> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * rs + (cols - 1) * cs;
            if last >= data.len() {
                candle_core::bail!(
                    "fused linear: a {rows}x{cols} view (strides {rs}, {cs}) overruns a buffer of {}",
                    data.len()
                );
            }
        }
        Ok(Self {
            data,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// A contiguous row-major view.
    pub(crate) fn contiguous(data: &'a [T], rows: usize, cols: usize) -> candle_core::Result<Self> {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transposed view (no copy).
    pub(crate) fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Element `(i, j)`; callers keep `i < rows`, `j < cols`.
    #[inline]
    #[allow(clippy::indexing_slicing)] // hot path; `new` checked every in-range index
    fn at(&self, i: usize, j: usize) -> T {
        self.data[i * self.rs + j * self.cs]
    }

    /// Row `i` as a slice when its elements are adjacent (`cs == 1`); callers keep
    /// `i < rows`.
    #[inline]
    fn row(&self, i: usize) -> Option<&'a [T]> {
        (self.cs == 1)
            .then(|| self.data.get(i * self.rs..i * self.rs + self.cols))
            .flatten()
    }

    /// Row `i` (callers keep `i < rows`): a slice of the data when its elements are
    /// adjacent, else copied into `buf`.
    fn row_or_copy<'s>(&'s self, i: usize, buf: &'s mut Vec<T>) -> &'s [T] {
        if let Some(row) = self.row(i) {
            return row;
        }
        buf.clear();
        buf.extend((0..self.cols).map(|j| self.at(i, j)));
        buf
    }

    /// Element `(i, j)`, or an error outside the view.
    pub(crate) fn at_checked(&self, i: usize, j: usize) -> candle_core::Result<T> {
        if i >= self.rows || j >= self.cols {
            candle_core::bail!(
                "fused linear: ({i}, {j}) outside a {}x{} view",
                self.rows,
                self.cols
            );
        }
        Ok(self.at(i, j))
    }

    /// The first `cols` columns (callers keep `cols` ≤ the view's columns).
    pub(crate) fn narrow_cols(self, cols: usize) -> Self {
        Self {
            cols: cols.min(self.cols),
            ..self
        }
    }

    /// Rows of the view.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the view.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Rows `start .. start + len` (an error outside the view).
    pub(crate) fn rows_range(self, start: usize, len: usize) -> candle_core::Result<Self> {
        if start + len > self.rows {
            candle_core::bail!(
                "fused linear: rows {start}..{} outside a {}-row view",
                start + len,
                self.rows
            );
        }
        let data = self.data.get(start * self.rs..).unwrap_or(&[]);
        Self::new(data, len, self.cols, self.rs, self.cs)
    }

    /// Columns `start .. start + len` (an error outside the view, naming them as rows of
    /// the transposed view).
    pub(crate) fn cols_range(self, start: usize, len: usize) -> candle_core::Result<Self> {
        self.t().rows_range(start, len).map(Self::t)
    }
}

/// Whether large `f32` products run on Intel AMX tiles in this process (`amx`).
pub(crate) fn amx_products() -> bool {
    #[cfg(target_arch = "x86_64")]
    return amx::in_use();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Whether large `f32` products run on lorakit's own packing and register block (AVX-512
/// or AVX2, as the vector set) in this process (`packed`).
pub(crate) fn packed_products() -> bool {
    #[cfg(target_arch = "x86_64")]
    return packed::in_use();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// The thread setting candle's own CPU matmul uses (`RAYON_NUM_THREADS` or all cores);
/// gemm itself keeps small products on one thread.
fn parallelism() -> gemm::Parallelism {
    let n = candle_core::utils::get_num_threads();
    if n > 1 {
        gemm::Parallelism::Rayon(n)
    } else {
        gemm::Parallelism::None
    }
}

/// What a product does with its destination's old contents (faer's `Accum`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Accum {
    /// `dst = beta · lhs · rhs`.
    Replace,
    /// `dst += beta · lhs · rhs`.
    Add,
}

impl Accum {
    /// `gemm`'s `read_dst` flag.
    fn reads_dst(self) -> bool {
        self == Accum::Add
    }
}

/// One product `dst = beta · lhs · rhs` ([`Accum::Replace`]) or `dst += beta · lhs · rhs`
/// ([`Accum::Add`]): what [`gemm_into`] hands to each of its routes (BLAS, the decode
/// kernel, the split of thin products, AMX tiles, the column-major reroutes) with the
/// destination.
#[derive(Clone, Copy, Debug)]
struct MatProduct<'a, T> {
    lhs: MatRef<'a, T>,
    rhs: MatRef<'a, T>,
    accum: Accum,
    beta: T,
}

impl<'a, T> MatProduct<'a, T> {
    fn new(lhs: MatRef<'a, T>, rhs: MatRef<'a, T>, accum: Accum, beta: T) -> Self {
        Self {
            lhs,
            rhs,
            accum,
            beta,
        }
    }

    /// `(lhs, rhs, accum, beta)`.
    fn parts(self) -> (MatRef<'a, T>, MatRef<'a, T>, Accum, T) {
        (self.lhs, self.rhs, self.accum, self.beta)
    }
}

/// A second product added into a destination beside its main one: `dst += scale · lhs ·
/// rhs` (a LoRA factor pair's term beside a layer's base product).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AddedTerm<'a, T> {
    pub lhs: MatRef<'a, T>,
    pub rhs: MatRef<'a, T>,
    pub scale: T,
}

impl<T: WithDType> AddedTerm<'_, T> {
    /// `dst += scale · lhs · rhs` as a product of its own, `dst` at row stride `dst_rs`.
    pub(crate) fn add_into(&self, dst: &mut [T], dst_rs: usize) -> candle_core::Result<()> {
        gemm_into(dst, dst_rs, self.lhs, self.rhs, Accum::Add, self.scale)
    }
}

/// `dst = beta · lhs · rhs` ([`Accum::Replace`]) or `dst += beta · lhs · rhs`
/// ([`Accum::Add`]), `dst` a row-major `m × n` matrix with row stride `dst_rs` (at least
/// `n`).
fn gemm_into<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    accum: Accum,
    beta: T,
) -> candle_core::Result<()> {
    gemm_plus_into(dst, dst_rs, MatProduct::new(lhs, rhs, accum, beta), None)
}

/// [`gemm_into`]'s product, then `term` added: in the same passes over `dst` where the
/// packed route takes both (`packed`: a layer's base product at many rows with its
/// low-rank term), else as a second product.
fn gemm_plus_into<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
    term: Option<AddedTerm<T>>,
) -> candle_core::Result<()> {
    let added = route::route_product(dst, dst_rs, product, term)?;
    add_if_left_out(term, added, dst, dst_rs)
}

/// Adds `term` into `dst` (row stride `dst_rs`) as a product of its own unless the route
/// that ran the main product `added` it already.
fn add_if_left_out<T: WithDType>(
    term: Option<AddedTerm<T>>,
    added: bool,
    dst: &mut [T],
    dst_rs: usize,
) -> candle_core::Result<()> {
    match term {
        Some(t) if !added => t.add_into(dst, dst_rs),
        _ => Ok(()),
    }
}

/// `lhs · rhs`, plus `bias` (`n` values) on every row, plus `term`, into a new contiguous
/// `m × n` vector: a layer's output `x Wᵀ + b + s (x Aᵀ) Bᵀ`, or its input gradient.
/// Where the packed route takes the product it writes each element once, with the bias
/// added in its first step, and the result is never filled first (`packed::owned`);
/// elsewhere the bias rows (or zeros) are written in parallel and the product added by its
/// route. The bits are the same either way. On an Intel Xeon (model 207, 2 threads,
/// `benches/RESULTS.md`, "New results"), paired against the fill then the product:
/// 0.95–0.99 of the time for a forward at 512 rows, 0.98–1.00 for `g W` at 512 rows
/// (measured when `g W` at 512 rows was on the `gemm` crate, zeros filled in parallel
/// instead of by `calloc`).
fn product_owned<T: WithDType>(
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    bias: Option<&[T]>,
    term: Option<AddedTerm<T>>,
) -> candle_core::Result<Vec<T>> {
    let (m, n) = (lhs.rows, rhs.cols);
    if let Some(b) = bias.filter(|b| b.len() != n) {
        candle_core::bail!(
            "fused linear: a bias of {} values for {n} output columns",
            b.len()
        )
    }
    let one = T::from_f64(1.0);
    #[cfg(target_arch = "x86_64")]
    if lhs.cols == rhs.rows
        && !route::earlier_than_packed_takes(&MatProduct::new(lhs, rhs, Accum::Replace, one))
    {
        if let Some(done) = packed::owned(lhs, rhs, bias, term) {
            let (mut out, added) = done?;
            add_if_left_out(term, added, &mut out, n)?;
            return Ok(out);
        }
    }
    let (mut out, accum) = filled_output(m, n, bias)?;
    gemm_plus_into(&mut out, n, MatProduct::new(lhs, rhs, accum, one), term)?;
    Ok(out)
}

/// A new `rows × cols` output filled in parallel with `bias` on every row (then a product
/// adds onto it) or with zeros (then a product replaces it), and how the product goes in.
fn filled_output<T: WithDType>(
    rows: usize,
    cols: usize,
    bias: Option<&[T]>,
) -> candle_core::Result<(Vec<T>, Accum)> {
    Ok(match bias {
        Some(b) => (rowwise::bias_rows(rows, b)?, Accum::Add),
        None => (rowwise::zero_rows(rows, cols)?, Accum::Replace),
    })
}

/// `dst = lhs · rhs` ([`Accum::Replace`]) or `dst += lhs · rhs` ([`Accum::Add`]) through
/// the fused op's routes ([`gemm_into`], in the order of `route::ORDER`: the decode kernel
/// for a few rows, a BLAS backend when built with one, the decode kernel on the transpose
/// of a narrow result, the rows of a thin (low-rank) product split over the threads, AMX
/// tiles when asked for, lorakit's own packed products (large `f32` ones, AVX-512 or AVX2), the
/// column-major reroutes, else the `gemm` crate on candle's threads): for ops outside this
/// module that multiply by a frozen weight.
pub(crate) fn product_into<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    accum: Accum,
) -> candle_core::Result<()> {
    gemm_into(dst, dst_rs, lhs, rhs, accum, T::from_f64(1.0))
}

/// Checks that `dst` (row stride `dst_rs`) holds the `lhs · rhs` product and that the
/// inner dimensions agree. Returns `false` when nothing is left to multiply: an empty
/// result, or an empty inner dimension (the result then zeroed for [`Accum::Replace`]).
fn check_product<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    accum: Accum,
) -> candle_core::Result<bool> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k {
        candle_core::bail!("fused linear: inner dimensions {k} and {} differ", rhs.rows);
    }
    if m == 0 || n == 0 {
        return Ok(false);
    }
    if dst_rs < n || (m - 1) * dst_rs + n > dst.len() {
        candle_core::bail!("fused linear: destination too small for {m}x{n}");
    }
    if k == 0 {
        if accum == Accum::Replace {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row.iter_mut().take(n).for_each(|v| *v = T::from_f64(0.0));
            }
        }
        return Ok(false);
    }
    Ok(true)
}

/// `dst = lhs · rhs` ([`Accum::Replace`]) or `dst += lhs · rhs` ([`Accum::Add`]) on the
/// `gemm` crate alone, with the caller's `parallelism`: for ops that split their work over
/// threads themselves (the training attention's blocks), where [`gemm_into`]'s routes and
/// candle's thread count do not apply.
pub(crate) fn gemm_with<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    accum: Accum,
    parallelism: gemm::Parallelism,
) -> candle_core::Result<()> {
    if check_product(dst, dst_rs, lhs, rhs, accum)? {
        let product = MatProduct::new(lhs, rhs, accum, T::from_f64(1.0));
        gemm_checked(dst, dst_rs, product, parallelism);
    }
    Ok(())
}

/// The `gemm` crate's product on a destination [`check_product`] accepted.
fn gemm_checked<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
    parallelism: gemm::Parallelism,
) {
    let (lhs, rhs, accum, beta) = product.parts();
    // SAFETY: the views were bounds-checked (`MatRef::new`, `check_product`) and `dst` is a
    // unique borrow holding the `m × n` result at row stride `dst_rs`.
    unsafe { gemm_raw(dst.as_mut_ptr(), dst_rs, lhs, rhs, accum, beta, parallelism) };
}

/// The `gemm` call behind [`gemm_into`], on a raw destination.
///
/// # Safety
/// `dst` must point to `lhs.rows` rows of stride `dst_rs`, each with `rhs.cols` writable
/// elements that nothing else reads or writes during the call; `lhs.cols == rhs.rows`.
unsafe fn gemm_raw<T: WithDType>(
    dst: *mut T,
    dst_rs: usize,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    accum: Accum,
    beta: T,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract; the views were bounds-checked when built, and gemm
    // reads only the `m × k` and `k × n` elements their strides describe.
    unsafe {
        gemm::gemm(
            lhs.rows,
            rhs.cols,
            lhs.cols,
            dst,
            1,
            dst_rs as isize,
            accum.reads_dst(),
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::from_f64(1.0),
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Checks a product the kernels' unit tests ran: `dst` (row stride `dst_rs`, before the
/// product `start`) holds `start + beta · lhs · rhs` ([`Accum::Add`]) or `beta · lhs · rhs`
/// ([`Accum::Replace`]) to within `tol · k` (relative, at least absolute) of an f64 triple
/// loop, and its padding past the product's columns is untouched. `context` names the case
/// in a failure.
#[cfg(test)]
fn assert_matches_triple_loop<T: WithDType>(
    dst: &[T],
    start: &[T],
    dst_rs: usize,
    product: MatProduct<T>,
    tol: f64,
    context: &str,
) {
    let (lhs, rhs, accum, beta) = product.parts();
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|t| lhs.at(i, t).to_f64() * rhs.at(t, j).to_f64())
                .sum();
            let base = match accum {
                Accum::Replace => 0.0,
                Accum::Add => start[i * dst_rs + j].to_f64(),
            };
            let want = base + beta.to_f64() * dot;
            let got = dst[i * dst_rs + j].to_f64();
            assert!(
                (got - want).abs() <= tol * (1.0 + want.abs()) * k as f64,
                "{m}x{k}x{n} ({context}), ({i}, {j}): {got} vs {want}"
            );
        }
        for j in n..dst_rs {
            assert_eq!(
                dst[i * dst_rs + j].to_f64().to_bits(),
                start[i * dst_rs + j].to_f64().to_bits(),
                "padding ({i}, {j}) ({context})"
            );
        }
    }
}

/// `f` run in a rayon pool of `threads` threads, for the kernels' thread-count tests.
#[cfg(test)]
fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> candle_core::Result<R> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(candle_core::Error::wrap)?;
    Ok(pool.install(f))
}

/// For the kernels' unit tests: a LoRA term `0.5 (x Aᵀ) Bᵀ` over `xa` (`rows × r`) and `b`
/// (`B`, `cols × r`), or none at `r = 0`.
#[cfg(test)]
fn low_rank_test_term<'a>(
    xa: &'a [f32],
    b: &'a [f32],
    (rows, cols, r): (usize, usize, usize),
) -> candle_core::Result<Option<AddedTerm<'a, f32>>> {
    (r > 0)
        .then(|| {
            Ok(AddedTerm {
                lhs: MatRef::contiguous(xa, rows, r)?,
                rhs: MatRef::contiguous(b, cols, r)?.t(),
                scale: 0.5,
            })
        })
        .transpose()
}

/// A deterministic `len`-long buffer for the kernels' unit tests.
#[cfg(test)]
fn test_values(len: usize, seed: f64) -> Vec<f64> {
    (0..len).map(|i| ((i as f64 + 1.0) * seed).sin()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new result ([`product_owned`]) has the bits of the same product added onto bias
    /// rows (or zeros) filled first, on every route: `x Wᵀ` at many rows (the packed route
    /// on AVX-512 or AVX2, with the bias in its first step and the term in its last), a few rows
    /// (the decode kernel), a short side (the thin route or the `gemm` crate), `g W` at 16
    /// rows (the decode kernel with AVX-512, though the packed route would take it too; the
    /// packed route with AVX2, whose decode kernel stops at 8 rows), at 40 and 300
    /// (the packed route where it is in use, else the `gemm` crate), on 1 and 2 threads; a
    /// bias of the wrong length is an error.
    #[test]
    fn new_results_have_the_bits_of_filled_ones() -> candle_core::Result<()> {
        let vals = |len: usize, seed: f64| -> Vec<f32> {
            test_values(len, seed)
                .into_iter()
                .map(|v| v as f32)
                .collect()
        };
        // (rows, d_in, d_out, W transposed (x Wᵀ) or not (g W), rank of the term)
        let cases = [
            (300, 700, 520, true, 16),
            (300, 700, 520, true, 0),
            (3, 700, 520, true, 16),
            (300, 700, 100, true, 8),
            (16, 520, 700, false, 16),
            (40, 520, 700, false, 16),
            (300, 520, 700, false, 0),
        ];
        for (n, d_in, d_out, transposed, r) in cases {
            let x = vals(n * d_in, 0.37);
            let w = vals(d_in * d_out, 0.71);
            let bias = vals(d_out, 1.7);
            let (xa, b) = (vals(n * r, 0.9), vals(d_out * r, 0.4));
            let lhs = MatRef::contiguous(&x, n, d_in)?;
            let rhs = match transposed {
                true => MatRef::contiguous(&w, d_out, d_in)?.t(),
                false => MatRef::contiguous(&w, d_in, d_out)?,
            };
            let term = low_rank_test_term(&xa, &b, (n, d_out, r))?;
            for with_bias in [true, false] {
                let bias = with_bias.then_some(&bias[..]);
                let filled = || -> candle_core::Result<Vec<u32>> {
                    let (mut out, accum) = match bias {
                        Some(b) => (rowwise::bias_rows(n, b)?, Accum::Add),
                        None => (vec![0.0; n * d_out], Accum::Replace),
                    };
                    gemm_plus_into(&mut out, d_out, MatProduct::new(lhs, rhs, accum, 1.0), term)?;
                    Ok(out.iter().map(|v| v.to_bits()).collect())
                };
                let new = || -> candle_core::Result<Vec<u32>> {
                    let out = product_owned(lhs, rhs, bias, term)?;
                    Ok(out.iter().map(|v| v.to_bits()).collect())
                };
                for threads in [1, 2] {
                    let (want, got) =
                        on_threads(threads, || Ok::<_, candle_core::Error>((filled()?, new()?)))??;
                    assert!(
                        want == got,
                        "{n}x{d_in}x{d_out} (Wᵀ: {transposed}, r {r}, bias: {with_bias}, {threads} threads)"
                    );
                }
            }
            let short = vec![0.0; d_out - 1];
            let err = product_owned(lhs, rhs, Some(&short), term).expect_err("short bias");
            assert!(err.to_string().contains("bias"), "{err}");
        }
        Ok(())
    }
}
