//! The decode kernel: `dst (+)= beta · x Wᵀ` for a few rows of `x` against a row-major
//! weight `W` `(d_out, d_in)` — in [`super::gemm_into`]'s terms an `m × k` left-hand side
//! times a column-major right-hand side (`rhs.rs == 1`, its columns `W`'s rows), `f32` or
//! `f64`. Such a product is bounded by reading `W` once, so this kernel reads each row of
//! `W` once per call and dots it with every row of `x` while it is in registers:
//!
//! - `W`'s rows (the output columns) are split over the threads in contiguous ranges, a
//!   multiple of [`NR`] rows each; no task gets less work than streaming one core's L2
//!   cache's worth of `W` for one row of `x` ([`Split`]: at least `L2 / m` bytes of `W`
//!   for `m` rows): waking a pool thread costs about as much as that, so a small product —
//!   a LoRA factor `A` or `B` at decode size — runs on the calling thread instead of
//!   paying for a wake-up (an L1d's worth, the earlier rule, sent the factors of an
//!   `r = 16`, `d = 2048` LoRA to two threads and cost 5–10% of the one-row forward on an
//!   Intel Xeon, `benches/RESULTS.md`). With `m` rows each byte of `W` carries `m`
//!   multiply-adds, so the bound falls as `m` grows: a LoRA step's `dA = (g B)ᵀ x` (16
//!   rows of `(g B)ᵀ` against `x`'s 2 MiB at `d = 1024`) ran on one thread under the earlier
//!   one-L2-per-task rule, 1.6× slower than on two (`benches/RESULTS.md`, "Decode kernel
//!   tasks by work").
//! - Register blocks of [`NR`] = 4 rows of `W` × `MR` rows of `x` (`MR` up to 6 with
//!   AVX-512's 32 vector registers, 3 with AVX2's 16, 2 for the portable code), one vector
//!   accumulator per pair, unaligned wide loads along `d_in`; the `d_in % WIDTH` tail in
//!   scalar code. Each output element is one accumulator's lanes summed in a fixed order
//!   plus its tail: the result does not depend on the thread count or on the block an
//!   element falls in.
//! - Instruction set ([`mod@super::machine`]): AVX-512F, AVX2 + FMA or portable code, detected
//!   at run time (`LORAKIT_CPU_ISA` lowers it).
//! - Each row of `W` in a block is asked for [`PREFETCH_BYTES`] ahead of its loads
//!   ([`super::prefetch`]): with more than one row of `x` the loop does more work per
//!   cache line of `W`, and the hardware prefetchers alone then leave its four streams
//!   waiting on memory. With `W` far larger than the caches (`cargo bench --bench
//!   decode_rows`: 8 layers of `2048 × 2048` `f32`, 128 MiB) on an AMD EPYC Zen 5, 2
//!   threads, builds with and without the hint alternating 5 to 8 times: 2 to 12 rows
//!   6–19% faster with AVX-512 (4 rows: 0.82–0.85 ×), 2 to 6 rows 20–27% with AVX2
//!   (forced), one row unchanged (0.90–1.05 ×); a weight in the L3 cache showed no
//!   slowdown beyond the noise. 512 B to 2 KiB ahead gave the same, 4 KiB less at 12
//!   rows (`benches/RESULTS.md`). The hint changes no result.
//! - The dots go to a small `d_out × m` buffer, then one pass applies `beta` and
//!   [`super::Accum`] to `dst` (so the bias pre-fill and the low-rank term stay in one
//!   output buffer), a run of a destination row at a time ([`output`]).
//!
//! **On by default** (`LORAKIT_DECODE_KERNEL=0` turns it off). Its summation order differs
//! from the `gemm` crate's, so a frozen base's own forward on the CPU in f32/f64 runs
//! through the same fused op (`FrozenLinear`'s `Module::forward`): an adapter at init
//! (`B = 0`) then still equals its base bit for bit.
//!
//! **Crossover** ([`dot_rows`]): the dots are taken for fewer rows of `x` than one vector
//! holds elements (`lanes`: up to 15 `f32` rows with AVX-512, 7 with AVX2), while `x`
//! (`m · k` elements) fits in half of one core's L2 cache ([`l2_rows`]: the kernel
//! re-reads `x` once per block of [`NR`] rows of `W`). From `lanes` rows on, the product
//! goes to [`super::col_major`]'s `W · xᵀ` route on the `gemm` crate, which lays the rows
//! of `x` along its vectors: it takes as long for 2 rows as for `lanes` (and twice that
//! for `lanes + 1` to `2 · lanes`), so it loses to the dots below `lanes` rows and wins
//! from there, where its vectors are full and it reuses each loaded element of both
//! operands more often than the dots do. Measured at `d = 2048` with 2 threads
//! (`benches/RESULTS.md`, "Where the dots stop paying"): the `gemm` product took
//! 0.6–1.1 ms for 8 to 16 rows and 1.3–1.5 ms for 20 to 32; the dots were 7–10% (an Intel
//! Xeon) and 30–40% (an AMD EPYC, Zen 4) slower than it at 16 rows. The earlier bound,
//! 4 register blocks (24 rows with AVX-512), sent those 16 rows to the dots. Both bounds
//! come from what the CPU reports, not from timings on one machine; below `lanes` rows the
//! column-major routes of [`super::col_major`] would go row by row, one pass over `W` per
//! row. Other dtypes keep those routes.
//!
//! **Row-major right-hand sides** (`rhs.cs == 1`: the input gradient `g W` of a linear
//! layer, the forward of GPT-2's `Conv1D`) take the same kernel's second form,
//! [`row_major`], which streams `R`'s rows instead of dotting `W`'s, up to
//! [`row_major::max_rows`] rows (and the bound above).
//!
//! **Narrow results** (many rows, fewer columns than a vector's lanes: a LoRA layer's
//! `x Aᵀ`, `g B` and `dB` below `r = 16` with AVX-512, and `dB` at 16 once `g` is at least
//! one core's L2) run on the transpose, written back transposed ([`transposed`]).

