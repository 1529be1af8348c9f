//! The fused kernel's frozen operand: a dense view of `W`, or quantized blocks whose
//! products run over row tiles dequantized into one reused buffer (never a float copy of
//! the whole `W`).

use candle_core::{CpuStorage, DType, WithDType};
use rayon::prelude::*;

use super::col_major::chunked_route_min_cols;
use super::{
    filled_output, gemm_into, gemm_plus_into, product_owned, rowwise, Accum, AddedTerm, MatProduct,
    MatRef,
};
use crate::quant::bnb::Lanes;
use crate::quant::{tile_rows, QuantizedWeight};
use dot::{Isa, RowDots};

mod dot;

/// The frozen `W`, `(d_out, d_in)`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WeightMat<'a, T> {
    /// A strided view of a float weight.
    Dense(MatRef<'a, T>),
    /// Quantized blocks.
    Quantized(&'a QuantizedWeight),
}

impl<T: WithDType> WeightMat<'_, T> {
    /// `d_out`.
    pub(crate) fn rows(&self) -> usize {
        match self {
            WeightMat::Dense(w) => w.rows,
            WeightMat::Quantized(q) => q.d_out(),
        }
    }

    /// `dst = x Wᵀ` or `dst += x Wᵀ` (`accum`), `dst` contiguous `(n, d_out)`, then
    /// `term` added (a low-rank term: with a dense `W` in the same passes where the route
    /// allows, [`super::gemm_plus_into`]).
    pub(crate) fn times_t(
        &self,
        dst: &mut [T],
        x: MatRef<T>,
        accum: Accum,
        term: Option<AddedTerm<T>>,
    ) -> candle_core::Result<()> {
        let one = T::from_f64(1.0);
        let q = match self {
            WeightMat::Dense(w) => {
                let product = MatProduct::new(x, w.t(), accum, one);
                return gemm_plus_into(dst, w.rows, product, term);
            }
            WeightMat::Quantized(q) => q,
        };
        quantized_times_t(q, dst, x, accum)?;
        term.map_or(Ok(()), |t| t.add_into(dst, q.d_out()))
    }

    /// `x Wᵀ`, plus `bias` (`d_out` values) on every row, plus `term`, as a new contiguous
    /// `(n, d_out)` vector: with a dense `W` through [`super::product_owned`] (never filled
    /// first where the packed route takes it), with a quantized one into the bias rows (or
    /// zeros) by [`WeightMat::times_t`].
    pub(crate) fn times_t_new(
        &self,
        x: MatRef<T>,
        bias: Option<&[T]>,
        term: Option<AddedTerm<T>>,
    ) -> candle_core::Result<Vec<T>> {
        if let WeightMat::Dense(w) = self {
            return product_owned(x, w.t(), bias, term);
        }
        let (mut y, accum) = filled_output(x.rows, self.rows(), bias)?;
        self.times_t(&mut y, x, accum, term)?;
        Ok(y)
    }

    /// `g W` plus `term` as a new contiguous `(n, d_in)` vector (as in
    /// [`WeightMat::times_t_new`]).
    pub(crate) fn grad_times_new(
        &self,
        g: MatRef<T>,
        term: Option<AddedTerm<T>>,
    ) -> candle_core::Result<Vec<T>> {
        let q = match self {
            WeightMat::Dense(w) => return product_owned(g, *w, None, term),
            WeightMat::Quantized(q) => q,
        };
        let mut dx = rowwise::zero_rows(g.rows, q.d_in())?;
        self.grad_times(&mut dx, g, term)?;
        Ok(dx)
    }

    /// `dst = g W`, `dst` contiguous `(n, d_in)`, `g` `(n, d_out)`, then `term` added (as in
    /// [`WeightMat::times_t`]).
    pub(crate) fn grad_times(
        &self,
        dst: &mut [T],
        g: MatRef<T>,
        term: Option<AddedTerm<T>>,
    ) -> candle_core::Result<()> {
        let one = T::from_f64(1.0);
        let q = match self {
            WeightMat::Dense(w) => {
                let product = MatProduct::new(g, *w, Accum::Replace, one);
                return gemm_plus_into(dst, w.cols, product, term);
            }
            WeightMat::Quantized(q) => q,
        };
        quantized_grad_times(q, dst, g)?;
        term.map_or(Ok(()), |t| t.add_into(dst, q.d_in()))
    }
}

