//! `f32` products on Intel AMX tiles, with `f32`-level accuracy, **opt-in**
//! (`LORAKIT_CPU_AMX=1`): each operand split into three bfloat16 planes ([`pack`]), six
//! plane products accumulated in `f32` by `TDPBF16PS` ([`tiles`]).
//!
//! One `TDPBF16PS` multiplies a 16 × 32 bfloat16 tile by a 32 × 16 one into 16 × 16 `f32`
//! accumulators: 8192 multiply-adds, against 16 for an AVX-512 `f32` FMA. On an Intel
//! Xeon (family 6 model 207, a 2-core KVM guest), one core ran 1.5–1.8 × 10¹² bfloat16
//! multiply-adds a second with the operands in registers, and 0.86–1.13 × 10¹² in this
//! module's loop (panels streaming from L1 and L2, the destination's tiles loaded and
//! stored around each call): with six per `f32` multiply-add, 1.7–2.3 × the core's
//! AVX-512 `f32` FMA peak.
//!
//! **Why opt-in.** On that machine, `x Wᵀ` at 512 × 1024 × 1024 (the fused op's forward)
//! took 1.1–1.5 × less time on two threads (1.3–1.5 × on one) on the tiles than through
//! the `gemm` crate, packing included, in some periods, and 1.4–2 × *more* in others,
//! switching every few seconds (`benches/RESULTS.md`, "AMX tiles"): the tiles' rate, on
//! one thread as on two, fell to about a third while the FMAs' held. A core's AMX unit is
//! shared by its two hardware threads, and a cloud guest's sibling thread may belong to
//! another tenant: the likely cause, though the guest cannot see it. So the route is off
//! unless asked for; on a machine whose cores are its own, it is worth measuring
//! (`benches/peft_compare.py --lorakit-features default amx`).
//!
//! **Accuracy.** Each element is `Σ_k` of the six plane products, each exact in `f32`,
//! accumulated in `f32` per depth block of 32 in a fixed order: the result differs from
//! an `f32` FMA loop's by rounding (like any other summation order), not by bfloat16's
//! precision. The unit tests hold it to the `f64` product at most twice the `gemm` crate's
//! `f32` error (it came out at 0.4–0.8 × that error). Differences from IEEE `f32`
//! arithmetic, all far outside a network's values:
//! - the tiles treat subnormal bfloat16 inputs as zero and flush subnormal results, so
//!   operands below about `10⁻³¹` in size lose their low planes (and below `10⁻³⁸`
//!   everything);
//! - an infinity or NaN is all in its high plane; NaN stays NaN, but an infinite input
//!   meets the other operand's three planes, whose signs can differ, so it can give a NaN
//!   where `f32` arithmetic gives an infinity. (Finite values up to `f32::MAX` split
//!   exactly: the high plane is truncated where rounding would overflow.)
//!
//! **Which products.** With the route asked for, on a CPU with AVX-512 and AMX that the
//! OS lets this process use ([`tiles::available`]): `f32` products with `beta = 1` whose
//! three dimensions are each at least [`MIN_SIDE`]. Thinner products (a LoRA factor's
//! rank as a side) stay on the `gemm` crate's AVX-512 kernels, where padding a side of 16
//! up to a tile's 32 would waste half the work.
//!
//! **Threads and determinism.** Per depth step, the row panels are packed in parallel,
//! then the destination's columns go in tasks over rayon's threads. Every 32 × 32 block of
//! the destination is the same sequence of tile operations whichever task computes it,
//! so the result does not depend on the thread count or on which thread ran what.

use std::cell::RefCell;

use candle_core::WithDType;
use rayon::prelude::*;

use super::machine::{machine, Isa};
use super::pool::cache_aligned;
use super::{check_product, same_type, Accum, MatProduct, MatRef};

mod pack;
mod tiles;

use pack::{depth_blocks, Packer, BLOCK, DEPTH_BLOCK_ELEMS};

/// The shortest side a product needs for this route: four 32-blocks, so that padding to
/// whole blocks adds at most a fifth to the work, and each packed element is used by at
/// least 128 multiply-adds.
const MIN_SIDE: usize = 128;

