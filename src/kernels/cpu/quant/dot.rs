//! Fused dequantize-and-dot for the few-row forward (decoding) over a quantized `W`: every
//! row of `W` is dotted with up to [`MAX_X_ROWS`] f32 input rows straight from its GGML
//! blocks. A block is unpacked into small integers `q` and per-group `(a, b)` (a few hundred
//! bytes on the stack, see [`unpack`]); each weight `a · q − b` is formed in registers, with
//! the two roundings of candle's `to_float` (so the weight is bit for bit the dequantized
//! one), and multiply-added into f32 accumulators. No dequantized row is written out, and
//! the activations stay in f32 (unlike llama.cpp's and candle's `vec_dot`, which quantize
//! them to Q8): the result is the dequantized-weight product up to f32 summation order.
//!
//! Q8_0, Q4_K, Q5_K and Q6_K have kernels; other types take the caller's dequantizing path.
//! On AVX2, Q8_0 and Q4_K read their blocks in place (`in_place.rs`) rather than through
//! [`unpack`]: same weights, same summation order, fewer instructions per weight.
//! Two implementations: AVX2 + FMA (`std::arch`, chosen at run time) and a portable one.
//! Each W row is summed by one task in a fixed order (two 8-lane accumulators per input row
//! on AVX2, one on the portable path), so the result does not depend on the thread count.

mod avx2;
mod in_place;
mod unpack;

use candle_core::quantized::GgmlDType;

use unpack::{Block, Unpacked, Q4K, Q5K, Q6K, Q8_0};

/// Most input rows one pass over `W` takes.
pub(crate) const MAX_X_ROWS: usize = 4;

/// The instruction set a kernel runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Plain Rust (any CPU).
    Portable,
    /// AVX2 + FMA (x86-64 CPUs that report both).
    Avx2,
}

impl Isa {
    /// The fastest set this CPU has.
    pub(crate) fn best() -> Self {
        if avx2::available() {
            Isa::Avx2
        } else {
            Isa::Portable
        }
    }
}

/// `out[j · n + i] = Σ_k x_i[k] · W[j, k]` for the rows `j` of `W` whose blocks are `rows`
/// (a whole number of rows) and the `n = xs.len()` input rows.
type RowsFn = fn(rows: &[u8], xs: &[&[f32]], out: &mut [f32]);

/// A fused kernel for one block type, input row count and instruction set.
#[derive(Clone, Copy)]
pub(crate) struct RowDots {
    run: RowsFn,
    row_bytes: usize,
    d_in: usize,
    n: usize,
}

impl RowDots {
    /// The kernel for `dtype` (`None`: no fused kernel for it) over rows of `d_in` values
    /// and `n` input rows (`1 ..= MAX_X_ROWS`), on `isa` (AVX2 falls back to the portable
    /// kernel on a CPU without it).
    pub(crate) fn new(dtype: GgmlDType, d_in: usize, n: usize, isa: Isa) -> Option<Self> {
        let (run, values, bytes) = match dtype {
            GgmlDType::Q8_0 => {
                let kernels = [
                    in_place::q8_0_rows::<1>,
                    in_place::q8_0_rows::<2>,
                    in_place::q8_0_rows::<3>,
                    in_place::q8_0_rows::<4>,
                ];
                let run = pick_in_place::<Q8_0>(n, isa, kernels)?;
                (run, Q8_0::VALUES, Q8_0::BYTES)
            }
            GgmlDType::Q4K => {
                let kernels = [
                    in_place::q4k_rows::<1>,
                    in_place::q4k_rows::<2>,
                    in_place::q4k_rows::<3>,
                    in_place::q4k_rows::<4>,
                ];
                (
                    pick_in_place::<Q4K>(n, isa, kernels)?,
                    Q4K::VALUES,
                    Q4K::BYTES,
                )
            }
            GgmlDType::Q5K => (pick::<Q5K>(n, isa)?, Q5K::VALUES, Q5K::BYTES),
            GgmlDType::Q6K => (pick::<Q6K>(n, isa)?, Q6K::VALUES, Q6K::BYTES),
            _ => return None,
        };
        if d_in == 0 || !d_in.is_multiple_of(values) {
            return None;
        }
        Some(Self {
            run,
            row_bytes: d_in / values * bytes,
            d_in,
            n,
        })
    }

