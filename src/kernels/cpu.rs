//! CPU kernels of the fused low-rank linear: strided matrix views over candle's CPU
//! buffers and the forward/backward built from `gemm` calls that accumulate into one
//! output buffer (`read_dst`), so no output-sized temporary is made in the forward.

use crate::kernels::dropout::Dropout;
use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor, WithDType};

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(any(feature = "openblas", feature = "mkl"))]
mod blas;
mod col_major;
mod gemv;
mod in_place;
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

pub(crate) use in_place::AddProduct;
pub(crate) use machine::{machine, Isa};
pub(crate) use pool::{Pooled, Scratch};
pub(crate) use quant::WeightMat;
pub(crate) use scaled::{scaled_backward, scaled_forward, ScaledForward, ScaledNeed, ScaledSaved};

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

/// The 2-D view a candle layout describes over `data` (its start offset and strides).
pub(crate) fn mat_of_layout<'a, T: Copy>(
    data: &'a [T],
    l: &Layout,
) -> candle_core::Result<MatRef<'a, T>> {
    let (r, c) = l.shape().dims2()?;
    let &[rs, cs] = l.stride() else {
        candle_core::bail!("fused linear: a 2-D layout without two strides");
    };
    let data = data.get(l.start_offset()..).unwrap_or(&[]);
    MatRef::new(data, r, c, rs, cs)
}

/// An owned or borrowed row-major-ish matrix of a CPU buffer.
pub(crate) enum Rows<'a, T> {
    /// A view into the original buffer.
    View(MatRef<'a, T>),
    /// A contiguous copy (inputs whose leading dimensions do not merge into one stride).
    Owned(Vec<T>, usize, usize),
}

impl<T: Copy> Rows<'_, T> {
    /// The matrix as a view.
    pub(crate) fn view(&self) -> candle_core::Result<MatRef<'_, T>> {
        match self {
            Rows::View(v) => Ok(*v),
            Rows::Owned(data, r, c) => MatRef::contiguous(data, *r, *c),
        }
    }
}

/// Views a buffer of layout `layout` (`[.., d]`, rank ≥ 1) as an `(n, d)` matrix: without
/// a copy when the leading dimensions collapse into one row stride (contiguous, transposed
/// 2-D, sliced...), through a contiguous copy otherwise.
pub(crate) fn as_rows<'a, T: Copy>(
    data: &'a [T],
    layout: &Layout,
) -> candle_core::Result<Rows<'a, T>> {
    let dims = layout.dims();
    let strides = layout.stride();
    let Some((&d, lead)) = dims.split_last() else {
        candle_core::bail!("fused linear: input must have rank >= 1");
    };
    let cs = strides.last().copied().unwrap_or(1);
    let n: usize = lead.iter().product();
    let data_off = data.get(layout.start_offset()..).unwrap_or(&[]);
    // Leading dims of size > 1, outermost first, with their strides.
    let big: Vec<(usize, usize)> = lead
        .iter()
        .zip(strides.iter())
        .filter(|(&s, _)| s > 1)
        .map(|(&s, &st)| (s, st))
        .collect();
    let mergeable = big
        .iter()
        .zip(big.iter().skip(1))
        .all(|(outer, inner)| outer.1 == inner.1 * inner.0);
    if mergeable {
        let rs = big.last().map_or(d.max(1), |&(_, st)| st);
        return Ok(Rows::View(MatRef::new(data_off, n, d, rs, cs)?));
    }
    Ok(Rows::Owned(gather_strided(data, layout)?, n, d))
}

/// The elements of a strided layout in row-major order (one copy of the run for a
/// contiguous layout: a layer's bias on every call).
pub(crate) fn gather_strided<T: Copy>(data: &[T], layout: &Layout) -> candle_core::Result<Vec<T>> {
    if let Some((start, end)) = layout.contiguous_offsets() {
        return match data.get(start..end) {
            Some(run) => Ok(run.to_vec()),
            None => candle_core::bail!("fused linear: layout {layout:?} overruns its buffer"),
        };
    }
    let (dims, strides) = (layout.dims(), layout.stride());
    let count: usize = dims.iter().product();
    let mut out = Vec::with_capacity(count);
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..count {
        let off =
            layout.start_offset() + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        match data.get(off) {
            Some(&v) => out.push(v),
            None => candle_core::bail!("fused linear: layout {layout:?} overruns its buffer"),
        }
        for (i, &d) in idx.iter_mut().zip(dims).rev() {
            *i += 1;
            if *i < d {
                break;
            }
            *i = 0;
        }
    }
    Ok(out)
}