/// Depth (inner dimension) packed at a time: a panel of this depth is `3 · 256 · 32`
/// bfloat16 (48 KiB), so that a row panel and a column panel together are about a
/// core's L1d, and each 32 × 32 block of the destination is read and written once per
/// 256 of depth.
const DEPTH_STEP: usize = 256;

/// Whether large `f32` products run on the tiles in this process: asked for
/// (`LORAKIT_CPU_AMX=1`, read once), AVX-512 (for the packing) not lowered by
/// `LORAKIT_CPU_ISA`, and AMX available ([`tiles::available`]).
pub(super) fn in_use() -> bool {
    static ASKED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let asked = *ASKED.get_or_init(|| std::env::var("LORAKIT_CPU_AMX").as_deref() == Ok("1"));
    asked && machine().isa == Isa::Avx512 && tiles::available()
}

/// Whether an `m × k` by `k × n` product of `T` with this `beta` takes the route.
fn takes<T: WithDType>(m: usize, k: usize, n: usize, beta: T) -> bool {
    same_type::is::<T, f32>() && beta.to_f64() == 1.0 && m.min(k).min(n) >= MIN_SIDE && in_use()
}

/// Whether [`reroute`] takes `product` ([`takes`]).
pub(super) fn takes_product<T: WithDType>(product: &MatProduct<T>) -> bool {
    let (m, k, n) = (product.lhs.rows, product.lhs.cols, product.rhs.cols);
    takes(m, k, n, product.beta)
}

/// Runs [`super::gemm_into`]'s product on AMX tiles and returns `Some`, or `None` when it
/// does not take this route (module docs). The caller has checked the shapes and that
/// `dst` holds the `m × n` result at row stride `dst_rs ≥ n`.
pub(super) fn reroute<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
) -> Option<candle_core::Result<()>> {
    if !takes_product(&product) {
        return None;
    }
    let (lhs, rhs, accum, _) = product.parts();
    let (dst, lhs, rhs) = same_type::same_product::<T, f32>(dst, lhs, rhs)?;
    Some(multiply(dst, dst_rs, lhs, rhs, accum))
}

/// The destination, handed to the tasks, each of which writes only its own columns.
#[derive(Clone, Copy)]
struct DstPtr(*mut f32);

impl DstPtr {
    /// The pointer `offset` elements on (no access).
    fn offset(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

// SAFETY: the tasks write disjoint column ranges of the destination (`multiply`).
unsafe impl Send for DstPtr {}
// SAFETY: as above.
unsafe impl Sync for DstPtr {}

/// One product on the tiles: `out (m × n, row stride out_rs) (+)= lhs · rhs`.
#[derive(Clone, Copy)]
struct Product<'a> {
    lhs: MatRef<'a, f32>,
    rhs: MatRef<'a, f32>,
    out: DstPtr,
    out_rs: usize,
}

/// One depth step of a product: depth `k0 .. k0 + depth`, whether it starts the sums
/// (`Accum::Replace`'s first step).
#[derive(Clone, Copy)]
struct Step {
    k0: usize,
    depth: usize,
    first: bool,
}

impl Step {
    /// Depth blocks of 32 in the step.
    fn blocks(self) -> usize {
        depth_blocks(self.depth)
    }