mod lanes;
mod output;
mod row_major;
mod transposed;

pub(super) use transposed::reroute as reroute_transposed;
#[cfg(target_arch = "x86_64")]
pub(super) use transposed::takes as takes_transposed;

use candle_core::WithDType;
use rayon::prelude::*;

use super::machine::{machine, Isa, Machine};
use super::prefetch::prefetch;
use super::same_type::same;
use super::transpose::{row_major_copy, CopyOn};
use super::{MatProduct, MatRef};
#[cfg(target_arch = "x86_64")]
use lanes::{Avx2, Avx512};
use lanes::{Lanes, Scalar};
use output::{Orientation, Output, Products};

/// Rows of `W` per register block.
const NR: usize = 4;

/// How far ahead of its loads [`dot_block`] asks for each row of `W` (see the module docs):
/// 16 cache lines per row, 64 for a block's [`NR`] rows. A prefetch pays when it is issued
/// about one memory latency (~100 ns on servers) before the load; a core streaming `W` at
/// 20–40 GB/s moves 2–4 KB in that time, 0.5–1 KB of each of the block's four rows. The
/// measured optimum is flat around it (512 B to 2 KiB the same on the CPU it was timed on),
/// so the value is not a knife edge tuned to that CPU.
const PREFETCH_BYTES: usize = 1024;

/// The most rows of `x` per register block for an instruction set: what fits in its vector
/// registers next to the `NR · MR` accumulators (16 for AVX2, 32 for AVX-512; the
/// portable code assumes SSE2's 16 and two registers per vector).
fn block_rows(isa: Isa) -> usize {
    match isa {
        Isa::Scalar => 2,
        Isa::Avx2 => 3,
        Isa::Avx512 => 6,
    }
}

/// The most rows of `x` whose `m · k` elements of `size` bytes fit in half of one core's
/// L2 cache (at least one).
fn l2_rows(k: usize, size: usize, m: &Machine) -> usize {
    (m.l2 / (2 * k.max(1) * size)).max(1)
}

/// The most rows of `x` the dots form takes against a column-major right-hand side: fewer
/// than one vector's lanes of `size`-byte elements, and [`l2_rows`] (see the module docs).
fn dot_rows(k: usize, size: usize, m: &Machine) -> usize {
    l2_rows(k, size, m).min(m.isa.lanes(size) - 1).max(1)
}

/// Whether [`reroute`] takes `product`: a few rows (up to the bound of the module docs)
/// against a right-hand side with contiguous columns or rows, with the kernel on.
pub(super) fn takes<T: WithDType>(product: &MatProduct<T>) -> bool {
    let Some(m) = decode_machine() else {
        return false;
    };
    let (lhs, rhs) = (product.lhs, product.rhs);
    let (k, size) = (lhs.cols, std::mem::size_of::<T>());
    let most_rows = match (rhs.rs, rhs.cs) {
        (1, _) => Some(dot_rows(k, size, m)),
        (_, 1) => Some(l2_rows(k, size, m).min(row_major::max_rows(m.isa))),
        _ => None,
    };
    most_rows.is_some_and(|most| lhs.rows <= most)
}

/// Runs [`super::gemm_into`]'s product through the decode kernel and returns `Some`, or
/// `None` when the kernel does not take it (another dtype, a row-major `rhs`, too many
/// rows). The caller has checked the shapes, that `k ≥ 1` and that `dst` holds the
/// `m × n` result at row stride `dst_rs ≥ n`.
pub(super) fn reroute<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
) -> Option<candle_core::Result<()>> {
    let m = decode_machine()?;
    if !takes(&product) {
        return None;
    }
    let (lhs, rhs) = (product.lhs, product.rhs);
    let size = std::mem::size_of::<T>();
    if rhs.rs == 1 && rhs.cs != 1 && short_dots_pay_for_a_copy(lhs.rows, lhs.cols, size, m) {
        return Some(through_row_major_copy(
            Split::of(m, lhs.rows),
            dst,
            dst_rs,
            product,
        ));
    }
    product_on(Split::of(m, lhs.rows), dst, dst_rs, product)
}