/// The CPU slice of a tensor's storage, with its layout, for a closure.
pub(crate) fn with_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T], &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(T::cpu_storage_as_slice(cpu)?, layout),
        _ => candle_core::bail!("fused linear: expected a CPU tensor"),
    }
}

/// A CPU storage slice of dtype `T`.
pub(crate) fn slice_of<T: WithDType>(s: &CpuStorage) -> candle_core::Result<&[T]> {
    T::cpu_storage_as_slice(s)
}

/// `x`'s shape with its last dimension replaced by `d_out` (a linear layer's output).
pub(crate) fn output_shape(x: &Layout, d_out: usize) -> Shape {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = d_out;
    }
    Shape::from(dims)
}

/// A 1-D tensor gathered into a vector.
pub(crate) fn gather_vec<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    with_slice(t, gather_strided)
}

/// Everything the forward needs, as CPU views.
pub(crate) struct Forward<'a, T> {
    /// `x`, `(n, d_in)`.
    pub x: MatRef<'a, T>,
    /// `W`, `(d_out, d_in)`.
    pub w: WeightMat<'a, T>,
    /// `A_eff` `(r, d_in)` and `B_eff` `(d_out, r)`, `r ≥ 1`, with the scale.
    pub low_rank: Option<(MatRef<'a, T>, MatRef<'a, T>, T)>,
    /// With dropout on the low-rank term's input: that input, `drop(x)` `(n, d_in)`, and
    /// the dropout that made it from `x` (entry `(i, j)` is its entry `i · d_in + j`).
    /// `None`: the low-rank term reads `x`.
    pub dropped: Option<(MatRef<'a, T>, Dropout)>,
    /// Row scale, `d_out` values.
    pub row_scale: Option<Vec<T>>,
    /// Bias, `d_out` values.
    pub bias: Option<Vec<T>>,
}

/// `y = c ⊙ (x Wᵀ + s (x̃ Aᵀ) Bᵀ) + b`, contiguous `(n, d_out)`, and the intermediate
/// `x̃ Aᵀ` `(n, r)` (empty without a low-rank term), which the backward reuses; `x̃` is
/// `x`, or its dropped copy ([`Forward::dropped`]).
///
/// Without a row scale the output is a new vector ([`product_owned`]: the bias in the
/// base product's first step where the packed route takes it, else pre-filled and the
/// product added onto it); the low-rank term joins the base product's passes where the
/// route allows; a row scale is one epilogue pass.
pub(crate) fn forward<T: WithDType>(p: &Forward<T>) -> candle_core::Result<Forwarded<T>> {
    let (n, d_out) = (p.x.rows, p.w.rows());
    let one = T::from_f64(1.0);
    let mut xa = Scratch::overwritten(0);
    if let Some((a, _, _)) = p.low_rank {
        let r = a.rows;
        xa = Scratch::overwritten(n * r);
        gemm_into(&mut xa, r, p.low_rank_input(), a.t(), Accum::Replace, one)?;
    }
    // The low-rank term `s (x̃ Aᵀ) Bᵀ` goes in with the base product, in the same passes
    // over `y` where the route allows (`packed`).
    let term = low_rank_term(p, &xa)?;
    let Some(c) = &p.row_scale else {
        // The output (candle's once returned), the bias in it.
        let y = p.w.times_t_new(p.x, p.bias.as_deref(), term)?;
        return Ok((y, xa, None));
    };
    // With a row scale, the pooled pre-scale `u` (no bias yet): kept for the backward.
    let mut u = Scratch::overwritten(n * d_out);
    p.w.times_t(&mut u, p.x, Accum::Replace, term)?;
    let y_scaled = rowwise::scale_columns_add(&u, c, p.bias.as_deref())?;
    Ok((y_scaled, xa, Some(u)))
}