    /// Elements of one packed panel of the step.
    fn panel_len(self) -> usize {
        self.blocks() * DEPTH_BLOCK_ELEMS
    }
}

/// Column panels per task: as many as fill half of a core's L2 (the other half for the
/// row panels streaming past), but few enough that each thread gets at least two tasks
/// where the width allows, so that rayon can hand a slowed thread's work to another.
fn panels_per_task(panel_len: usize, column_panels: usize, threads: usize) -> usize {
    let panel_bytes = panel_len * std::mem::size_of::<u16>();
    let fit = machine().l2 / 2 / panel_bytes.max(1);
    fit.min(column_panels.div_ceil(2 * threads.max(1))).max(1)
}

/// A task's packed column panels and the packing staging, kept per thread so that a
/// step's products do not allocate.
#[derive(Default)]
struct TaskBuffers {
    columns: Vec<u16>,
    packer: Packer,
}

thread_local! {
    /// The row panels of a product's depth step, on the thread that runs the product,
    /// shared read-only by its tasks.
    static ROW_PANELS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// Each thread's [`TaskBuffers`].
    static TASK: RefCell<TaskBuffers> = RefCell::new(TaskBuffers::default());
}

/// `dst = lhs · rhs` or `dst += lhs · rhs` on the tiles (an error where the CPU or OS
/// offers no AMX or AVX-512). Per depth step: every row panel packed (in parallel), then
/// the destination's columns in tasks of [`panels_per_task`] column panels on rayon's
/// threads, each task packing its column panels and multiplying every row panel by them.
/// `dst` holds the `m × n` result at row stride `dst_rs ≥ n` (an error otherwise).
fn multiply(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: MatRef<f32>,
    rhs: MatRef<f32>,
    accum: Accum,
) -> candle_core::Result<()> {
    if !(tiles::available() && Isa::Avx512.available()) {
        candle_core::bail!("fused linear: this CPU or OS offers no AMX tiles or no AVX-512");
    }
    if !check_product(dst, dst_rs, lhs, rhs, accum)? {
        return Ok(());
    }
    let product = Product {
        lhs,
        rhs,
        out: DstPtr(dst.as_mut_ptr()),
        out_rs: dst_rs,
    };
    // A thread that waits on its tasks may run another product stolen by rayon: that one
    // packs its row panels into a buffer of its own.
    let mut spare = Vec::new();
    ROW_PANELS.with(|cell| {
        let mut kept = cell.try_borrow_mut();
        let buffer = match kept.as_deref_mut() {
            Ok(kept) => kept,
            Err(_) => &mut spare,
        };
        // SAFETY: AMX and AVX-512F are available (checked above); `dst` holds the
        // `m × n` product at row stride `dst_rs` (`check_product`) and is borrowed
        // uniquely for the call.
        let done = unsafe { multiply_steps(buffer, product, accum) };
        if buffer.len() > KEPT_ROW_PANELS {
            *buffer = Vec::new();
        }
        done
    })
}

/// The most bfloat16 elements of row panels a thread keeps between products (16 MiB:
/// the rows of 10 922 rows at a depth step of 256); larger buffers are freed after their
/// product.
const KEPT_ROW_PANELS: usize = 8 << 20;

/// [`multiply`]'s depth steps, its row panels packed into `buffer`.
///
/// # Safety
/// AMX and AVX-512F available; `product.out` addresses the `m × n` product at row stride
/// `out_rs`, writable and accessed by nothing else during the call.
unsafe fn multiply_steps(
    buffer: &mut Vec<u16>,
    product: Product,
    accum: Accum,
) -> candle_core::Result<()> {
    let (lhs, k) = (product.lhs, product.lhs.cols());
    let (row_panels, column_panels) = (
        lhs.rows().div_ceil(BLOCK),
        product.rhs.cols().div_ceil(BLOCK),
    );
    let most = depth_blocks(DEPTH_STEP.min(k)) * DEPTH_BLOCK_ELEMS;
    let per_task = panels_per_task(most, column_panels, rayon::current_num_threads());
    let no_room = || candle_core::Error::Msg("fused linear: no room for the tiles' panels".into());
    let rows = cache_aligned(buffer, row_panels * most).ok_or_else(no_room)?;
    for k0 in (0..k).step_by(DEPTH_STEP) {
        let step = Step {
            k0,
            depth: DEPTH_STEP.min(k - k0),
            first: k0 == 0 && accum == Accum::Replace,
        };
        let len = step.panel_len();
        let rows = rows.get_mut(..row_panels * len).ok_or_else(no_room)?;
        rows.par_chunks_exact_mut(len)
            .enumerate()
            .for_each(|(i, panel)| {
                // SAFETY: AVX-512F is available (the caller's contract).
                TASK.with_borrow_mut(|t| unsafe {
                    t.packer.row_panel(lhs, i * BLOCK, k0, step.depth, panel)
                });
            });
        let rows: &[u16] = rows;
        (0..column_panels.div_ceil(per_task))
            .into_par_iter()
            .try_for_each(|task| {
                let first = task * per_task;
                let panels = first..(first + per_task).min(column_panels);
                // SAFETY: the caller's contract; this task alone writes the columns of
                // `panels`.
                TASK.with_borrow_mut(|t| unsafe {
                    tiles::with_tiles(|| multiply_columns(t, product, step, rows, panels))
                })
            })?;
    }
    Ok(())
}

/// A zeroed 32 × 32 block, the starting value of [`Accum::Replace`]'s first depth step
/// (64-byte aligned, as the tile loads prefer).
#[repr(C, align(64))]
struct ZeroBlock([f32; BLOCK * BLOCK]);

static ZEROS: ZeroBlock = ZeroBlock([0.0; BLOCK * BLOCK]);

/// One task of a depth step: column panels `panels` packed, then every row panel of
/// `rows` multiplied by each of them, 32 × 32 of the destination at a time.
///
/// # Safety
/// Tiles configured on this thread, AVX-512F available; `product.out` addresses the
/// `m × n` product at row stride `out_rs`, whose columns of `panels` nothing else
/// accesses during the call.
unsafe fn multiply_columns(
    buffers: &mut TaskBuffers,
    product: Product,
    step: Step,
    rows: &[u16],
    panels: std::ops::Range<usize>,
) -> candle_core::Result<()> {
    let (m, n) = (product.lhs.rows(), product.rhs.cols());
    let (blocks, len) = (step.blocks(), step.panel_len());
    let Some(columns) = cache_aligned(&mut buffers.columns, panels.len() * len) else {
        candle_core::bail!("fused linear: no room for the tiles' column panels");
    };
    for (p, panel) in panels.clone().zip(columns.chunks_exact_mut(len)) {
        // SAFETY: AVX-512F is available (the caller's contract).
        unsafe {
            buffers
                .packer
                .column_panel(product.rhs, p * BLOCK, step.k0, step.depth, panel)
        };
    }
    for (i, row) in rows.chunks_exact(len).enumerate() {
        for (p, panel) in panels.clone().zip(columns.chunks_exact(len)) {
            let (i, j) = (i * BLOCK, p * BLOCK);
            let (rows, cols) = (BLOCK.min(m - i), BLOCK.min(n - j));
            let at = product.out.offset(i * product.out_rs + j);
            // SAFETY: panels hold `blocks ≥ 1` depth blocks; a whole block of the
            // destination is read and written in place, an edge block through a copy.
            unsafe {
                if rows == BLOCK && cols == BLOCK {
                    let (c, c_rs) = match step.first {
                        true => (ZEROS.0.as_ptr(), BLOCK),
                        false => (at.cast_const(), product.out_rs),
                    };
                    tiles::block_32x32(
                        row.as_ptr(),
                        panel.as_ptr(),
                        blocks,
                        c,
                        c_rs,
                        at,
                        product.out_rs,
                    );
                } else {
                    edge_block(
                        row,
                        panel,
                        blocks,
                        at,
                        product.out_rs,
                        (rows, cols),
                        step.first,
                    );
                }
            }
        }
    }
    Ok(())
}

/// A block of `rows × cols` (less than 32 × 32) at `at`, through a 32 × 32 copy.
///
/// # Safety
/// As [`tiles::block_32x32`] for the panels; `at` addresses `rows` rows of `cols`
/// elements at row stride `out_rs`, writable and unaliased.
unsafe fn edge_block(
    row: &[u16],
    panel: &[u16],
    blocks: usize,
    at: *mut f32,
    out_rs: usize,
    (rows, cols): (usize, usize),
    first: bool,
) {
    let mut edge = ZeroBlock([0.0; BLOCK * BLOCK]);
    let edge = &mut edge.0;
    if !first {
        for (r, line) in edge.chunks_exact_mut(BLOCK).take(rows).enumerate() {
            // SAFETY: the caller's contract for `at`.
            let src = unsafe { std::slice::from_raw_parts(at.add(r * out_rs), cols) };
            line.iter_mut().zip(src).for_each(|(e, &s)| *e = s);
        }
    }
    let e = edge.as_mut_ptr();
    // SAFETY: `edge` holds 32 × 32 elements at row stride 32; the panels per the caller.
    unsafe { tiles::block_32x32(row.as_ptr(), panel.as_ptr(), blocks, e, BLOCK, e, BLOCK) };
    for (r, line) in edge.chunks_exact(BLOCK).take(rows).enumerate() {
        // SAFETY: the caller's contract for `at`.
        let dst = unsafe { std::slice::from_raw_parts_mut(at.add(r * out_rs), cols) };
        dst.iter_mut().zip(line).for_each(|(d, &e)| *d = e);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{gemm_with, on_threads};
    use super::*;

    /// Whether this machine can run the tiles' tests (they are skipped, saying so, where the
    /// CPU or OS offers no AMX or AVX-512).
    fn tiles_here() -> bool {
        let here = tiles::available() && Isa::Avx512.available();
        if !here {
            println!("skipped: this CPU or OS offers no AMX tiles or no AVX-512");
        }
        here
    }

    /// Deterministic values in [-1, 1) with all 24 bits of the significand in use.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// `start` multiplied into by the tiles (on a pool of `threads`) and by the `gemm`
    /// crate on one thread: `(tiles, gemm)`.
    fn tiles_and_gemm(
        start: &[f32],
        rs: usize,
        product: (MatRef<f32>, MatRef<f32>, Accum),
        threads: usize,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let (lhs, rhs, accum) = product;
        let (mut tiles_out, mut gemm_out) = (start.to_vec(), start.to_vec());
        on_threads(threads, || multiply(&mut tiles_out, rs, lhs, rhs, accum))??;
        gemm_with(&mut gemm_out, rs, lhs, rhs, accum, gemm::Parallelism::None)?;
        Ok((tiles_out, gemm_out))
    }

    #[test]
    fn planes_sum_back_to_the_value() {
        for x in values(10_000, 3)
            .into_iter()
            .chain([0.0, -0.0, 1e-30, 3.0e38, -7.5])
        {
            let [h, m, l] = pack::split(x);
            let sum: f64 = [h, m, l]
                .iter()
                .map(|&b| f64::from(f32::from_bits(u32::from(b) << 16)))
                .sum();
            assert_eq!(sum, f64::from(x), "{x:e} split into {h:#x} {m:#x} {l:#x}");
        }
        // Non-finite values: all in the high plane, NaN (any payload) still NaN.
        for x in [
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7fff_ffff),
            f32::from_bits(0xff80_0001),
        ] {
            let [h, m, l] = pack::split(x);
            let high = f32::from_bits(u32::from(h) << 16);
            assert!(
                (m, l) == (0, 0) && (high == x || (high.is_nan() && x.is_nan())),
                "{x:e}: {h:#x} {m:#x} {l:#x}"
            );
        }
    }

    /// Elements at bfloat16's overflow threshold and past it, and non-finite ones: a huge
    /// finite element against zeros leaves its row finite and as `f32` arithmetic gives it;
    /// NaN and infinities make their row non-finite, as they do there.
    #[test]
    fn huge_and_non_finite_inputs() -> candle_core::Result<()> {
        if !tiles_here() {
            return Ok(());
        }
        let (m, k, n) = (128, 160, 130);
        let rhs_data = {
            let mut b = values(k * n, 2);
            b.iter_mut().take(n).for_each(|v| *v = 0.0); // row 0 of rhs: zeros
            b
        };
        let rhs = MatRef::contiguous(&rhs_data, k, n)?;
        for (x, finite) in [
            (f32::MAX, true),
            (-3.4e38, true),
            (f32::NAN, false),
            (f32::INFINITY, false),
        ] {
            let mut lhs_data = values(m * k, 1);
            lhs_data[k] = x; // row 1, column 0: meets only rhs's zero row ...
            lhs_data[2 * k + 1] = x; // ... row 2, column 1: meets rhs's row 1
            let lhs = MatRef::contiguous(&lhs_data, m, k)?;
            let (tiles_out, gemm_out) =
                tiles_and_gemm(&vec![0f32; m * n], n, (lhs, rhs, Accum::Replace), 1)?;
            let row = |out: &[f32], i: usize| out[i * n..(i + 1) * n].to_vec();
            if finite {
                for (t, g) in row(&tiles_out, 1).iter().zip(row(&gemm_out, 1)) {
                    assert!(
                        t.is_finite() && (t - g).abs() <= 1e-4,
                        "{x:e}: {t} against {g}"
                    );
                }
            } else {
                assert!(
                    row(&gemm_out, 1).iter().all(|v| v.is_nan()),
                    "{x:e}: gemm's row 1"
                );
                assert!(
                    row(&tiles_out, 1).iter().all(|v| v.is_nan()),
                    "{x:e}: row 1"
                );
            }
            let (t2, g2) = (row(&tiles_out, 2), row(&gemm_out, 2));
            for (t, g) in t2.iter().zip(&g2) {
                assert_eq!(
                    t.is_finite(),
                    g.is_finite(),
                    "{x:e}: row 2, {t} against {g}"
                );
            }
            for i in 3..m {
                assert!(
                    row(&tiles_out, i).iter().all(|v| v.is_finite()),
                    "{x:e}: row {i}"
                );
            }
        }
        Ok(())
    }

    /// A product's operands: `lhs` `m × k` row-major or its transposed storage, `rhs`
    /// `k × n` row-major or column-major (a weight's `Wᵀ`).
    struct Case {
        m: usize,
        k: usize,
        n: usize,
        lhs_transposed: bool,
        rhs_column_major: bool,
        lhs: Vec<f32>,
        rhs: Vec<f32>,
    }

    impl Case {
        fn new(m: usize, k: usize, n: usize, lhs_transposed: bool, rhs_column_major: bool) -> Self {
            let (lhs, rhs) = (values(m * k, 1 + m as u64), values(k * n, 7 + n as u64));
            Self {
                m,
                k,
                n,
                lhs_transposed,
                rhs_column_major,
                lhs,
                rhs,
            }
        }

        fn views(&self) -> candle_core::Result<(MatRef<'_, f32>, MatRef<'_, f32>)> {
            let (m, k, n) = (self.m, self.k, self.n);
            let lhs = match self.lhs_transposed {
                true => MatRef::contiguous(&self.lhs, k, m)?.t(),
                false => MatRef::contiguous(&self.lhs, m, k)?,
            };
            let rhs = match self.rhs_column_major {
                true => MatRef::contiguous(&self.rhs, n, k)?.t(),
                false => MatRef::contiguous(&self.rhs, k, n)?,
            };
            Ok((lhs, rhs))
        }
    }

    /// The largest error against the `f64` product (plus `start` for [`Accum::Add`]).
    fn max_error(
        dst: &[f32],
        start: &[f32],
        rs: usize,
        lhs: MatRef<f32>,
        rhs: MatRef<f32>,
        accum: Accum,
    ) -> f64 {
        let mut worst = 0f64;
        for i in 0..lhs.rows() {
            for j in 0..rhs.cols() {
                let dot: f64 = (0..lhs.cols())
                    .map(|t| f64::from(lhs.at(i, t)) * f64::from(rhs.at(t, j)))
                    .sum();
                let want = dot
                    + if accum == Accum::Add {
                        f64::from(start[i * rs + j])
                    } else {
                        0.0
                    };
                worst = worst.max((f64::from(dst[i * rs + j]) - want).abs());
            }
        }
        worst
    }

    /// Against the `f64` product, the tiles are as accurate as the `gemm` crate's `f32`
    /// kernels (within a factor of 2 of their largest error) on every edge case of the
    /// packing: sides off the 32-blocks, a depth past one depth step, transposed
    /// operands, both accumulations, a destination wider than the product.
    #[test]
    fn tiles_are_as_accurate_as_f32_kernels() -> candle_core::Result<()> {
        if !tiles_here() {
            return Ok(());
        }
        let shapes = [
            (128, 128, 128, false, false),
            (200, 300, 257, false, true),
            (130, 600, 129, true, false),
            (161, 130, 520, true, true),
        ];
        for (m, k, n, lt, rc) in shapes {
            let case = Case::new(m, k, n, lt, rc);
            let (lhs, rhs) = case.views()?;
            for accum in [Accum::Replace, Accum::Add] {
                let rs = n + 3;
                let start = values(m * rs, 11);
                let (tiles_out, gemm_out) = tiles_and_gemm(&start, rs, (lhs, rhs, accum), 2)?;
                let (t, g) = (
                    max_error(&tiles_out, &start, rs, lhs, rhs, accum),
                    max_error(&gemm_out, &start, rs, lhs, rhs, accum),
                );
                println!("{m}x{k}x{n} {accum:?}: tiles {t:.2e}, gemm {g:.2e}");
                assert!(
                    t <= 2.0 * g,
                    "{m}x{k}x{n} {accum:?}: tiles {t:e} against gemm {g:e}"
                );
                // The padding columns past the product stay untouched.
                for i in 0..m {
                    assert_eq!(
                        tiles_out[i * rs + n..i * rs + rs],
                        start[i * rs + n..i * rs + rs]
                    );
                }
            }
        }
        Ok(())
    }

    /// Operands whose elements are adjacent in neither direction (packed through copies),
    /// a row-major right operand of odd depth, and products run inside an outer parallel
    /// loop on the same pool (rayon's work stealing then starts a product on a thread
    /// whose own product is waiting): as the `gemm` crate gives them, and the nested ones
    /// bit for bit as one thread gives them.
    #[test]
    fn strided_operands_and_nested_products() -> candle_core::Result<()> {
        if !tiles_here() {
            return Ok(());
        }
        for (m, k, n) in [(130, 129, 131), (200, 513, 129)] {
            let (a, b) = (values(m * k * 4, 5), values(k * n * 4, 9));
            let lhs = MatRef::new(&a, m, k, 2 * k, 2)?;
            for rhs in [
                MatRef::new(&b, k, n, 3, 3 * k)?,
                MatRef::contiguous(&b, k, n)?,
            ] {
                let rs = n + 5;
                let start = values(m * rs, 11);
                let (tiles_out, gemm_out) = tiles_and_gemm(&start, rs, (lhs, rhs, Accum::Add), 3)?;
                let worst = tiles_out
                    .iter()
                    .zip(&gemm_out)
                    .map(|(t, g)| (t - g).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-4, "{m}x{k}x{n}: {worst:e} from gemm's");
            }
        }
        let (m, k, n) = (160, 300, 200);
        let case = Case::new(m, k, n, false, true);
        let (lhs, rhs) = case.views()?;
        let mut want = vec![0f32; m * n];
        on_threads(1, || multiply(&mut want, n, lhs, rhs, Accum::Replace))??;
        let nested = on_threads(2, || {
            (0..16)
                .into_par_iter()
                .map(|_| {
                    let mut out = vec![0f32; m * n];
                    multiply(&mut out, n, lhs, rhs, Accum::Replace).map(|()| out)
                })
                .collect::<candle_core::Result<Vec<_>>>()
        })??;
        assert!(nested.iter().all(|out| *out == want));
        Ok(())
    }

    /// Every 32 × 32 block is the same tile sequence whichever task computes it: the same
    /// bits from pools of 1, 2, 3 and 5 threads.
    #[test]
    fn tiles_give_the_same_bits_on_any_thread_count() -> candle_core::Result<()> {
        if !tiles_here() {
            return Ok(());
        }
        for (m, k, n) in [(300, 260, 200), (130, 140, 700)] {
            let case = Case::new(m, k, n, false, true);
            let (lhs, rhs) = case.views()?;
            let run = |threads| -> candle_core::Result<Vec<f32>> {
                let mut out = vec![0f32; m * n];
                on_threads(threads, || multiply(&mut out, n, lhs, rhs, Accum::Replace))??;
                Ok(out)
            };
            let one = run(1)?;
            for threads in [2, 3, 5] {
                assert!(run(threads)? == one, "{m}x{k}x{n} on {threads} threads");
            }
        }
        Ok(())
    }
}
