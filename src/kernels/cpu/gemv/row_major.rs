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
//! - Each task keeps the sums of a tile of its columns for every row of `x` in its part of
//!   the output (`m × tile` elements, at most half of one core's L1 data cache), and adds
//!   [`KB`] rows of `R` at a time into it: each vector of `R` is loaded once per block of
//!   up to `mr` rows of `x` (4 with AVX-512, 2 with AVX2, 1 for the portable code) and
//!   multiplied by those rows' broadcast elements.
//! - Every output element is its `k` products added in order of `k`, one at a time, to an
//!   accumulator that starts at zero: the same operations whatever the thread count or the
//!   tile. Columns past the last multiple of [`ALIGN`] run in scalar code (the same columns
//!   for any thread count, since the ranges are multiples of [`ALIGN`]).

use candle_core::WithDType;

use super::super::machine::{machine, Isa};
use super::super::MatRef;
use super::lanes::{Lanes, Scalar};
use super::{for_each_task, lhs_rows, Float, Split, WeightRows};

/// Rows of `R` added into the sums per pass over a tile.
const KB: usize = 4;

/// Task ranges and tiles are multiples of this many columns (a multiple of every vector
/// width in elements, so that the vector code and the scalar tail cover the same columns
/// for any split).
const ALIGN: usize = 16;

/// The rows of `x` per block of the instruction set (what fits in its vector registers
/// next to [`KB`] vectors of `R` and `mr · KB` broadcast elements).
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

/// Columns per tile for `m` rows of `size`-byte elements: the sums of a tile take at most
/// half of one core's L1 data cache (and at least [`ALIGN`] columns).
fn tile_columns(m: usize, size: usize, l1d: usize) -> usize {
    let fit = l1d / (2 * m.max(1) * size.max(1));
    (fit / ALIGN).max(1) * ALIGN
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
    let tile = tile_columns(m, std::mem::size_of::<F>(), machine().l1d);
    let mut out = vec![F::from_f64(0.0); n * m];
    for_each_task(&mut out, per_task * m, tasks, |t, block| {
        let first = t * per_task;
        let width = per_task.min(n - first);
        sums_on(split.isa, &x, rows.within(first, width), block, tile);
    });
    Ok((out, per_task))
}

/// [`sums`] with the instruction set's vector code (the portable code for one the CPU
/// lacks, which the caller has ruled out).
fn sums_on<F: Float>(isa: Isa, x: &[&[F]], r: WeightRows<F>, out: &mut [F], tile: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.available() => {
            // SAFETY: the CPU has AVX-512F (checked just above).
            unsafe { sums_avx512::<F::Avx512>(x, r, out, tile) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.available() => {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { sums_avx2::<F::Avx2>(x, r, out, tile) }
        }
        // SAFETY: the portable code needs no instruction set.
        _ => unsafe { sums::<Scalar<F>>(x, r, out, tile, block_rows(Isa::Scalar)) },
    }
}

/// [`sums`] compiled for AVX-512F.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sums_avx512<S: Lanes>(x: &[&[S::T]], r: WeightRows<S::T>, out: &mut [S::T], tile: usize) {
    // SAFETY: the caller's contract.
    unsafe { sums::<S>(x, r, out, tile, block_rows(Isa::Avx512)) }
}

/// [`sums`] compiled for AVX2 + FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sums_avx2<S: Lanes>(x: &[&[S::T]], r: WeightRows<S::T>, out: &mut [S::T], tile: usize) {
    // SAFETY: the caller's contract.
    unsafe { sums::<S>(x, r, out, tile, block_rows(Isa::Avx2)) }
}

/// `out[i · width + c] += Σ_t x_i[t] R[t][c]` over every row `t` of `r`, tile by tile,
/// [`KB`] rows of `R` per pass, blocks of up to `mr` rows of `x`.
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[inline(always)]
unsafe fn sums<S: Lanes>(
    x: &[&[S::T]],
    r: WeightRows<S::T>,
    out: &mut [S::T],
    tile: usize,
    mr: usize,
) {
    // `r` holds R's rows (`r.count` of them) restricted to this task's `width = r.k` columns.
    let (m, width) = (x.len(), r.k);
    if out.len() < m * width {
        return;
    }
    let mut c = 0;
    while c < width {
        let tw = tile.min(width - c);
        let mut t = 0;
        while t + KB <= r.count {
            let pieces: [&[S::T]; KB] = std::array::from_fn(|q| piece(r, t + q, c, tw));
            // SAFETY: the caller's contract.
            unsafe { add_rows::<S, KB>(x, pieces, t, out, width, c, mr) };
            t += KB;
        }
        while t < r.count {
            // SAFETY: the caller's contract.
            unsafe { add_rows::<S, 1>(x, [piece(r, t, c, tw)], t, out, width, c, mr) };
            t += 1;
        }
        c += tw;
    }
}