/// The forward's low-rank term `s (x̃ Aᵀ) Bᵀ` over the saved `x̃ Aᵀ` (`n × r`), if any.
fn low_rank_term<'a, T: WithDType>(
    p: &Forward<'a, T>,
    xa: &'a [T],
) -> candle_core::Result<Option<AddedTerm<'a, T>>> {
    let Some((a, b, s)) = p.low_rank else {
        return Ok(None);
    };
    let lhs = MatRef::contiguous(xa, p.x.rows, a.rows)?;
    Ok(Some(AddedTerm {
        lhs,
        rhs: b.t(),
        scale: s,
    }))
}

/// `drop(x)`: a contiguous copy of `x` `(rows, cols)` with `dropout`'s dropped entries
/// zero and the rest scaled by `1 / (1 − p)` (entry `(i, j)` is the dropout's entry
/// `i · cols + j`); rows in parallel.
pub(crate) fn dropped_copy<T: WithDType>(x: MatRef<T>, dropout: &Dropout) -> Vec<T> {
    use rayon::prelude::*;
    let cols = x.cols;
    let mut out = vec![T::zero(); x.rows * cols];
    out.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each_init(Vec::new, |buf, (i, row)| {
            dropout.add_kept_run(row, x.row_or_copy(i, buf), i * cols);
        });
    out
}

impl<'a, T: Copy> Forward<'a, T> {
    /// What the low-rank term reads: the dropped copy of `x`, or `x`.
    fn low_rank_input(&self) -> MatRef<'a, T> {
        self.dropped.as_ref().map_or(self.x, |(x, _)| *x)
    }
}

/// The forward's output `y` `(n, d_out)`, `x Aᵀ` `(n, r)` (empty without a low-rank term)
/// and, with a row scale, the pre-scale output `u` `(n, d_out)`; the intermediates are
/// pooled buffers.
pub(crate) type Forwarded<T> = (Vec<T>, Scratch<T>, Option<Scratch<T>>);

/// Everything the backward needs, as CPU views.
pub(crate) struct Backward<'a, T> {
    /// The forward's inputs.
    pub fwd: &'a Forward<'a, T>,
    /// The incoming gradient, `(n, d_out)`.
    pub g: MatRef<'a, T>,
    /// Which gradients to compute.
    pub need: Need,
    /// `x Aᵀ` `(n, r)` saved by the forward, if it was; recomputed otherwise.
    pub xa: Option<&'a [T]>,
    /// The pre-scale output `u` `(n, d_out)` saved by the forward (with a row scale), if it
    /// was; recomputed otherwise.
    pub u: Option<&'a [T]>,
}

/// Which gradients [`backward`] computes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Need {
    /// `dx`.
    pub x: bool,
    /// `dA`.
    pub a: bool,
    /// The packed `[dB | dc]`.
    pub bc: bool,
}

/// The gradients of [`Backward`]: `dx (n, d_in)`, `dA (r, d_in)`, and the gradient of the
/// packed third input `[B | c]`, `(d_out, r + 1)` (or `(d_out, r)` without a row scale).
pub(crate) struct Grads<T> {
    pub dx: Option<Vec<T>>,
    pub da: Option<Vec<T>>,
    pub dbc: Option<Vec<T>>,
}