/// [`WeightMat::times_t`] for a quantized `W`, without a term.
fn quantized_times_t<T: WithDType>(
    q: &QuantizedWeight,
    dst: &mut [T],
    x: MatRef<T>,
    accum: Accum,
) -> candle_core::Result<()> {
    if x.rows <= STREAM_ROWS {
        if T::DTYPE == DType::F32 {
            let Some(ggml) = q.ggml_dtype() else {
                // bitsandbytes blocks: f32 products, as the GGML kernels' (AVX2 straight
                // from the codes where it applies, else row by row).
                return times_t_streamed::<f32, T>(q, dst, x, accum);
            };
            if let Some(k) = RowDots::new(ggml, q.d_in(), x.rows, Isa::best()) {
                return times_t_fused(q, &k, dst, x, accum);
            }
        }
        return times_t_streamed::<f64, T>(q, dst, x, accum);
    }
    let (d_out, one) = (q.d_out(), T::from_f64(1.0));
    let mut tile = Tile::new(q);
    for j0 in tile.starts() {
        let w = tile.load(j0)?;
        let Some(dst) = dst.get_mut(j0..) else {
            candle_core::bail!("fused linear: output too small for row {j0} of W");
        };
        gemm_into(dst, d_out, x, w.t(), accum, one)?;
    }
    Ok(())
}

/// [`WeightMat::grad_times`] for a quantized `W`, without a term.
fn quantized_grad_times<T: WithDType>(
    q: &QuantizedWeight,
    dst: &mut [T],
    g: MatRef<T>,
) -> candle_core::Result<()> {
    let (d_in, one) = (q.d_in(), T::from_f64(1.0));
    let mut tile = Tile::new(q);
    let mut accum = Accum::Replace;
    for j0 in tile.starts() {
        let w = tile.load(j0)?;
        gemm_into(dst, d_in, g.cols_range(j0, w.rows)?, w, accum, one)?;
        accum = Accum::Add;
    }
    Ok(())
}

/// At most this many input rows take the row-streaming product (decode): in f32 over Q8_0,
/// Q4_K, Q5_K and Q6_K the fused dequantize-and-dot kernels ([`mod@dot`]); otherwise each row of
/// `W` is dequantized into a small per-task buffer and dotted with every input row at once
/// (in f64), with no tile written out and read back.
const STREAM_ROWS: usize = dot::MAX_X_ROWS;

/// `dst (+)= x Wᵀ` for a few f32 input rows (`T` is f32) by the fused kernel `k`, `W`'s
/// rows split over the thread pool in contiguous ranges (each row summed by one task, in
/// an order that does not depend on the thread count).
fn times_t_fused<T: WithDType>(
    q: &QuantizedWeight,
    k: &RowDots,
    dst: &mut [T],
    x: MatRef<T>,
    accum: Accum,
) -> candle_core::Result<()> {
    let (d_out, d_in, n) = (q.d_out(), q.d_in(), x.rows);
    let xs: Vec<Vec<f32>> = (0..n)
        .map(|i| (0..d_in).map(|c| x.at(i, c).to_f64() as f32).collect())
        .collect();
    let xs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
    let sums = k.input_sums(&xs);
    let sums: Vec<&[f32]> = sums.iter().map(Vec::as_slice).collect();
    let per_task = d_out
        .div_ceil(8 * rayon::current_num_threads().max(1))
        .max(1);
    let mut yt = vec![0f32; d_out * n]; // (d_out, n)
    q.with_row_bytes(0, d_out * d_in, |bytes| {
        bytes
            .par_chunks(per_task * k.row_bytes())
            .zip(yt.par_chunks_mut(per_task * n))
            .try_for_each(|(rows, out)| k.run(rows, &xs, &sums, out))
    })?;
    scatter(dst, d_out, n, accum, |j, i| {
        f64::from(yt.get(j * n + i).copied().unwrap_or(0.0))
    });
    Ok(())
}

