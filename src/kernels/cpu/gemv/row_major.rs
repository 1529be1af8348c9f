//! The decode kernel for a row-major right-hand side: `dst (+)= beta · x R` for a few rows
//! of `x` `(m, k)` against `R` `(k, n)` whose rows are contiguous (`rhs.cs == 1`). This is
//! the input gradient `g W` of a linear layer at decode-sized batches (`W` is `(d_out,
//! d_in)` row-major) and the forward of a GPT-2 `Conv1D` layer, whose weight is stored
//! `(in, out)`. Like the column-major form in [`super`], the product is bounded by reading
//! `R` once; the `gemm` crate runs it as one thread's matrix-vector product (about 26 GB/s
//! on an Intel Xeon with a 16 MiB `R` in its cache, where two threads stream 40+).
//!
//! - `R`'s columns (the output columns) are split over the threads in contiguous ranges,
//!   multiples of [`ALIGN`] columns, with the column-major form's rule for the smallest
//!   task ([`Split`]).
//! - Each task takes `R`'s rows a block at a time ([`block_depth`] rows: one panel of them
//!   fits in half of one core's L1 data cache, the block in half of its L2) and first copies
//!   the block, row by row, into panels of [`NV`] vectors' columns that lie contiguously
//!   (so `R` streams from memory in its own order, and a panel's rows do not fall into the
//!   same few cache sets, as rows a power of two apart do). Then for each panel and block of
//!   up to `mr` rows of `x` (4 with AVX-512, 2 with AVX2, 1 for the portable code) the
//!   `mr × NV` vector sums stay in registers over the block's rows: each vector of `R` is
//!   loaded once per block of rows of `x` and multiplied by those rows' broadcast elements.
//!   On an Intel Xeon (AVX-512, 2 threads, `m = 16`, `R` `2048 × 2048`) the fused
//!   linear's forward + backward took 2.83–2.98 ms with this form against 3.11–3.17 ms
//!   with the previous one, which kept `m ×` 768-column tiles of sums in memory and added
//!   4 rows of `R` straight from `R` at a time (`benches/RESULTS.md`).
//! - Every output element is its `k` products added in order of `k`, one at a time, to an
//!   accumulator that starts at zero: the same operations whatever the thread count, the
//!   block or the panel. Columns past the task's last whole vector run in scalar code: the
//!   same columns for any thread count, since the ranges are multiples of [`ALIGN`].

use candle_core::WithDType;

use super::super::machine::{machine, Isa};
use super::super::{MatRef, Scratch};
use super::lanes::{Lanes, Scalar};
use super::{for_each_task, lhs_rows, Float, Split, WeightRows};

/// Task ranges are multiples of this many columns (a multiple of every vector
/// width in elements, so that the vector code and the scalar tail cover the same columns
/// for any split).
const ALIGN: usize = 16;

/// The rows of `x` per block of the instruction set (what fits in its vector registers
/// next to the `mr ×` [`NV`] sums, a vector of `R` and `mr` broadcast elements).
fn block_rows(isa: Isa) -> usize {
    match isa {
        Isa::Scalar => 1,
        Isa::Avx2 => 2,
        Isa::Avx512 => 4,
    }
}

/// The most rows of `x` this form takes with an instruction set: 4 blocks of rows (16 with
/// AVX-512, 8 with AVX2), none with the portable code. On an Intel Xeon (2 threads,
/// `x R` with `R` `2048 × 2048`) it was 1.4–1.6× faster than the `gemm` crate from 1 to 16
/// rows with AVX-512 and 1.0–1.2× from 1 to 8 with AVX2 (forced there with
/// `LORAKIT_CPU_ISA=avx2`), at par or slower past that; the portable code was slower than
/// the `gemm` crate at every row count.
pub(super) fn max_rows(isa: Isa) -> usize {
    match isa {
        Isa::Scalar => 0,
        isa => 4 * block_rows(isa),
    }
}

/// Rows of `R` per block when `R` is read in place (one block of rows of `x`): a few
/// concurrent streams through `R`, and the sums loaded and stored once per this many rows.
const DIRECT_DEPTH: usize = 8;