/// unsloth's algebra with `g' = c ⊙ g`:
/// `dx = g' W + s (g' B) A`, `dA = s (g' B)ᵀ x`, `dB = s g'ᵀ (x Aᵀ)`,
/// `dc_j = Σ_i g_ij u_ij` with `u` the pre-scale output the forward saved.
/// With dropout on the low-rank input `x̃ = keep ⊙ x / (1 − p)`: `x̃` in place of `x` in
/// `dA` and `dB`, and `dx = g' W + keep ⊙ (s (g' B) A) / (1 − p)`.
/// Never a gradient for `W`.
pub(crate) fn backward<T: WithDType>(p: &Backward<T>) -> candle_core::Result<Grads<T>> {
    let f = p.fwd;
    let (n, d_in, d_out) = (f.x.rows, f.x.cols, f.w.rows());
    let zero = T::from_f64(0.0);
    let one = T::from_f64(1.0);
    // g' = c ⊙ g (contiguous), or g itself.
    let scaled: Option<Scratch<T>> = f
        .row_scale
        .as_ref()
        .map(|c| rowwise::scale_columns_and_dot(p.g, c, None).map(|(scaled, _)| scaled))
        .transpose()?;
    let gs = match &scaled {
        Some(v) => MatRef::contiguous(v, n, d_out)?,
        None => p.g,
    };
    let r = f.low_rank.map_or(0, |(a, _, _)| a.rows);
    let mut out = Grads {
        dx: None,
        da: None,
        dbc: None,
    };
    // g' B, (n, r): shared by dx and dA.
    let gb = match f.low_rank {
        Some((_, b, _)) if p.need.x || p.need.a => {
            let mut gb = Scratch::overwritten(n * r);
            gemm_into(&mut gb, r, gs, b, Accum::Replace, one)?;
            Some(gb)
        }
        _ => None,
    };
    if p.need.x {
        // Without dropout the low-rank term `s (g' B) A` goes in with `g' W`, in the same
        // passes over `dx` where the route allows (`packed`).
        let term = match (f.low_rank, &gb, &f.dropped) {
            (Some((a, _, s)), Some(gb), None) => Some(AddedTerm {
                lhs: MatRef::contiguous(gb, n, r)?,
                rhs: a,
                scale: s,
            }),
            _ => None,
        };
        let mut dx = f.w.grad_times_new(gs, term)?;
        if let (Some((a, _, s)), Some(gb), Some((_, dropout))) = (f.low_rank, &gb, &f.dropped) {
            // Through the dropout: its kept entries, scaled.
            let mut low = Scratch::overwritten(n * d_in);
            gemm_into(
                &mut low,
                d_in,
                MatRef::contiguous(gb, n, r)?,
                a,
                Accum::Replace,
                s,
            )?;
            dropout.add_kept(&mut dx, &low, 0);
        }
        out.dx = Some(dx);
    }
    if let (true, Some((_, _, s)), Some(gb)) = (p.need.a, f.low_rank, &gb) {
        let mut da = vec![zero; r * d_in];
        gemm_into(
            &mut da,
            d_in,
            MatRef::contiguous(gb, n, r)?.t(),
            f.low_rank_input(),
            Accum::Replace,
            s,
        )?;
        out.da = Some(da);
    }
    if p.need.bc {
        let width = r + usize::from(f.row_scale.is_some());
        let mut dbc = vec![zero; d_out * width];
        let recomputed;
        let xa: &[T] = match (f.low_rank, p.xa) {
            (Some(_), Some(saved)) if saved.len() == n * r => saved,
            (Some((a, _, _)), _) => {
                let mut xa = Scratch::overwritten(n * r);
                gemm_into(&mut xa, r, f.low_rank_input(), a.t(), Accum::Replace, one)?;
                recomputed = xa;
                &recomputed
            }
            (None, _) => &[],
        };
        if let Some((_, _, s)) = f.low_rank {
            gemm_into(
                &mut dbc,
                width,
                gs.t(),
                MatRef::contiguous(xa, n, r)?,
                Accum::Replace,
                s,
            )?;
        }
        if f.row_scale.is_some() {
            let xa = MatRef::contiguous(xa, n, r)?;
            let dc = row_scale_grad(p, xa)?;
            for (row, v) in dbc.chunks_mut(width).zip(dc) {
                if let Some(slot) = row.get_mut(r) {
                    *slot = v;
                }
            }
        }
        out.dbc = Some(dbc);
    }
    Ok(out)
}