/// Row `t`'s `len` elements from column `c` of `r` (empty out of range).
#[inline(always)]
fn piece<F>(r: WeightRows<'_, F>, t: usize, c: usize, len: usize) -> &[F] {
    r.row(t).get(c..c + len).unwrap_or(&[])
}

/// Adds rows `t0 .. t0 + NK` of `R` (`pieces`, the tile's columns of each) times the
/// matching elements of every row of `x` into the tile at column `c0` of `out`'s rows,
/// `mr` rows of `x` at a time.
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[inline(always)]
unsafe fn add_rows<S: Lanes, const NK: usize>(
    x: &[&[S::T]],
    pieces: [&[S::T]; NK],
    t0: usize,
    out: &mut [S::T],
    width: usize,
    c0: usize,
    mr: usize,
) {
    let mut i = 0;
    while i < x.len() {
        let rest = x.get(i..).unwrap_or(&[]);
        // SAFETY (each arm): the caller's contract.
        i += unsafe {
            match rest.len().min(mr) {
                1 => row_block::<S, NK, 1>(rest, pieces, t0, out, width, c0, i),
                2 => row_block::<S, NK, 2>(rest, pieces, t0, out, width, c0, i),
                3 => row_block::<S, NK, 3>(rest, pieces, t0, out, width, c0, i),
                _ => row_block::<S, NK, 4>(rest, pieces, t0, out, width, c0, i),
            }
        };
    }
}

/// [`add_rows`] for the first `MR` rows of `x`, which are rows `i0 ..` of the output;
/// returns `MR`.
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[inline(always)]
unsafe fn row_block<S: Lanes, const NK: usize, const MR: usize>(
    x: &[&[S::T]],
    pieces: [&[S::T]; NK],
    t0: usize,
    out: &mut [S::T],
    width: usize,
    c0: usize,
    i0: usize,
) -> usize {
    let zero = S::T::from_f64(0.0);
    // x_i[t0 + q] for the block's rows (zero past a short row: never, k is every row's length).
    let g: [[S::T; NK]; MR] = std::array::from_fn(|i| {
        std::array::from_fn(|q| {
            x.get(i)
                .and_then(|row| row.get(t0 + q))
                .copied()
                .unwrap_or(zero)
        })
    });
    let len = pieces.iter().map(|p| p.len()).min().unwrap_or(0);
    // The block's rows of the tile, each `len` elements from column `c0`.
    let start = |i: usize| (i0 + i) * width + c0;
    if (0..MR).any(|i| start(i) + len > out.len()) {
        return MR;
    }
    let base = out.as_mut_ptr();
    // SAFETY (every `S` call): the caller's contract; the loads read `WIDTH` elements at
    // `v < v + WIDTH ≤ len` of each piece, and the stores write the block's rows at
    // `start(i) + v + WIDTH ≤ start(i) + len ≤ out.len()` (checked above).
    // (No closures around the `S` calls: a closure does not inherit the caller's target
    // features, and the calls would not be inlined.)
    unsafe {
        let mut gv = [[S::zero(); NK]; MR];
        for (dst, src) in gv.iter_mut().zip(&g) {
            for (d, &e) in dst.iter_mut().zip(src) {
                *d = S::splat(e);
            }
        }
        let mut v = 0;
        while v + S::WIDTH <= len {
            let mut rv = [S::zero(); NK];
            for (r, p) in rv.iter_mut().zip(&pieces) {
                *r = S::load(p.as_ptr().add(v));
            }
            for (i, gi) in gv.iter().enumerate() {
                let p = base.add(start(i) + v);
                let mut acc = S::load(p);
                for (&rq, &gq) in rv.iter().zip(gi) {
                    acc = S::fma(acc, rq, gq);
                }
                S::store(p, acc);
            }
            v += S::WIDTH;
        }
        for col in v..len {
            for (i, gi) in g.iter().enumerate() {
                let slot = &mut *base.add(start(i) + col);
                for (p, &gq) in pieces.iter().zip(gi) {
                    *slot += p.get(col).copied().unwrap_or(zero) * gq;
                }
            }
        }
    }
    MR
}