/// Vectors of `R` per row of a panel (the register block's columns): `MR · NV` sums, `NV`
/// vectors of `R` and `MR` broadcast elements fit in the 16 vector registers of SSE2 /
/// AVX2 (`MR` = 1 / 2) and the 32 of AVX-512 (`MR` = 4).
const NV: usize = 6;

/// Rows of `R` per packed block for panels of `panel` columns over a task of `width`
/// columns of `size`-byte elements: one panel's rows take at most half of one core's L1
/// data cache (it is read once per block of rows of `x`), the whole packed block at most
/// half of its L2 cache; at least 4 and at most 512 rows.
fn block_depth(panel: usize, width: usize, size: usize, l1d: usize, l2: usize) -> usize {
    let in_l1 = l1d / (2 * panel.max(1) * size.max(1));
    let in_l2 = l2 / (2 * width.max(1) * size.max(1));
    in_l1.min(in_l2).clamp(4, 512)
}

/// `x R` as per-task blocks: task `t` covers columns `t · per_task ..` (`per_task` returned
/// with the products) and holds its `m × width` block row-major at `t · per_task · m`.
pub(super) fn products<F: Float>(
    split: Split,
    lhs: MatRef<F>,
    rhs: MatRef<F>,
) -> candle_core::Result<(Vec<F>, usize)> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let mut copied = Vec::new();
    // R's rows, as runs of n elements (the rows of Rᵀ, whose columns are contiguous).
    let Some((x, rows)) = lhs_rows(lhs, &mut copied).zip(WeightRows::of(rhs.t())) else {
        candle_core::bail!("fused linear: a {m}x{k}x{n} product's operands are out of range");
    };
    let tasks = split.tasks(n * k * std::mem::size_of::<F>());
    let per_task = n.div_ceil(tasks).next_multiple_of(ALIGN);
    let caches = machine();
    let mut out = vec![F::from_f64(0.0); n * m];
    for_each_task(&mut out, per_task * m, tasks, |t, block| {
        let first = t * per_task;
        let width = per_task.min(n - first);
        let panel = NV * vector_width::<F>(split.isa);
        let depth = block_depth(panel, width, size_of::<F>(), caches.l1d, caches.l2);
        sums_on(split.isa, &x, rows.within(first, width), block, depth);
    });
    Ok((out, per_task))
}

/// [`sums`] with the instruction set's vector code (the portable code for one the CPU
/// lacks, which the caller has ruled out).
fn sums_on<F: Float>(isa: Isa, x: &[&[F]], r: WeightRows<F>, out: &mut [F], depth: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.available() => {
            // SAFETY: the CPU has AVX-512F (checked just above).
            unsafe { sums_avx512::<F::Avx512>(x, r, out, depth) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.available() => {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { sums_avx2::<F::Avx2>(x, r, out, depth) }
        }
        // SAFETY: the portable code needs no instruction set.
        _ => unsafe { sums::<Scalar<F>>(x, r, out, depth, block_rows(Isa::Scalar)) },
    }
}

/// [`sums`] compiled for AVX-512F.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sums_avx512<S: Lanes>(
    x: &[&[S::T]],
    r: WeightRows<S::T>,
    out: &mut [S::T],
    depth: usize,
) {
    // SAFETY: the caller's contract.
    unsafe { sums::<S>(x, r, out, depth, block_rows(Isa::Avx512)) }
}

/// [`sums`] compiled for AVX2 + FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sums_avx2<S: Lanes>(x: &[&[S::T]], r: WeightRows<S::T>, out: &mut [S::T], depth: usize) {
    // SAFETY: the caller's contract.
    unsafe { sums::<S>(x, r, out, depth, block_rows(Isa::Avx2)) }
}

/// Elements per vector of an instruction set's code for `F`.
fn vector_width<F: Float>(isa: Isa) -> usize {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => <F::Avx512 as Lanes>::WIDTH,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => <F::Avx2 as Lanes>::WIDTH,
        _ => <Scalar<F> as Lanes>::WIDTH,
    }
}