/// This process's machine, or `None` when the decode kernel is off
/// (`LORAKIT_DECODE_KERNEL=0`): the first check of both its reroutes.
fn decode_machine() -> Option<&'static Machine> {
    let m = machine();
    m.decode_kernel.then_some(m)
}

/// Whether a column-major right-hand side with a short inner dimension `k` (a LoRA factor
/// `Bᵀ`, `k = r`) runs faster copied row-major into the row-major form than through the
/// dots. Each dot ends in one horizontal sum of a vector, `log2(lanes)` shuffle-and-add
/// steps, `m · n` of them; the copy moves `k · n` elements once, at a few times the cost of
/// one step per element. So the copy is taken when `m · log2(lanes) > k` (and the
/// row-major form takes `m` rows). On an Intel Xeon (2 threads, f32, `Bᵀ` `16 × 2048`)
/// the dots took 7.8 / 29 / 36 / 56 / 111 µs at 1 / 4 / 5 / 8 / 16 rows with AVX-512, the
/// copy and the row-major form 25 / 27–29 / 28–30 / 31–33 / 44 µs; with AVX2 (forced) the
/// dots 26 / 33–34 / 41 / 52–54 µs at 4 / 5 / 6 / 8 rows, the copy 28–31 / 29–32 / 30–33 /
/// 34–35 µs. The rule's crossovers, 5 rows for `k = 16` with AVX-512 and 6 with AVX2, are
/// where the two meet.
fn short_dots_pay_for_a_copy(m: usize, k: usize, size: usize, machine: &Machine) -> bool {
    let steps = machine.isa.lanes(size).max(2).ilog2() as usize;
    m * steps > k && m <= row_major::max_rows(machine.isa)
}

/// The product with its column-major right-hand side first copied row-major (`k × n`,
/// pooled), then run by the row-major form.
fn through_row_major_copy<T: WithDType>(
    split: Split,
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
) -> candle_core::Result<()> {
    let (lhs, rhs, accum, beta) = product.parts();
    let copy = row_major_copy(rhs, CopyOn::CallingThread);
    let rhs = MatRef::contiguous(&copy, rhs.rows, rhs.cols)?;
    match product_on(split, dst, dst_rs, MatProduct::new(lhs, rhs, accum, beta)) {
        Some(done) => done,
        None => candle_core::bail!("fused linear: the decode kernel refused a row-major copy"),
    }
}

/// How [`product_on`] runs a product: the instruction set, and the fewest bytes of `W` a
/// thread is given (fewer tasks than threads below `threads · min_task_bytes`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Split {
    pub isa: Isa,
    pub min_task_bytes: usize,
}

impl Split {
    /// The machine's instruction set, and for a product whose streamed operand meets
    /// `rows` rows of the other, one core's L2 cache's worth of work per task: `L2 / rows`
    /// bytes of the streamed operand (the module docs).
    fn of(m: &Machine, rows: usize) -> Self {
        Self {
            isa: m.isa,
            min_task_bytes: (m.l2 / rows.max(1)).max(1),
        }
    }

    /// How many tasks stream a right-hand side of `bytes`: one per thread of the pool, but
    /// none smaller than `min_task_bytes`, and at least one.
    fn tasks(&self, bytes: usize) -> usize {
        rayon::current_num_threads()
            .min(bytes / self.min_task_bytes.max(1))
            .max(1)
    }
}

/// [`reroute`]'s product split as `split` says, whatever the number of rows; `None`
/// for a dtype other than `f32` and `f64` or a set the CPU lacks.
pub(super) fn product_on<T: WithDType>(
    split: Split,
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
) -> Option<candle_core::Result<()>> {
    oriented_product_on(split, dst, dst_rs, product, Orientation::AsIs)
}

/// [`product_on`], the result written as `orientation` says.
fn oriented_product_on<T: WithDType>(
    split: Split,
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
    orientation: Orientation,
) -> Option<candle_core::Result<()>> {
    let (lhs, rhs, accum, beta) = product.parts();
    if !split.isa.available() || (rhs.rs != 1 && rhs.cs != 1) {
        return None;
    }
    let out = Output {
        m: lhs.rows,
        n: rhs.cols,
        accum,
        beta,
    };
    let applied = if let Some((lhs, rhs)) = same::<T, f32>(lhs).zip(same::<T, f32>(rhs)) {
        products_of::<f32>(split, lhs, rhs).and_then(|p| p.apply(dst, dst_rs, out, orientation))
    } else if let Some((lhs, rhs)) = same::<T, f64>(lhs).zip(same::<T, f64>(rhs)) {
        products_of::<f64>(split, lhs, rhs).and_then(|p| p.apply(dst, dst_rs, out, orientation))
    } else {
        return None;
    };
    Some(applied)
}

