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
//! - Each task reads `R` in place, [`DEPTH`] rows at a time: a few concurrent streams
//!   through `R` in its own order. For each panel of those rows ([`NV`] vectors' columns,
//!   [`panel_vectors`]) and each block of up to `mr` rows of `x` (8 with AVX-512, 2 with
//!   AVX2, 1 for the portable code), the `mr × NV` vector sums are loaded from the task's
//!   part of the output, take the block's rows of `R` (each vector of `R` loaded once per
//!   block of rows of `x`, multiplied by those rows' broadcast elements), and are stored
//!   back. The sums are loaded and stored once per [`DEPTH`] rows of `R`; with 16 rows of
//!   `x` a task's sums (`16 ×` its columns) outgrow the L1 cache, so that round trip is
//!   L2 traffic, and taking 32 rows of `R` at a time instead of 8 quarters it. With more
//!   than `mr` rows of `x` a panel's rows are loaded once per block of rows of `x`; 32
//!   rows of `R` a power of two apart exceed the L1 cache's associativity, so the second
//!   load comes from L2 (with 8 rows it came from L1): half the L2 traffic per row of `R`
//!   all the same.
//! - On an Intel Xeon (AVX-512, 2 threads, `R` `2048 × 2048`, the fused linear's forward +
//!   backward, scratch timer, the two alternating 3–5 times in one session) 8 rows of `R`
//!   at a time took 0.73–0.96 / 0.96–1.09 / 1.09–1.23 / 1.34–1.39 / 1.57–1.62 / 1.92–2.01
//!   / 2.73–2.82 ms at 1 / 2 / 4 / 6 / 8 / 12 / 16 rows, 32 rows at a time 0.77–0.81 /
//!   0.95–0.96 / 1.05–1.11 / 1.33–1.37 / 1.44–1.45 / 1.76–1.83 / 2.30–2.34 ms; with AVX2
//!   (forced) 1.63–1.67 → 1.49–1.64 ms at 6 rows and 2.05–2.08 → 1.80–2.03 at 8. The
//!   results are the same bits for any depth (the sums go through memory unchanged).
//!   In an earlier session 8 rows at a time took 0.78–0.90 / 0.94–0.99 / 1.16–1.36 /
//!   1.49–1.57 / 1.67–1.98 / 2.19–2.49 ms at 1 / 4 / 6 / 8 / 12 / 16 rows; the form before
//!   it copied blocks of `R` into contiguous panels and kept blocks of 4 rows' sums
//!   (0.84–0.86 / 1.06–1.10 / 1.67–1.69 / 1.83 / 2.23–2.54 / 2.59–2.72 ms), and the one
//!   before that kept `m ×` 768-column tiles of sums in memory and added 4 rows of `R` at
//!   a time (`benches/RESULTS.md`).
//! - Each vector of `R` is asked for [`PREFETCH_BYTES`] ahead of its load, further along
//!   its row (the panels to the right), as the column-major form asks for `W`'s rows.
//!   With `R` from memory (`cargo bench --bench decode_rows`'s `Conv1D` stack, 8 layers of
//!   `2048 × 2048` `f32`) on an AMD EPYC Zen 5, AVX-512, 2 threads, builds alternating 8
//!   and 4 times: 1 to 12 rows 1–25% faster (1 row 0.92–0.97 ×, 4 rows 0.94–0.99 ×,
//!   8 rows 0.75–0.93 ×); with `R` in the L3 cache no slowdown beyond the noise
//!   (`benches/RESULTS.md`).
//! - Every output element is its `k` products added in order of `k`, one at a time, to an
//!   accumulator that starts at zero: the same operations whatever the thread count, the
//!   block or the panel. Columns past the task's last whole vector run in scalar code: the
//!   same columns for any thread count, since the ranges are multiples of [`ALIGN`].

use candle_core::WithDType;

use super::super::machine::Isa;
use super::super::prefetch::prefetch;
use super::super::MatRef;
use super::lanes::{Lanes, Scalar};
use super::{for_each_task, lhs_rows, Float, Split, WeightRows, PREFETCH_BYTES};

/// Task ranges are multiples of this many columns (a multiple of every vector
/// width in elements, so that the vector code and the scalar tail cover the same columns
/// for any split).
const ALIGN: usize = 16;