/// `out[i · width + c] += Σ_t x_i[t] R[t][c]` over every row `t` of `r` (`width = r.k`
/// columns), `depth` rows of `R` at a time: each block of rows is first copied, row by row
/// (so `R` streams from memory in its own order), into panels of [`NV`] vectors' columns
/// that lie contiguously (`depth × panel`); then each panel's sums for a block of up to
/// `mr` rows of `x` stay in registers over the block's rows. With no more than `mr` rows of
/// `x` every vector of `R` is loaded once anyway: the blocks are then [`DIRECT_DEPTH`] rows
/// of `R` read in place, not copied. Columns past the last whole vector are added in
/// scalar code, straight from `r`.
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[inline(always)]
unsafe fn sums<S: Lanes>(
    x: &[&[S::T]],
    r: WeightRows<S::T>,
    out: &mut [S::T],
    depth: usize,
    mr: usize,
) {
    let (m, width) = (x.len(), r.k);
    if out.len() < m * width || x.iter().any(|row| row.len() < r.count) {
        return;
    }
    let vector_cols = width - width % S::WIDTH;
    let panels = Panels {
        full: NV * S::WIDTH,
        vector_cols,
    };
    // One block of rows of `x` loads each vector of `R` once: packing would only add a copy.
    let direct = m <= mr;
    let depth = if direct { DIRECT_DEPTH } else { depth.max(1) };
    let mut packed = Scratch::<S::T>::zeros(if direct { 0 } else { depth * vector_cols });
    let mut t0 = 0;
    while t0 < r.count {
        let rows = depth.min(r.count - t0);
        let block = if direct {
            Block::direct(r, t0, rows)
        } else {
            pack(r, t0, rows, panels, &mut packed);
            Block::packed(&packed, t0, rows)
        };
        for (c, w) in panels.iter() {
            let mut i = 0;
            while i < m {
                // SAFETY (each arm): the caller's contract; `out` holds `m × width`, every row
                // of `x` at least `r.count` elements (both checked above).
                i += unsafe {
                    match (w == panels.full, (m - i).min(mr)) {
                        (true, 1) => panel_block::<S, 1, NV>(x, block, out, width, c, i),
                        (true, 2) => panel_block::<S, 2, NV>(x, block, out, width, c, i),
                        (true, 3) => panel_block::<S, 3, NV>(x, block, out, width, c, i),
                        (true, _) => panel_block::<S, 4, NV>(x, block, out, width, c, i),
                        (false, 1) => panel_block::<S, 1, 1>(x, block, out, width, c, i),
                        (false, 2) => panel_block::<S, 2, 1>(x, block, out, width, c, i),
                        (false, 3) => panel_block::<S, 3, 1>(x, block, out, width, c, i),
                        (false, _) => panel_block::<S, 4, 1>(x, block, out, width, c, i),
                    }
                };
            }
        }
        t0 += rows;
    }
    for col in vector_cols..width {
        for (i, xi) in x.iter().enumerate() {
            let Some(slot) = out.get_mut(i * width + col) else {
                continue;
            };
            for (t, &g) in xi.iter().enumerate().take(r.count) {
                *slot += r.row(t).get(col).copied().unwrap_or(S::T::from_f64(0.0)) * g;
            }
        }
    }
}

/// How a task's vector columns (`vector_cols`, a multiple of the vector width) split into
/// panels: of `full` columns ([`NV`] vectors), then single vectors for the rest.
#[derive(Clone, Copy)]
struct Panels {
    full: usize,
    vector_cols: usize,
}

impl Panels {
    /// Each panel's first column and width, left to right.
    fn iter(self) -> impl Iterator<Item = (usize, usize)> {
        let whole = self.vector_cols - self.vector_cols % self.full;
        let vector = self.full / NV;
        (0..whole)
            .step_by(self.full)
            .map(move |c| (c, self.full))
            .chain(
                (whole..self.vector_cols)
                    .step_by(vector)
                    .map(move |c| (c, vector)),
            )
    }
}

/// Rows `t0 .. t0 + rows` of `R` as [`panel_block`] reads them: packed (the panel at
/// column `c` of width `w` holds its rows contiguously at `data[c · rows + t · w ..][..w]`),
/// or `R` itself (row `t` of every panel at `data[(t0 + t) · stride + c ..]`).
#[derive(Clone, Copy)]
struct Block<'a, T> {
    data: &'a [T],
    t0: usize,
    rows: usize,
    /// `R`'s row stride when the block is `R` itself, `None` when packed.
    direct_stride: Option<usize>,
}