/// The product in the kernel's dtype `F`, by the form that fits the right-hand side: its
/// columns contiguous (`W`'s rows, [`dots`]) or its rows ([`row_major`]).
fn products_of<F: Float>(
    split: Split,
    lhs: MatRef<F>,
    rhs: MatRef<F>,
) -> candle_core::Result<Products<F>> {
    if rhs.rs == 1 {
        return dots::<F>(split, lhs, rhs).map(Products::Dots);
    }
    let (blocks, per_task) = row_major::products::<F>(split, lhs, rhs)?;
    Ok(Products::Blocks(blocks, per_task.max(1)))
}

/// The dtypes with vector code, and their implementations.
trait Float: WithDType {
    #[cfg(target_arch = "x86_64")]
    type Avx2: Lanes<T = Self>;
    #[cfg(target_arch = "x86_64")]
    type Avx512: Lanes<T = Self>;
}

impl Float for f32 {
    #[cfg(target_arch = "x86_64")]
    type Avx2 = Avx2<f32>;
    #[cfg(target_arch = "x86_64")]
    type Avx512 = Avx512<f32>;
}

impl Float for f64 {
    #[cfg(target_arch = "x86_64")]
    type Avx2 = Avx2<f64>;
    #[cfg(target_arch = "x86_64")]
    type Avx512 = Avx512<f64>;
}

/// `W`'s rows, the columns of the right-hand side: `count` runs of `k` elements, `stride`
/// apart in `data` (all of them in range: checked by [`WeightRows::of`]). The row-major
/// form ([`row_major`]) reads a row-major right-hand side's rows as these runs (of its
/// transpose).
#[derive(Clone, Copy)]
struct WeightRows<'a, F> {
    data: &'a [F],
    stride: usize,
    k: usize,
    count: usize,
}

impl<'a, F> WeightRows<'a, F> {
    /// The columns of `rhs` (`k × count`, `rs == 1`), or `None` when one is out of range.
    fn of(rhs: MatRef<'a, F>) -> Option<Self> {
        let (k, count, stride) = (rhs.rows, rhs.cols, rhs.cs);
        let end = count.checked_sub(1)?.checked_mul(stride)?.checked_add(k)?;
        (end <= rhs.data.len()).then_some(Self {
            data: rhs.data,
            stride,
            k,
            count,
        })
    }

    /// Row `j` (`j < count`).
    fn row(&self, j: usize) -> &'a [F] {
        let start = j * self.stride;
        self.data.get(start..start + self.k).unwrap_or(&[])
    }

    /// Rows `first .. first + count` (clamped to the rows there are).
    fn range(&self, first: usize, count: usize) -> Self {
        let first = first.min(self.count);
        let data = self.data.get(first * self.stride..).unwrap_or(&[]);
        Self {
            data,
            count: count.min(self.count - first),
            ..*self
        }
    }

    /// Elements `first .. first + len` of every row (clamped to the `k` there are).
    fn within(&self, first: usize, len: usize) -> Self {
        let first = first.min(self.k);
        Self {
            data: self.data.get(first..).unwrap_or(&[]),
            k: len.min(self.k - first),
            ..*self
        }
    }
}

/// The rows of `lhs` as slices of its `cols` elements: views into its data when they are
/// adjacent, else copies in `copied`; `None` when a row is out of range.
fn lhs_rows<'a, F: Copy>(lhs: MatRef<'a, F>, copied: &'a mut Vec<F>) -> Option<Vec<&'a [F]>> {
    let (m, k) = (lhs.rows, lhs.cols);
    let rows: Vec<&[F]> = if lhs.cs == 1 {
        (0..m).filter_map(|i| lhs.row(i)).collect()
    } else {
        *copied = (0..m)
            .flat_map(|i| (0..k).map(move |t| lhs.at(i, t)))
            .collect();
        copied.chunks_exact(k.max(1)).collect()
    };
    (rows.len() == m).then_some(rows)
}

/// Every dot `x_i · W_j`, `j`-major (`dots[j · m + i]`).
fn dots<F: Float>(split: Split, lhs: MatRef<F>, rhs: MatRef<F>) -> candle_core::Result<Vec<F>> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let mut copied = Vec::new();
    let Some((x, w)) = lhs_rows(lhs, &mut copied).zip(WeightRows::of(rhs)) else {
        candle_core::bail!("fused linear: a {m}x{k}x{n} product's operands are out of range");
    };
    let tasks = split.tasks(n * k * std::mem::size_of::<F>());
    let per_task = n.div_ceil(tasks).next_multiple_of(NR);
    let mut out = vec![F::from_f64(0.0); n * m];
    for_each_task(&mut out, per_task * m, tasks, |t, out| {
        columns_on(split.isa, &x, w.range(t * per_task, per_task), out)
    });
    Ok(out)
}