    /// Bytes of one row of blocks.
    pub(crate) fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// `out[j · n + i] = x_i · W_j` for the whole rows of blocks in `rows`; `xs` holds the
    /// `n` input rows of `d_in` values each, `out` is `(rows, n)`.
    pub(crate) fn run(
        &self,
        rows: &[u8],
        xs: &[&[f32]],
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let k = rows.len() / self.row_bytes.max(1);
        if !rows.len().is_multiple_of(self.row_bytes.max(1))
            || xs.len() != self.n
            || xs.iter().any(|x| x.len() != self.d_in)
            || out.len() != k * self.n
        {
            candle_core::bail!(
                "fused quantized dot: {} bytes for rows of {}, {} input rows (want {}) for {} outputs",
                rows.len(),
                self.row_bytes,
                xs.len(),
                self.n,
                out.len()
            );
        }
        (self.run)(rows, xs, out);
        Ok(())
    }
}

/// The kernel for block type `B` and `n` input rows.
fn pick<B: Block>(n: usize, isa: Isa) -> Option<RowsFn> {
    let avx2 = isa == Isa::Avx2 && avx2::available();
    Some(match (n, avx2) {
        (1, false) => portable_rows::<B, 1>,
        (2, false) => portable_rows::<B, 2>,
        (3, false) => portable_rows::<B, 3>,
        (4, false) => portable_rows::<B, 4>,
        (1, true) => avx2::rows::<B, 1>,
        (2, true) => avx2::rows::<B, 2>,
        (3, true) => avx2::rows::<B, 3>,
        (4, true) => avx2::rows::<B, 4>,
        _ => return None,
    })
}

/// The kernel for block type `B` (one with an in-place AVX2 kernel, `kernels[n − 1]` for
/// `n` input rows) and `n` input rows: the in-place one on AVX2, else the portable one.
fn pick_in_place<B: Block>(n: usize, isa: Isa, kernels: [RowsFn; MAX_X_ROWS]) -> Option<RowsFn> {
    if isa != Isa::Avx2 || !avx2::available() {
        return pick::<B>(n, Isa::Portable);
    }
    kernels.get(n.checked_sub(1)?).copied()
}

/// The portable kernel: [`RowsFn`] for `N` input rows.
fn portable_rows<B: Block, const N: usize>(rows: &[u8], xs: &[&[f32]], out: &mut [f32]) {
    let Ok(xs) = <&[&[f32]; N]>::try_from(xs) else {
        return;
    };
    let row_bytes = row_bytes_of::<B>(xs);
    let mut u = Unpacked::new();
    for (row, out) in rows
        .chunks_exact(row_bytes.max(1))
        .zip(out.chunks_exact_mut(N))
    {
        let mut acc = [[0f32; 8]; N];
        for (b, block) in row.chunks_exact(B::BYTES).enumerate() {
            B::unpack(block, &mut u);
            let x = xs.map(|x| block_of(x, b, B::VALUES));
            portable_block(&u, B::VALUES, B::GROUP, &x, &mut acc);
        }
        for (o, acc) in out.iter_mut().zip(&acc) {
            *o = acc.iter().sum();
        }
    }
}

/// Bytes of one row of `B` blocks as long as the input rows.
#[inline(always)]
fn row_bytes_of<B: Block>(xs: &[&[f32]]) -> usize {
    xs.first().map_or(0, |x| x.len()) / B::VALUES * B::BYTES
}

/// Values `b · len .. (b + 1) · len` of `x` (empty past the end: callers check lengths).
#[inline(always)]
fn block_of(x: &[f32], b: usize, len: usize) -> &[f32] {
    x.get(b * len..(b + 1) * len).unwrap_or_default()
}

/// `acc[i][l] += x_i[k] · w[k]` over one unpacked block, `k = 8 c + l`.
#[inline(always)]
fn portable_block<const N: usize>(
    u: &Unpacked,
    values: usize,
    group: usize,
    x: &[&[f32]; N],
    acc: &mut [[f32; 8]; N],
) {
    let groups =
        u.q.get(..values)
            .unwrap_or_default()
            .chunks_exact(group.max(8));
    for (g, (q, &(a, b))) in groups.zip(&u.ab).enumerate() {
        for (c, q) in q.chunks_exact(8).enumerate() {
            let mut w = [0f32; 8];
            for (w, &q) in w.iter_mut().zip(q) {
                *w = a * f32::from(q) - b;
            }
            let at = g * group + c * 8;
            for (acc, x) in acc.iter_mut().zip(x) {
                let x = x.get(at..at + 8).unwrap_or_default();
                for ((acc, &x), &w) in acc.iter_mut().zip(x).zip(&w) {
                    *acc += x * w;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
