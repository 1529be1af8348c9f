//! Fused dequantize-and-dot for the few-row forward (decoding) over a quantized `W`: every
//! row of `W` is dotted with up to [`MAX_X_ROWS`] f32 input rows straight from its GGML
//! blocks, Q8_0, Q4_K, Q5_K and Q6_K (other types take the caller's dequantizing path).
//! No dequantized row is written out, and the activations stay in f32 (unlike llama.cpp's
//! and candle's `vec_dot`, which quantize them to Q8): the result is the dequantized-weight
//! product up to f32 rounding order.
//!
//! Three implementations:
//! - AVX-512F, and AVX2 + FMA + F16C (`std::arch`, chosen at run time; `in_place.rs`): each
//!   block read where it lies, the small integers `q` converted to f32 and multiply-added
//!   with the inputs 16 (8) at a time (Q8_0 and Q6_K: scaled first, once for all the input
//!   rows; Q4_K and Q5_K: each group's sum scaled once), each group's offset taken from the
//!   input's per-call group sums.
//! - Portable: each block unpacked into small integers `q` and per-group `(a, b)` on the
//!   stack ([`unpack`]), each weight `a · q − b` formed with the two roundings of candle's
//!   `to_float` (bit for bit the dequantized weight) and multiply-added.
//!
//! Each W row is summed by one task in a fixed order, so the result does not depend on the
//! thread count.

mod in_place;
mod unpack;

use candle_core::quantized::GgmlDType;

use crate::cpu_features::avx2_fma_f16c as avx2_available;
use in_place::InPlace;
use unpack::{Block, Unpacked, Q4K, Q5K, Q6K, Q8_0};

/// Most input rows one pass over `W` takes.
pub(crate) const MAX_X_ROWS: usize = 4;

/// The instruction set a kernel runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// Plain Rust (any CPU).
    Portable,
    /// AVX2 + FMA + F16C (x86-64 CPUs that report all three).
    Avx2,
    /// AVX-512F with AVX2 + FMA + F16C.
    Avx512,
}

impl Isa {
    /// The fastest set this CPU has, no wider than the machine's choice
    /// ([`mod@super::super::machine`], which `LORAKIT_CPU_ISA` lowers for every kernel).
    pub(crate) fn best() -> Self {
        use super::super::machine::{machine, Isa as Machine};
        let allowed = machine().isa;
        if allowed >= Machine::Avx512 && avx512_available() {
            Isa::Avx512
        } else if allowed >= Machine::Avx2 && avx2_available() {
            Isa::Avx2
        } else {
            Isa::Portable
        }
    }

    /// The sets a CPU with `best` runs, narrowest first.
    #[cfg(test)]
    pub(crate) fn up_to(best: Self) -> Vec<Self> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&isa| isa <= best)
            .collect()
    }
}

/// `out[j · n + i] = Σ_k x_i[k] · W[j, k]` for the rows `j` of `W` whose blocks are `rows`
/// (a whole number of rows) and the `n = xs.len()` input rows, `sums` their group sums
/// where the kernel reads them ([`RowDots::input_sums`]).
type RowsFn = fn(rows: &[u8], xs: &[&[f32]], sums: &[&[f32]], out: &mut [f32]);

/// A fused kernel for one block type, input row count and instruction set.
#[derive(Clone, Copy)]
pub(crate) struct RowDots {
    run: RowsFn,
    row_bytes: usize,
    d_in: usize,
    n: usize,
    /// Values per group of the input sums the kernel reads (`None`: it reads none).
    sum_group: Option<usize>,
}