/// The rows of `x` per block of the instruction set: what fits in its vector registers
/// next to the `mr ×` [`panel_vectors`] sums, a vector of `R` and `mr` broadcast elements
/// (32 registers with AVX-512: 8 × 3 sums; 16 with AVX2: 2 × 6).
fn block_rows(isa: Isa) -> usize {
    match isa {
        Isa::Scalar => 1,
        Isa::Avx2 => 2,
        Isa::Avx512 => 8,
    }
}

/// The most rows of `x` this form takes with an instruction set: 16 with AVX-512, 8 with
/// AVX2, none with the portable code. On an Intel Xeon (2 threads, `x R` with `R`
/// `2048 × 2048`) an earlier form of this kernel was 1.4–1.6× faster than the `gemm` crate
/// from 1 to 16 rows with AVX-512 and 1.0–1.2× from 1 to 8 with AVX2 (forced there with
/// `LORAKIT_CPU_ISA=avx2`), at par or slower past that; the portable code was slower than
/// the `gemm` crate at every row count.
pub(super) fn max_rows(isa: Isa) -> usize {
    match isa {
        Isa::Scalar => 0,
        Isa::Avx2 => 8,
        Isa::Avx512 => 16,
    }
}

/// Rows of `R` taken at a time: the concurrent streams through `R`, and how many rows the
/// sums stay in registers between a load and a store (see the module docs for why 32, not
/// the 8 of before).
const DEPTH: usize = 32;

/// The widest panel, in vectors.
const NV: usize = 6;

/// Vectors per panel for blocks of `mr` rows of `x`: [`NV`] up to 4 rows (up to 24 sums),
/// half that past them (24 sums for 8 rows).
fn panel_vectors(mr: usize) -> usize {
    if mr <= 4 {
        NV
    } else {
        NV / 2
    }
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
    let mut out = vec![F::from_f64(0.0); n * m];
    for_each_task(&mut out, per_task * m, tasks, |t, block| {
        let first = t * per_task;
        let width = per_task.min(n - first);
        sums_on(split.isa, &x, rows.within(first, width), block);
    });
    Ok((out, per_task))
}

/// [`sums`] with the instruction set's vector code (the portable code for one the CPU
/// lacks, which the caller has ruled out).
fn sums_on<F: Float>(isa: Isa, x: &[&[F]], r: WeightRows<F>, out: &mut [F]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.available() => {
            // SAFETY: the CPU has AVX-512F (checked just above).
            unsafe { sums_avx512::<F::Avx512>(x, r, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.available() => {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { sums_avx2::<F::Avx2>(x, r, out) }
        }
        // SAFETY: the portable code needs no instruction set.
        _ => unsafe { sums::<Scalar<F>>(x, r, out, block_rows(Isa::Scalar)) },
    }
}

/// [`sums`] compiled for AVX-512F.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sums_avx512<S: Lanes>(x: &[&[S::T]], r: WeightRows<S::T>, out: &mut [S::T]) {
    // SAFETY: the caller's contract.
    unsafe { sums::<S>(x, r, out, block_rows(Isa::Avx512)) }
}

/// [`sums`] compiled for AVX2 + FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sums_avx2<S: Lanes>(x: &[&[S::T]], r: WeightRows<S::T>, out: &mut [S::T]) {
    // SAFETY: the caller's contract.
    unsafe { sums::<S>(x, r, out, block_rows(Isa::Avx2)) }
}