/// `dc_j = Σ_i g_ij u_ij`, `u = x Wᵀ + s (x Aᵀ) Bᵀ` the pre-scale output without bias:
/// the forward's saved copy, or recomputed as the forward computed it when there is none.
fn row_scale_grad<T: WithDType>(p: &Backward<T>, xa: MatRef<T>) -> candle_core::Result<Vec<T>> {
    let f = p.fwd;
    let (n, d_out) = (p.g.rows, p.g.cols);
    let recomputed;
    let u: &[T] = match p.u {
        Some(u) if u.len() == n * d_out => u,
        _ => {
            // As the forward computed it (the term in the same route), so the bits agree.
            let mut u = Scratch::overwritten(n * d_out);
            f.w.times_t(&mut u, f.x, Accum::Replace, low_rank_term(f, xa.data)?)?;
            recomputed = u;
            &recomputed
        }
    };
    rowwise::column_dot(p.g, u)
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

    /// A tensor's elements in row-major order, whatever its layout: contiguous (from the
    /// buffer's start or an offset into it) and strided, against candle's own copy.
    #[test]
    fn gathered_elements_follow_the_layout() -> candle_core::Result<()> {
        let t = Tensor::arange(0f32, 24., &candle_core::Device::Cpu)?.reshape((4, 6))?;
        let views = [
            t.clone(),
            t.narrow(0, 1, 2)?,
            t.narrow(1, 2, 3)?,
            t.t()?,
            t.flatten_all()?.narrow(0, 5, 9)?,
        ];
        for view in &views {
            let gathered = with_slice(view, gather_strided::<f32>)?;
            assert_eq!(
                gathered,
                view.flatten_all()?.to_vec1::<f32>()?,
                "{:?}",
                view.layout()
            );
        }
        let outside = Layout::contiguous_with_offset((3, 4), 20);
        let data = [0f32; 24];
        assert!(gather_strided(&data, &outside).is_err());
        Ok(())
    }

    /// The backward's recompute fallbacks (no saved `x Aᵀ`, no saved `u`) give the same
    /// gradients as the saved intermediates the forward normally hands over.
    #[test]
    fn recomputed_intermediates_match_saved_ones() -> candle_core::Result<()> {
        let (n, d_in, d_out, r) = (5, 7, 6, 3);
        let vals = test_values;
        let (x, w, a, b) = (
            vals(n * d_in, 0.7),
            vals(d_out * d_in, 1.3),
            vals(r * d_in, 2.1),
            vals(d_out * r, 0.4),
        );
        let g = vals(n * d_out, 1.9);
        let mut c = vals(d_out, 3.3);
        c[2] = 0.0; // a zero row scale: the gradient must not need y / c
        let fwd = Forward {
            x: MatRef::contiguous(&x, n, d_in)?,
            w: WeightMat::Dense(MatRef::contiguous(&w, d_out, d_in)?),
            low_rank: Some((
                MatRef::contiguous(&a, r, d_in)?,
                MatRef::contiguous(&b, d_out, r)?,
                0.5,
            )),
            dropped: None,
            row_scale: Some(c),
            bias: Some(vals(d_out, 5.0)),
        };
        let (_, xa, u) = forward(&fwd)?;
        let run = |xa: Option<&[f64]>, u: Option<&[f64]>| {
            backward(&Backward {
                fwd: &fwd,
                g: MatRef::contiguous(&g, n, d_out)?,
                need: Need {
                    x: true,
                    a: true,
                    bc: true,
                },
                xa,
                u,
            })
        };
        let saved = run(Some(&xa[..]), u.as_deref().map(Vec::as_slice))?;
        let recomputed = run(None, None)?;
        for (s, r) in [
            (saved.dx, recomputed.dx),
            (saved.da, recomputed.da),
            (saved.dbc, recomputed.dbc),
        ] {
            let (s, r) = (s.unwrap_or_default(), r.unwrap_or_default());
            assert!(!s.is_empty() && s.len() == r.len());
            for (p, q) in s.iter().zip(&r) {
                assert!((p - q).abs() <= 1e-12 * (1.0 + q.abs()), "{p} vs {q}");
            }
        }
        Ok(())
    }

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