/// Runs `task(t, block)` on consecutive blocks of `block_len` elements of `out` (`t` from
/// 0): over the pool when there are several `tasks`, on the calling thread for one (then
/// `out` is one block).
fn for_each_task<F: Send>(
    out: &mut [F],
    block_len: usize,
    tasks: usize,
    task: impl Fn(usize, &mut [F]) + Sync,
) {
    if tasks == 1 {
        task(0, out);
    } else {
        out.par_chunks_mut(block_len.max(1))
            .enumerate()
            .for_each(|(t, block)| task(t, block));
    }
}

/// [`columns`] with the instruction set's vector code (the portable code for one the CPU
/// lacks, which [`product_on`] has ruled out).
fn columns_on<F: Float>(isa: Isa, x: &[&[F]], w: WeightRows<F>, out: &mut [F]) {
    let mr = block_rows(isa);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.available() => {
            // SAFETY: the CPU has AVX-512F (checked just above).
            unsafe { columns_avx512::<F::Avx512>(x, w, out, mr) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.available() => {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { columns_avx2::<F::Avx2>(x, w, out, mr) }
        }
        // SAFETY: the portable code needs no instruction set.
        _ => unsafe { columns::<Scalar<F>>(x, w, out, mr) },
    }
}

/// [`columns`] compiled for AVX-512F.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn columns_avx512<S: Lanes>(
    x: &[&[S::T]],
    w: WeightRows<S::T>,
    out: &mut [S::T],
    mr: usize,
) {
    // SAFETY: the caller's contract.
    unsafe { columns::<S>(x, w, out, mr) }
}

/// [`columns`] compiled for AVX2 + FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn columns_avx2<S: Lanes>(x: &[&[S::T]], w: WeightRows<S::T>, out: &mut [S::T], mr: usize) {
    // SAFETY: the caller's contract.
    unsafe { columns::<S>(x, w, out, mr) }
}

/// The dots of every row of `x` with every row of `w` into `out` (`w`-row-major, `x.len()`
/// values per row of `w`), in register blocks of [`NR`] rows of `w` × up to `mr` of `x`.
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[inline(always)]
unsafe fn columns<S: Lanes>(x: &[&[S::T]], w: WeightRows<S::T>, out: &mut [S::T], mr: usize) {
    let m = x.len().max(1);
    for (block, ob) in out.chunks_mut(NR * m).enumerate() {
        let j = block * NR;
        if j + NR <= w.count {
            let rows = [w.row(j), w.row(j + 1), w.row(j + 2), w.row(j + 3)];
            // SAFETY: the caller's contract.
            unsafe { rows_block::<S, NR>(x, rows, ob, mr) };
        } else {
            for (r, o) in (j..w.count).zip(ob.chunks_mut(m)) {
                // SAFETY: the caller's contract.
                unsafe { rows_block::<S, 1>(x, [w.row(r)], o, mr) };
            }
        }
    }
}

/// The dots of every row of `x` with the `NW` rows `w` into `out` (`NW` runs of `x.len()`
/// values), `x`'s rows up to `mr` at a time.
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[inline(always)]
unsafe fn rows_block<S: Lanes, const NW: usize>(
    x: &[&[S::T]],
    w: [&[S::T]; NW],
    out: &mut [S::T],
    mr: usize,
) {
    let m = x.len();
    let mut i = 0;
    while i < m {
        let rest = x.get(i..).unwrap_or(&[]);
        // SAFETY (each arm): the caller's contract.
        i += unsafe {
            match rest.len().min(mr) {
                1 => block::<S, NW, 1>(rest, w, out, i, m),
                2 => block::<S, NW, 2>(rest, w, out, i, m),
                3 => block::<S, NW, 3>(rest, w, out, i, m),
                4 => block::<S, NW, 4>(rest, w, out, i, m),
                5 => block::<S, NW, 5>(rest, w, out, i, m),
                _ => block::<S, NW, 6>(rest, w, out, i, m),
            }
        };
    }
}

/// The dots of the first `MR` rows of `x` with the `NW` rows `w`, stored at
/// `out[r · m + i0 + i]`; returns `MR`.
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[inline(always)]
unsafe fn block<S: Lanes, const NW: usize, const MR: usize>(
    x: &[&[S::T]],
    w: [&[S::T]; NW],
    out: &mut [S::T],
    i0: usize,
    m: usize,
) -> usize {
    let mut xs: [&[S::T]; MR] = [&[]; MR];
    for (d, s) in xs.iter_mut().zip(x) {
        *d = s;
    }
    // SAFETY: the caller's contract.
    let dots = unsafe { dot_block::<S, NW, MR>(w, xs) };
    for (r, row) in dots.iter().enumerate() {
        let slots = out.iter_mut().skip(r * m + i0);
        for (o, &v) in slots.zip(row) {
            *o = v;
        }
    }
    MR
}