/// `out[i · width + c] += Σ_t x_i[t] R[t][c]` over every row `t` of `r` (`width = r.k`
/// columns), [`DEPTH`] rows of `R` at a time, in panels of [`panel_vectors`] vectors'
/// columns and blocks of up to `mr` rows of `x` (the module docs). Columns past the last
/// whole vector are added in scalar code.
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[inline(always)]
unsafe fn sums<S: Lanes>(x: &[&[S::T]], r: WeightRows<S::T>, out: &mut [S::T], mr: usize) {
    let (m, width) = (x.len(), r.k);
    if out.len() < m * width || x.iter().any(|row| row.len() < r.count) {
        return;
    }
    let vector_cols = width - width % S::WIDTH;
    let nv = panel_vectors(m.min(mr));
    let panels = Panels {
        full: nv * S::WIDTH,
        vector: S::WIDTH,
        vector_cols,
    };
    let mut t0 = 0;
    while t0 < r.count {
        let block = Block {
            r,
            t0,
            rows: DEPTH.min(r.count - t0),
        };
        for (c, w) in panels.iter() {
            let mut i = 0;
            while i < m {
                let vectors = if w == panels.full { nv } else { 1 };
                // SAFETY (each arm): the caller's contract; `out` holds `m × width`, every row
                // of `x` at least `r.count` elements (both checked above).
                i += unsafe {
                    match (vectors, (m - i).min(mr)) {
                        (NV, 1) => panel_block::<S, 1, NV>(x, block, out, width, c, i),
                        (NV, 2) => panel_block::<S, 2, NV>(x, block, out, width, c, i),
                        (NV, 3) => panel_block::<S, 3, NV>(x, block, out, width, c, i),
                        (NV, _) => panel_block::<S, 4, NV>(x, block, out, width, c, i),
                        (1, 1) => panel_block::<S, 1, 1>(x, block, out, width, c, i),
                        (1, 2) => panel_block::<S, 2, 1>(x, block, out, width, c, i),
                        (1, 3) => panel_block::<S, 3, 1>(x, block, out, width, c, i),
                        (1, 4..=7) => panel_block::<S, 4, 1>(x, block, out, width, c, i),
                        (1, _) => panel_block::<S, 8, 1>(x, block, out, width, c, i),
                        (_, 1) => panel_block::<S, 1, { NV / 2 }>(x, block, out, width, c, i),
                        (_, 2) => panel_block::<S, 2, { NV / 2 }>(x, block, out, width, c, i),
                        (_, 3) => panel_block::<S, 3, { NV / 2 }>(x, block, out, width, c, i),
                        (_, 4..=7) => panel_block::<S, 4, { NV / 2 }>(x, block, out, width, c, i),
                        (_, _) => panel_block::<S, 8, { NV / 2 }>(x, block, out, width, c, i),
                    }
                };
            }
        }
        t0 += block.rows;
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
/// panels: of `full` columns, then single vectors (`vector` columns) for the rest.
#[derive(Clone, Copy)]
struct Panels {
    full: usize,
    vector: usize,
    vector_cols: usize,
}

impl Panels {
    /// Each panel's first column and width, left to right.
    fn iter(self) -> impl Iterator<Item = (usize, usize)> {
        let whole = self.vector_cols - self.vector_cols % self.full.max(1);
        let vector = self.vector.max(1);
        (0..whole)
            .step_by(self.full.max(1))
            .map(move |c| (c, self.full))
            .chain(
                (whole..self.vector_cols)
                    .step_by(vector)
                    .map(move |c| (c, vector)),
            )
    }
}

/// Rows `t0 .. t0 + rows` of `R`, read in place: row `t0 + t` at `r.data[(t0 + t) ·
/// r.stride ..]`.
#[derive(Clone, Copy)]
struct Block<'a, T> {
    r: WeightRows<'a, T>,
    t0: usize,
    rows: usize,
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
    let base = out.as_mut_ptr();
    let start = |i: usize| (i0 + i) * width + c0;
    let row_stride = block.r.stride;
    let panel = block
        .r
        .data
        .as_ptr()
        .wrapping_add(block.t0 * row_stride + c0);
    let xs: [*const S::T; MR] =
        std::array::from_fn(|i| x.get(i0 + i).map_or(std::ptr::null(), |row| row.as_ptr()));
    // SAFETY (every `S` call and pointer): the caller's contract; the sums are the block's
    // `MR` rows of `out` at columns `c0 .. c0 + w`, the panel's row `t` is `w` elements at
    // `panel + t · row_stride` (row `t0 + t` of `R` from column `c0`, inside `R`:
    // `WeightRows::of`), and `x_i[t0 + t]` is inside row `i`.
    // (No closures around the `S` calls: a closure does not inherit the caller's target
    // features, and the calls would not be inlined.)
    unsafe {
        let mut acc = [[S::zero(); NVB]; MR];
        let ahead = PREFETCH_BYTES / std::mem::size_of::<S::T>().max(1);
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
                prefetch(rt.wrapping_add(v * S::WIDTH + ahead));
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