impl<'a, T> Block<'a, T> {
    /// A block [`pack`] has copied into `packed`.
    fn packed(packed: &'a [T], t0: usize, rows: usize) -> Self {
        Self {
            data: packed,
            t0,
            rows,
            direct_stride: None,
        }
    }

    /// Rows `t0 .. t0 + rows` of `r`, read in place.
    fn direct(r: WeightRows<'a, T>, t0: usize, rows: usize) -> Self {
        Self {
            data: r.data,
            t0,
            rows,
            direct_stride: Some(r.stride),
        }
    }

    /// Where the panel at column `c` of width `w` starts, and its row stride.
    fn panel(&self, c: usize, w: usize) -> (*const T, usize) {
        match self.direct_stride {
            None => (self.data.as_ptr().wrapping_add(c * self.rows), w),
            Some(stride) => (
                self.data.as_ptr().wrapping_add(self.t0 * stride + c),
                stride,
            ),
        }
    }
}

/// Copies rows `t0 .. t0 + rows` of `r` into `packed` in [`Block`]'s layout, reading each
/// row of `R` once, in order.
fn pack<T: Copy>(r: WeightRows<'_, T>, t0: usize, rows: usize, panels: Panels, packed: &mut [T]) {
    for t in 0..rows {
        let row = r.row(t0 + t);
        for (c, w) in panels.iter() {
            let (Some(dst), Some(src)) = (
                packed.get_mut(c * rows + t * w..c * rows + (t + 1) * w),
                row.get(c..c + w),
            ) else {
                continue;
            };
            dst.copy_from_slice(src);
        }
    }
}

/// Adds the block's rows of `R` in the panel at column `c0` (`NVB` vectors wide) times the
/// matching elements of the first `MR` rows of `x` into those rows' sums (rows `i0 ..` of
/// `out`, `width` columns each): `MR × NVB` sums in registers over the block's rows, added
/// to in order of the row. Returns `MR`.
///
/// # Safety
/// The CPU has `S`'s instruction set; `out` holds `(i0 + MR) × width` elements with
/// `c0 + NVB · WIDTH ≤ width`, the block holds the panel, and every row of `x` holds
/// at least `block.t0 + block.rows` elements.
#[inline(always)]
unsafe fn panel_block<S: Lanes, const MR: usize, const NVB: usize>(
    x: &[&[S::T]],
    block: Block<S::T>,
    out: &mut [S::T],
    width: usize,
    c0: usize,
    i0: usize,
) -> usize {
    let w = NVB * S::WIDTH;
    let base = out.as_mut_ptr();
    let start = |i: usize| (i0 + i) * width + c0;
    let (panel, row_stride) = block.panel(c0, w);
    let xs: [*const S::T; MR] =
        std::array::from_fn(|i| x.get(i0 + i).map_or(std::ptr::null(), |row| row.as_ptr()));
    // SAFETY (every `S` call and pointer): the caller's contract; the sums are the block's
    // `MR` rows of `out` at columns `c0 .. c0 + w`, the panel's row `t` is `w` elements at
    // `panel + t · row_stride` ([`Block::panel`]), and `x_i[t0 + t]` is inside row `i`.
    // (No closures around the `S` calls: a closure does not inherit the caller's target
    // features, and the calls would not be inlined.)
    unsafe {
        let mut acc = [[S::zero(); NVB]; MR];
        for (i, row) in acc.iter_mut().enumerate() {
            for (v, a) in row.iter_mut().enumerate() {
                *a = S::load(base.add(start(i) + v * S::WIDTH));
            }
        }
        for t in 0..block.rows {
            let mut g = [S::zero(); MR];
            for (gi, &xi) in g.iter_mut().zip(&xs) {
                *gi = S::splat(*xi.add(block.t0 + t));
            }
            let rt = panel.add(t * row_stride);
            for v in 0..NVB {
                let rv = S::load(rt.add(v * S::WIDTH));
                for (row, &gi) in acc.iter_mut().zip(&g) {
                    if let Some(a) = row.get_mut(v) {
                        *a = S::fma(*a, rv, gi);
                    }
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, &a) in row.iter().enumerate() {
                S::store(base.add(start(i) + v * S::WIDTH), a);
            }
        }
    }
    MR
}