/// `dst[i, j] (+)= y(j, i)` over the `n` rows of `dst` `(n, d_out)`.
fn scatter<T: WithDType>(
    dst: &mut [T],
    d_out: usize,
    n: usize,
    accum: Accum,
    y: impl Fn(usize, usize) -> f64,
) {
    for (i, dst_row) in dst.chunks_mut(d_out).take(n).enumerate() {
        for (j, v) in dst_row.iter_mut().enumerate() {
            let y = y(j, i);
            *v = match accum {
                Accum::Add => T::from_f64(v.to_f64() + y),
                Accum::Replace => T::from_f64(y),
            };
        }
    }
}

/// `dst (+)= x Wᵀ` for a few input rows, streaming `W` row by row over the thread pool:
/// each row dotted with the inputs in `A` (f64; f32 for f32 inputs over bitsandbytes
/// blocks) straight from the blocks where `A::fused_dots` can, else dequantized into a
/// buffer first; each row summed by one task, in an order that does not depend on the
/// thread count.
fn times_t_streamed<A: RowSum, T: WithDType>(
    q: &QuantizedWeight,
    dst: &mut [T],
    x: MatRef<T>,
    accum: Accum,
) -> candle_core::Result<()> {
    let (d_out, d_in, n) = (q.d_out(), q.d_in(), x.rows);
    let xs: Vec<Vec<A>> = (0..n)
        .map(|i| {
            (0..d_in)
                .map(|k| A::from_f64(x.at(i, k).to_f64()))
                .collect()
        })
        .collect();
    let x_rows: Vec<&[A]> = xs.iter().map(Vec::as_slice).collect();
    let lanes = lanes();
    let per_task = d_out
        .div_ceil(8 * rayon::current_num_threads().max(1))
        .max(1);
    let mut yt = vec![A::default(); d_out * n]; // (d_out, n)
    yt.par_chunks_mut(per_task * n)
        .enumerate()
        .try_for_each(|(c, out)| {
            let mut row = vec![0f32; d_in];
            for (r, y) in out.chunks_mut(n).enumerate() {
                if A::fused_dots(q, c * per_task + r, &x_rows, y, lanes) {
                    continue;
                }
                q.dequantize_rows_here(c * per_task + r, &mut row, lanes)?;
                for (y, x) in y.iter_mut().zip(&xs) {
                    *y = A::dot(x, &row);
                }
            }
            Ok::<(), candle_core::Error>(())
        })?;
    scatter(dst, d_out, n, accum, |j, i| {
        yt.get(j * n + i).copied().unwrap_or_default().to_f64()
    });
    Ok(())
}

/// How wide bitsandbytes blocks are expanded: AVX2 where the machine's instruction set
/// (which `LORAKIT_CPU_ISA` lowers) allows it and the CPU has it.
fn lanes() -> Lanes {
    match Isa::best() {
        Isa::Portable => Lanes::Portable,
        Isa::Avx2 | Isa::Avx512 => Lanes::Avx2,
    }
}

/// The accumulator of [`times_t_streamed`]'s dot products.
trait RowSum: Copy + Default + Send + Sync {
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    /// `Σ x_k w_k`.
    fn dot(x: &[Self], w: &[f32]) -> Self;
    /// `y[r] = Σ_k xs[r][k] W[row, k]` straight from the blocks where a vector kernel
    /// applies (returns whether it did).
    fn fused_dots(
        q: &QuantizedWeight,
        row: usize,
        xs: &[&[Self]],
        y: &mut [Self],
        lanes: Lanes,
    ) -> bool {
        let _ = (q, row, xs, y, lanes);
        false
    }
}

impl RowSum for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn dot(x: &[f64], w: &[f32]) -> f64 {
        dot_lanes::<f64, 8>(x, w, f64::from)
    }
}