impl RowDots {
    /// The kernel for `dtype` (`None`: no fused kernel for it) over rows of `d_in` values
    /// and `n` input rows (`1 ..= MAX_X_ROWS`), on `isa` (AVX2 falls back to the portable
    /// kernel on a CPU without it).
    pub(crate) fn new(dtype: GgmlDType, d_in: usize, n: usize, isa: Isa) -> Option<Self> {
        let (run, values, bytes, sum_group) = match dtype {
            GgmlDType::Q8_0 => kernel::<Q8_0>(n, isa)?,
            GgmlDType::Q4K => kernel::<Q4K>(n, isa)?,
            GgmlDType::Q5K => kernel::<Q5K>(n, isa)?,
            GgmlDType::Q6K => kernel::<Q6K>(n, isa)?,
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
            sum_group,
        })
    }

    /// Bytes of one row of blocks.
    pub(crate) fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// The sums of each input row's groups that [`RowDots::run`] reads (none for a kernel
    /// that reads none): computed once per product and shared by every task.
    pub(crate) fn input_sums(&self, xs: &[&[f32]]) -> Vec<Vec<f32>> {
        let Some(len) = self.sum_group else {
            return Vec::new();
        };
        xs.iter()
            .map(|x| x.chunks_exact(len).map(|g| g.iter().sum()).collect())
            .collect()
    }

    /// `out[j · n + i] = x_i · W_j` for the whole rows of blocks in `rows`; `xs` holds the
    /// `n` input rows of `d_in` values each, `sums` their [`RowDots::input_sums`], `out` is
    /// `(rows, n)`.
    pub(crate) fn run(
        &self,
        rows: &[u8],
        xs: &[&[f32]],
        sums: &[&[f32]],
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let k = rows.len() / self.row_bytes.max(1);
        let sums_fit = match self.sum_group {
            Some(len) => sums.len() == self.n && sums.iter().all(|s| s.len() == self.d_in / len),
            None => sums.is_empty(),
        };
        if !rows.len().is_multiple_of(self.row_bytes.max(1))
            || xs.len() != self.n
            || xs.iter().any(|x| x.len() != self.d_in)
            || !sums_fit
            || out.len() != k * self.n
        {
            candle_core::bail!(
                "fused quantized dot: {} bytes for rows of {}, {} input rows (want {}), {} rows of \
                 input sums, for {} outputs",
                rows.len(),
                self.row_bytes,
                xs.len(),
                self.n,
                sums.len(),
                out.len()
            );
        }
        (self.run)(rows, xs, sums, out);
        Ok(())
    }
}

/// The kernel for block type `B` and `n` input rows on `isa` (AVX-512F falls back to AVX2
/// on a CPU without it, AVX2 to the portable kernel on a CPU without AVX2, FMA and F16C),
/// with `B`'s values and bytes per block and the group of the input sums the kernel reads.
fn kernel<B: InPlace>(n: usize, isa: Isa) -> Option<(RowsFn, usize, usize, Option<usize>)> {
    let in_place = isa >= Isa::Avx2 && avx2_available();
    let run: RowsFn = match (in_place, isa == Isa::Avx512) {
        (false, _) => by_rows(
            n,
            [
                portable_rows::<B, 1>,
                portable_rows::<B, 2>,
                portable_rows::<B, 3>,
                portable_rows::<B, 4>,
            ],
        )?,
        (true, false) => by_rows(
            n,
            [
                in_place::rows::<B, 1, false>,
                in_place::rows::<B, 2, false>,
                in_place::rows::<B, 3, false>,
                in_place::rows::<B, 4, false>,
            ],
        )?,
        (true, true) => by_rows(
            n,
            [
                in_place::rows::<B, 1, true>,
                in_place::rows::<B, 2, true>,
                in_place::rows::<B, 3, true>,
                in_place::rows::<B, 4, true>,
            ],
        )?,
    };
    let sum_group = if in_place { B::SUM_GROUP } else { None };
    Some((run, B::VALUES, B::BYTES, sum_group))
}

/// The kernel for `n` input rows (`1 ..= MAX_X_ROWS`) of one kernel per row count.
fn by_rows(n: usize, kernels: [RowsFn; MAX_X_ROWS]) -> Option<RowsFn> {
    kernels.get(n.checked_sub(1)?).copied()
}

/// Whether this CPU runs AVX-512F, AVX2, FMA and F16C.
fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && avx2_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The portable kernel: [`RowsFn`] for `N` input rows.
fn portable_rows<B: Block, const N: usize>(
    rows: &[u8],
    xs: &[&[f32]],
    _sums: &[&[f32]],
    out: &mut [f32],
) {
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