/// The `NW × MR` dots of the rows `w` with the rows `x`, over the shortest slice's length
/// (all have `k` elements): one vector accumulator per pair, its lanes summed in a fixed
/// order, then the scalar tail.
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[inline(always)]
unsafe fn dot_block<S: Lanes, const NW: usize, const MR: usize>(
    w: [&[S::T]; NW],
    x: [&[S::T]; MR],
) -> [[S::T; MR]; NW] {
    let k = w.iter().chain(&x).map(|s| s.len()).min().unwrap_or(0);
    // SAFETY (every `S` call): the caller's contract; each load reads `WIDTH` elements at
    // `t < t + WIDTH ≤ k`, inside every slice.
    unsafe {
        let mut acc = [[S::zero(); MR]; NW];
        let ahead = PREFETCH_BYTES / std::mem::size_of::<S::T>().max(1);
        let mut t = 0;
        while t + S::WIDTH <= k {
            let mut xv = [S::zero(); MR];
            for (v, row) in xv.iter_mut().zip(&x) {
                *v = S::load(row.as_ptr().add(t));
            }
            for (a, row) in acc.iter_mut().zip(&w) {
                prefetch(row.as_ptr().wrapping_add(t + ahead));
                let wv = S::load(row.as_ptr().add(t));
                for (a, &v) in a.iter_mut().zip(&xv) {
                    *a = S::fma(*a, wv, v);
                }
            }
            t += S::WIDTH;
        }
        let mut out = [[S::T::from_f64(0.0); MR]; NW];
        for ((o, a), wr) in out.iter_mut().zip(&acc).zip(&w) {
            for ((o, &a), xr) in o.iter_mut().zip(a).zip(&x) {
                let tail = wr
                    .get(t..k)
                    .unwrap_or(&[])
                    .iter()
                    .zip(xr.get(t..k).unwrap_or(&[]));
                *o = tail.fold(S::sum(a), |s, (&p, &q)| s + p * q);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::{assert_matches_triple_loop, on_threads, test_values as vals, Accum};
    use super::*;

    /// `isa` with tasks of at least 1 KiB of `W`: the small products of these tests split
    /// over every thread of the pool, as large ones do with [`Split::of`].
    fn split(isa: Isa) -> Split {
        Split {
            isa,
            min_task_bytes: 1 << 10,
        }
    }

    /// The sets this CPU runs; the others are named on stdout as skipped.
    fn sets() -> Vec<Isa> {
        let (run, skip): (Vec<Isa>, Vec<Isa>) = Isa::ALL.into_iter().partition(|i| i.available());
        for isa in skip {
            println!("decode kernel: {isa:?} skipped, this CPU lacks it");
        }
        run
    }

    /// The operands of one case, in `f64`: `x` as a row-major, a column-major and a padded
    /// view, and a buffer holding the right-hand side column-major (`W`, rows padded) or
    /// row-major (`R`, rows padded).
    struct Case {
        m: usize,
        k: usize,
        n: usize,
        x: Vec<f64>,
        x_t: Vec<f64>,
        x_pad: Vec<f64>,
        w: Vec<f64>,
    }

    impl Case {
        fn new(m: usize, k: usize, n: usize) -> Self {
            let x = vals(m * k, 0.37);
            let x_t = (0..k * m).map(|v| x[(v % m) * k + v / m]).collect();
            let x_pad = (0..m * (k + 2))
                .map(|v| match v % (k + 2) < k {
                    true => x[(v / (k + 2)) * k + v % (k + 2)],
                    false => f64::NAN,
                })
                .collect();
            let w = vals((k + 3) * (n + 3), 0.71);
            Self {
                m,
                k,
                n,
                x,
                x_t,
                x_pad,
                w,
            }
        }

        /// `(x, rhs)` views over `T` copies, for each layout of `x`.
        fn run<T: WithDType>(&self, isa: Isa, tol: f64) -> candle_core::Result<()> {
            let (m, k, n) = (self.m, self.k, self.n);
            let cast = |v: &[f64]| v.iter().map(|&a| T::from_f64(a)).collect::<Vec<T>>();
            let (x, x_t, x_pad, w) = (
                cast(&self.x),
                cast(&self.x_t),
                cast(&self.x_pad),
                cast(&self.w),
            );
            let column_major = MatRef::new(&w, k, n, 1, k + 3)?;
            let row_major = MatRef::new(&w, k, n, n + 3, 1)?;
            let views = [
                MatRef::contiguous(&x, m, k)?,
                MatRef::new(&x_t, m, k, 1, m)?,
                MatRef::new(&x_pad, m, k, k + 2, 1)?,
            ];
            let pairs = views
                .into_iter()
                .flat_map(|lhs| [(lhs, column_major), (lhs, row_major)]);
            // A column-major right-hand side also through its row-major copy (the route of
            // short inner dimensions); each pair also written transposed (the route of
            // narrow results, [`transposed`], runs `rhsᵀ lhsᵀ` as `lhs rhs`).
            let routes = pairs.flat_map(|(lhs, rhs)| {
                [
                    (false, Orientation::AsIs),
                    (true, Orientation::AsIs),
                    (false, Orientation::Transposed),
                ]
                .into_iter()
                .filter(move |&(copy, _)| !copy || rhs.rs == 1)
                .map(move |(copy, orientation)| (lhs, rhs, copy, orientation))
            });
            for (lhs, rhs, copy, orientation) in routes {
                // What the destination holds: `lhs rhs`, or its transpose `rhsᵀ lhsᵀ`.
                let holds = |accum, beta| match orientation {
                    Orientation::AsIs => MatProduct::new(lhs, rhs, accum, beta),
                    Orientation::Transposed => MatProduct::new(rhs.t(), lhs.t(), accum, beta),
                };
                for (accum, beta) in [(Accum::Replace, 1.0), (Accum::Add, -0.5)] {
                    let beta = T::from_f64(beta);
                    let expected = holds(accum, beta);
                    let dst_rs = expected.rhs.cols + 2;
                    let start = cast(&vals(expected.lhs.rows * dst_rs, 1.3));
                    let mut dst = start.clone();
                    let product = MatProduct::new(lhs, rhs, accum, beta);
                    let done = match copy {
                        true => Some(through_row_major_copy(
                            split(isa),
                            &mut dst,
                            dst_rs,
                            product,
                        )),
                        false => {
                            oriented_product_on(split(isa), &mut dst, dst_rs, product, orientation)
                        }
                    };
                    match done {
                        Some(done) => done?,
                        None => candle_core::bail!("{isa:?} refused a {m}x{k}x{n} product"),
                    }
                    let context = format!("{isa:?}, copy {copy}, {orientation:?}");
                    assert_matches_triple_loop(&dst, &start, dst_rs, expected, tol, &context);
                }
            }
            Ok(())
        }
    }

    /// Every instruction set this CPU has, `f32` and `f64`, both forms (column- and
    /// row-major right-hand side, and a column-major one through its row-major copy), each
    /// also written transposed, against an f64 triple loop: row counts 1 to 13 and 16 (every register block height,
    /// two blocks of 8 and remainders), `d_in` not a multiple of any vector width and
    /// shorter than one vector, `d_out` not a multiple of the 4-row block nor of a vector,
    /// more columns than one panel and more inner rows than one block of the row-major form
    /// hold, strided and padded `x`, a padded destination, `Accum` and `beta`.
    #[test]
    fn every_instruction_set_matches_a_triple_loop() -> candle_core::Result<()> {
        let sets = sets();
        assert!(sets.contains(&Isa::Scalar));
        for isa in sets {
            for (m, k, n) in [
                (1, 37, 9),
                (3, 3, 6),
                (5, 70, 13),
                (7, 19, 4),
                (13, 41, 11),
                (2, 1, 1),
                (13, 9, 300),
                (1, 6, 7000),
                (9, 300, 130),
                (16, 41, 70),
            ] {
                let case = Case::new(m, k, n);
                case.run::<f64>(isa, 1e-14)?;
                case.run::<f32>(isa, 1e-6)?;
            }
        }
        Ok(())
    }

    /// Other dtypes and right-hand sides with no unit stride are left to the other routes.
    #[test]
    fn other_dtypes_and_strided_rhs_are_refused() -> candle_core::Result<()> {
        let data = vec![half::bf16::from_f64(1.0); 12];
        let x = MatRef::contiguous(&data, 2, 3)?;
        let w = MatRef::new(&data, 3, 4, 1, 3)?;
        let mut dst = vec![half::bf16::from_f64(0.0); 8];
        let product = MatProduct::new(x, w, Accum::Replace, half::bf16::ONE);
        let bf = product_on(split(Isa::Scalar), &mut dst, 4, product);
        assert!(bf.is_none());
        let data = vals(24, 0.3);
        let x = MatRef::contiguous(&data, 2, 3)?;
        let every_other = MatRef::new(&data, 3, 4, 8, 2)?;
        let mut dst = vec![0.0; 8];
        let product = MatProduct::new(x, every_other, Accum::Replace, 1.0);
        assert!(product_on(split(Isa::Scalar), &mut dst, 4, product).is_none());
        Ok(())
    }

    /// The same bits from pools of 1 and 3 threads (the columns split differently), on
    /// every set this CPU has, written as is and transposed.
    #[test]
    fn results_do_not_depend_on_the_thread_count() -> candle_core::Result<()> {
        let (m, k, n) = (5, 301, 203);
        let x: Vec<f32> = vals(m * k, 0.37).into_iter().map(|v| v as f32).collect();
        let w: Vec<f32> = vals(n * k, 0.71).into_iter().map(|v| v as f32).collect();
        let lhs = MatRef::contiguous(&x, m, k)?;
        assert!(
            n * k * 4 >= 3 * split(Isa::Scalar).min_task_bytes,
            "too small to split over 3 threads"
        );
        let forms = [
            MatRef::contiguous(&w, n, k)?.t(),
            MatRef::contiguous(&w, k, n)?,
        ];
        let orientations = [Orientation::AsIs, Orientation::Transposed];
        let cases = sets()
            .into_iter()
            .flat_map(|i| forms.map(|f| (i, f)))
            .flat_map(|(i, f)| orientations.map(|o| (i, f, o)));
        for (isa, rhs, orientation) in cases {
            let run = |threads: usize| -> candle_core::Result<Vec<f32>> {
                let mut dst = vec![0.5f32; m * n];
                let product = MatProduct::new(lhs, rhs, Accum::Add, 1.0);
                let dst_rs = match orientation {
                    Orientation::AsIs => n,
                    Orientation::Transposed => m,
                };
                on_threads(threads, || {
                    oriented_product_on(split(isa), &mut dst, dst_rs, product, orientation)
                })?
                .unwrap_or_else(|| candle_core::bail!("refused"))?;
                Ok(dst)
            };
            let (one, three) = (run(1)?, run(3)?);
            assert!(
                one.iter()
                    .zip(&three)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?}, rhs row stride {}, {orientation:?}",
                rhs.rs
            );
        }
        Ok(())
    }

    /// The crossover follows the caches, the instruction set and the dtype: fewer rows
    /// than a vector's lanes for the dots, while `x` fits in half of the L2.
    #[test]
    fn dot_rows_follow_the_machine() {
        let small = Machine {
            isa: Isa::Avx2,
            l1d: 32 << 10,
            l2: 256 << 10,
            decode_kernel: true,
        };
        assert_eq!(l2_rows(2048, 4, &small), 16);
        assert_eq!(dot_rows(2048, 4, &small), 7); // 8 f32 lanes
        assert_eq!(dot_rows(2048, 8, &small), 3); // 4 f64 lanes
        assert_eq!(dot_rows(16384, 4, &small), 2); // 2 rows fit the L2's half
        let big = Machine {
            isa: Isa::Avx512,
            l2: 2 << 20,
            ..small
        };
        assert_eq!(dot_rows(2048, 4, &big), 15);
        assert_eq!(dot_rows(2048, 8, &big), 7);
        assert_eq!(dot_rows(1 << 20, 8, &big), 1);
        let portable = Machine {
            isa: Isa::Scalar,
            ..big
        };
        assert_eq!(dot_rows(2048, 4, &portable), 3);
        assert_eq!(dot_rows(2048, 8, &portable), 1);
    }

    /// Tasks carry one core's L2 cache of work against one row: `L2 / rows` bytes of the
    /// streamed operand, so the one-row decode of a 2 MiB `W` stays on one thread while a
    /// LoRA step's `dA` (16 rows against `x`'s 2 MiB at `d = 1024`) takes both, and a
    /// task is never smaller than a byte.
    #[test]
    fn tasks_carry_an_l2_of_work_per_row() -> candle_core::Result<()> {
        let m = Machine::AVX512_SERVER; // 2 MiB L2
        let tasks = |rows: usize, bytes: usize| Split::of(&m, rows).tasks(bytes);
        let counts = on_threads(2, || {
            [
                tasks(1, 2 << 20),
                tasks(1, 4 << 20),
                tasks(16, 2 << 20),
                tasks(4, 512 << 10),
                tasks(4, 1 << 20),
                tasks(0, 2 << 20),
            ]
        })?;
        assert_eq!(counts, [1, 2, 2, 1, 2, 1]);
        assert_eq!(Split::of(&m, usize::MAX).min_task_bytes, 1);
        Ok(())
    }

    /// The copy for short inner dimensions: past `k / log2(lanes)` rows (5 for `r = 16`
    /// with AVX-512's 16 `f32` lanes, 6 with AVX2's 8), never for a long `k`, and only for
    /// rows the row-major form takes.
    #[test]
    fn short_dots_are_copied_past_k_over_log2_lanes_rows() {
        let avx512 = Machine::AVX512_SERVER;
        let avx2 = Machine {
            isa: Isa::Avx2,
            ..avx512
        };
        let copies = |m, k, machine: &Machine| short_dots_pay_for_a_copy(m, k, 4, machine);
        assert!(!copies(4, 16, &avx512) && copies(5, 16, &avx512) && copies(16, 16, &avx512));
        assert!(!copies(17, 16, &avx512)); // past the row-major form's 16 rows
        assert!(!copies(5, 16, &avx2) && copies(6, 16, &avx2) && !copies(9, 16, &avx2));
        assert!(!copies(16, 2048, &avx512));
    }
}