impl RowSum for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn dot(x: &[f32], w: &[f32]) -> f32 {
        dot_lanes::<f32, 16>(x, w, |w| w)
    }
    fn fused_dots(
        q: &QuantizedWeight,
        row: usize,
        xs: &[&[f32]],
        y: &mut [f32],
        lanes: Lanes,
    ) -> bool {
        q.bnb4_row_dots(row, xs, y, lanes)
    }
}

/// `Σ x_k w_k` with `L` accumulators (so that the loop vectorizes), `w` widened by `wide`.
fn dot_lanes<A, const L: usize>(x: &[A], w: &[f32], wide: impl Fn(f32) -> A) -> A
where
    A: Copy + Default + std::ops::Add<Output = A> + std::ops::Mul<Output = A> + std::iter::Sum,
{
    let mut acc = [A::default(); L];
    let whole = x.len().min(w.len()) / L * L;
    let (xc, xr) = x.split_at(whole);
    let (wc, wr) = w.split_at(whole);
    for (xs, ws) in xc.chunks_exact(L).zip(wc.chunks_exact(L)) {
        for ((a, &x), &w) in acc.iter_mut().zip(xs).zip(ws) {
            *a = *a + x * wide(w);
        }
    }
    let tail: A = xr.iter().zip(wr).map(|(&x, &w)| x * wide(w)).sum();
    acc.into_iter().sum::<A>() + tail
}

/// One reused buffer of dequantized rows, in f32 (and converted to `T` when `T` is not f32).
///
/// A tile holds [`tile_rows`] rows (about 1 MiB of floats), and at least as many as the
/// chunked route of a column-major product needs ([`chunked_route_min_cols`]: 256 rows with
/// AVX-512, 128 with AVX2), so that the forward's `x · tileᵀ` takes that route on every
/// thread and the backward's `g · tile` sums over that many rows per pass over its output.
/// With 64-row tiles (1 MiB at `d_in = 4096`), a LoRA step over a Q4_K `4096 × 4096` base
/// took 1.3–1.5× the f32 step on an AMD EPYC Zen 5; with 256 rows it is at the f32 step's
/// time (`benches/QLORA.md`). The tile is transient: at `d_in = 14336`, 14 MiB.
struct Tile<'q, T> {
    q: &'q QuantizedWeight,
    rows: usize,
    f32s: CpuStorage,
    converted: Vec<T>,
}

impl<'q, T: WithDType> Tile<'q, T> {
    fn new(q: &'q QuantizedWeight) -> Self {
        let rows = tile_rows(q.d_out(), q.d_in())
            .max(chunked_route_min_cols::<T>())
            .min(q.d_out().max(1));
        Self {
            q,
            rows,
            f32s: CpuStorage::F32(vec![0f32; rows * q.d_in()]),
            converted: Vec::new(),
        }
    }

    /// Rows `j0 .. j0 + k` of `W` as a `k × d_in` view of the buffer.
    fn load(&mut self, j0: usize) -> candle_core::Result<MatRef<'_, T>> {
        let d_in = self.q.d_in();
        let k = self.rows.min(self.q.d_out().saturating_sub(j0));
        let len = k * d_in;
        let CpuStorage::F32(buf) = &mut self.f32s else {
            candle_core::bail!("fused linear: the tile buffer is not f32");
        };
        let Some(floats) = buf.get_mut(..len) else {
            candle_core::bail!("fused linear: a tile of {k} rows overruns its buffer");
        };
        self.q.dequantize_rows(j0, floats, lanes())?;
        if T::DTYPE == DType::F32 {
            let all = T::cpu_storage_as_slice(&self.f32s)?;
            return MatRef::contiguous(all.get(..len).unwrap_or_default(), k, d_in);
        }
        self.converted.clear();
        self.converted
            .extend(floats.iter().map(|&v| T::from_f64(f64::from(v))));
        MatRef::contiguous(&self.converted, k, d_in)
    }

    /// The first row of every tile.
    fn starts(&self) -> std::iter::StepBy<std::ops::Range<usize>> {
        (0..self.q.d_out()).step_by(self.rows.max(1))
    }
}
