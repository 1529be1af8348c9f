//! Large `f32` products on AVX-512 or AVX2 through lorakit's own packing and register block
//! ([`kernel`]: one per vector width, each on panels laid out for it, with the same bits):
//! a linear layer's `x Wᵀ` at many rows (the forward), its `g W` (the backward's input
//! gradient), and any other `f32` product of those shapes; with a LoRA factor pair's term
//! added in the same passes over the destination ([`reroute`]'s `term`).
//!
//! **Why its own.** On an Intel Xeon (family 6 model 207, 2 cores, `benches/RESULTS.md`,
//! "Lorakit's own packed products"):
//! - `x Wᵀ` went through the chunked route ([`super::col_major`]), which transposes `W`
//!   128 columns at a time into a buffer that the `gemm` crate then packs again (about 6%
//!   of a LoRA training step between them). Here `W` is transposed once, into the packed
//!   panels: 0.86–1.01 × the chunked route's time from 64 to 2048 rows in paired timings
//!   (one 1.08, at 2048 rows on a busy host);
//! - `g W` with a row-major `W`: at 17–64 rows this route takes 0.50–0.81 × the `gemm`
//!   crate's time. From 128 rows the two are about even there: with the rows read in
//!   place (below) the route's `g W` with its term came to 0.95–1.06 × the `gemm` crate's
//!   and the term's pass at 512 and 2048 rows (paired, medians of eight runs, "Rows read
//!   in place"; mean 1.01). On an AMD EPYC Zen 4 (family 25 model 17, 2 cores, 1 MiB L2)
//!   the route is faster there: 0.89–0.98 × the `gemm` crate's time from 128 to 2048 rows
//!   and at `d` = 768–4096, and a LoRA, DoRA or VeRA layer step 0.94–1.01 × with `g W` on
//!   the `gemm` crate (`benches/RESULTS.md`, "`g W` on the packed route at every batch
//!   size"). So the route takes `g W` at every row count the routes before it leave, on every
//!   AVX-512 CPU: one rule, about even on the one CPU and faster on the other, rather than
//!   a crossover tuned to either; and on AVX2 too (the Zen 4 held to AVX2, before the
//!   strips below: 0.56–0.62 × the `gemm` crate's time at 64 rows, 0.94 / 1.04 at 128,
//!   0.97–1.02 from 512);
//! - the low-rank term `s (x Aᵀ) Bᵀ` (or, without dropout, `s (g B) A`)
//!   joins the base product's last depth step instead of being a second pass over the
//!   destination: 0.98 × the two products' time at `512 × 1024 × 1024` and `r = 16`, 0.996
//!   at 2048.
//!
//! **How.** Loops in the BLIS order, with the vectors along the destination's rows:
//! - each thread takes an even range of the destination's columns (whole
//!   [`COLS`]-column panels: [`super::col_major::even_ranges`]) and walks it a block of
//!   columns at a time, as many as half of one core's L2 holds at a depth of [`DEPTH`]
//!   ([`block_columns`]: 640 with a 2 MiB L2);
//! - per [`DEPTH`] of the inner dimension, it packs that block of the right-hand side into
//!   column panels (a copy per depth step for a row-major operand, 16 × 16 or 8 × 8
//!   register transposes for `Wᵀ`; [`pack::column_panels`]) and then, per [`ROWS`] rows of
//!   the left-hand side, runs the register block ([`kernel::multiply`]) against every
//!   column panel of the block, reading those rows' depth slice where they are
//!   ([`pack::rows_in_place`]): the first call brings the slice into L1, the rest of the
//!   block's calls find it there. Copying it into a packed row panel first, as the route
//!   did before, took 1.02–1.04 × the time for `x Wᵀ` and 1.01–1.03 × for `g W` at 64
//!   rows (paired, Intel Xeon model 207, `benches/RESULTS.md`, "Rows read in place");
//! - a second term (rank `r` ≤ 64) is packed after the base product's last depth slice in
//!   a row panel ([`pack::row_panel`]), its scale folded into its rows, and goes through
//!   the same register block calls.
//!
//! **New results.** A layer's output and input gradient are new vectors ([`owned`], for
//! `super::product_owned`): the first depth step writes each element without reading
//! it, the bias (for the output) added there instead of pre-filled, so the vector is never
//! filled first. Paired against filling it (the bias rows in parallel, or zeros by
//! `calloc`) and adding the product, on an Intel Xeon (model 207, 2 threads, three runs):
//! 0.95–0.99 of the time for the forward at `512 × 1024 × 1024` and `512 × 2048 × 2048`
//! with `r = 16`, and about 0.99 at 64 rows.
//!
//! **Bits.** Each destination element is the sum over depth blocks, in order, of each
//! block's FMA chain, in order: the same whichever thread computes it, so the result does
//! not depend on the thread count. It differs from the `gemm` crate's by rounding
//! (another summation order), and is checked against the `f64` product like every route.
//!
//! **On AMD EPYCs.** Timed on a Zen 4 (above, and `x Wᵀ` at 0.91–0.96 × the chunked
//! route's time from 128 to 2048 rows, "`g W` on the packed route at every batch size");
//! not on a Zen 5.
//!
//! **On AVX2** (the 6 × 16 block, [`kernel`], on panels in 16-column strips,
//! [`kernel::PanelLayout`]). Developed and timed on the Zen 4 with AVX-512 hidden from
//! lorakit (`LORAKIT_CPU_ISA=avx2`) and from the `gemm` crate (a patched copy of its
//! feature check; `benches/RESULTS.md`, "The packed route on AVX2"). On a CPU without
//! AVX-512, an AMD EPYC Zen 3 (family 25 model 1, 512 KiB L2, 2026-12-08), its products
//! alone ran at 85–89% of one thread's FMA peak in their fastest calls and 68–80% at their
//! medians on a busy host; wider column blocks, rows off their 4 KiB spacing and BLIS's
//! order within a block (a strip kept in L1 across rows) did not pay there
//! (`benches/RESULTS.md`, "The first CPU without AVX-512 since the Zen 2").
//! The strips took 0.89–0.97 × the time of the panels before them (64-wide steps, of which
//! the block read 16 columns; one case 1.09). With those earlier panels, paired, two runs:
//! `x Wᵀ` 0.85–0.92 × the chunked route's time at 64 rows, 0.93–0.94 at 128 and 0.97–1.01
//! from 512 to 2048 rows; `g W` 0.56–0.62 × the `gemm` crate's AVX2 time at 64 rows, 0.94 /
//! 1.04 at 128 and 0.97–1.02 from 512 to 2048; the block alone, one thread, at 98–99% of
//! the FMA peak with its panels in L1 or five of them (this CPU's half-L2 block) streamed
//! from L2, 83% at ten; and in a benchmark run against PEFT with PyTorch also held to AVX2,
//! the fused LoRA forward and fwd+bwd and the LoRA layer step at n = 512 took 0.96–1.01 ×
//! the time with the route off (the other layer steps 0.87–1.10, their rounds spread by up
//! to 20%). On that shared host a block of the AVX2 shape also lost more than one of the
//! AVX-512 shape in the same moments, even on operands in L1 (a scratch program: a median
//! 81–87% of the best rate of all kinds against 96–97%). The AVX2 loop then issued 29
//! instructions a step, about 4.8 instructions and 1.3 loads per cycle at full rate,
//! against 1.75 and 0.4 for the AVX-512 loop; we suspect it loses when another guest takes
//! part of the core ("Paired rounds, and why the AVX2 route's calls spread"; unrolling the
//! AVX2 loop four steps took 0.94–1.05 × the time, not kept then). At 14ea51b
//! (2026-12-07) it went to 24 (the rows' starts kept in registers: `kernel::accumulate`;
//! `llvm-mca`'s models that dispatch four a cycle, its Haswell, Broadwell, Zen 1 and Zen 2,
//! give it 0.83 × the old loop's cycles; on the Zen 4 the route's AVX2 products took about
//! 0.99 × the time, "Row starts the compiler cannot rebuild"); since c1a2b04 it issues 21
//! a step, four steps a pass (about 0.99 × the time again on the Zen 4, less in most of
//! the host's busy moments: "Four steps a pass").
//!
//! **Which products.** `f32`, AVX-512F or AVX2 available and not lowered below AVX2 by
//! `LORAKIT_CPU_ISA` (the block of the widest set: [`block_isa`]), a
//! left-hand side with contiguous rows, and at least [`MIN_ROWS`] rows, an inner dimension
//! and a width both longer than [`SHORT_SIDE`] (128), and at least the `gemm` crate's own
//! threading threshold of multiply-adds (smaller products stay on one thread in the
//! `gemm` crate). The right-hand side has contiguous columns where the column-major route
//! would take its chunked form (`x Wᵀ` at many rows: fewer rows keep that route's
//! transposed and row-by-row forms, faster there), or contiguous rows (`g W`, GPT-2's
//! `Conv1D` forward `x W`, the quantized base's `g · tile` in [`super::quant`]; at small
//! batches the `gemm` crate took 1.2–2 × this route's time). Products with a
//! short side go to [`super::thin`] or the `gemm` crate on every thread count, so that
//! their bits do not depend on it (the thin route declines on one thread).
//! `LORAKIT_PACKED_PRODUCTS=0` turns the route off (for comparisons). Products the routes
//! before it take (a few rows, narrow results, a BLAS backend, AMX tiles) never reach it.

use std::cell::RefCell;

use candle_core::WithDType;
use rayon::prelude::*;

use super::col_major::{even_ranges, takes_chunked, SharedDst};
use super::machine::machine;
use super::pool::cache_aligned;
use super::{same_type, Accum, AddedTerm, MatProduct, MatRef};

mod kernel;
mod pack;

pub(crate) use kernel::BlockIsa;
use kernel::{Start, Tile, COLS, DEPTH, ROWS, STRIDE};
use pack::{Extent, Piece};

/// The fewest rows the route takes: two. One row is a matrix-vector product, where the
/// route took 1.31–2.11 × the `gemm` crate's time (`g W`, 1 × 1024 × 1024 and
/// 1 × 2048 × 2048, AVX2). Few rows mostly go to the decode kernel before this route
/// (with AVX-512 its row-major form takes `g W` up to 16 rows, with AVX2 up to 8); past
/// those, `g W` on AVX2 at 9 to 16 rows took 0.42–0.96 × the `gemm` crate's time on this
/// route, and 2 to 8 rows 0.63–1.02 × where the decode kernel leaves them (an AMD EPYC
/// Zen 4 held to AVX2, 60 ABBA rounds, one run; `benches/RESULTS.md`, "The packed route on
/// AVX2"). Until 2026-12-06 this was 14, the height of the route's first register block,
/// which left to the routes after this one: `g W` at 9 to 13 rows on AVX2; a deep `g W`
/// at 10 to 13 rows past the decode kernel's L2 bound (`g · W` of a gate or up projection,
/// 11008 deep, from 12 rows on a 1 MiB L2) on either vector set; `x Wᵀ` at 8 to 13 rows
/// with fewer than 512 columns on AVX2. On the same Zen 4 these took 0.56–0.72 × (AVX2) and
/// 0.72–0.77 × (AVX-512) the `gemm` crate's time for the deep `g W`, and 0.67–0.82 × the
/// column-major route's for `x Wᵀ` at 384 and 448 columns (AVX2).
const MIN_ROWS: usize = 2;

/// The longest inner dimension or width the route leaves to the others: two column panels.
/// With AVX-512 this is one chunk of the column-major route
/// ([`super::col_major::chunk_width`]), the widest short side the thin split
/// ([`super::thin`]) takes. With AVX2 the thin split stops at 64; products with a short
/// side of 65 to 128 (a LoRA factor of rank 128) stay on the `gemm` crate, as before the
/// route ran on AVX2: on an AMD EPYC Zen 4 held to AVX2, at 512 rows this route took
/// 0.78–0.87 × the `gemm` crate's time for `x Aᵀ` at r = 128 but 1.03–1.08 × for
/// `(x Aᵀ) Bᵀ` and `(g B) A`, 128 deep; at 2048 rows 0.98–0.99 (two paired runs, `benches/RESULTS.md`, "The packed route on
/// AVX2").
const SHORT_SIDE: usize = 2 * COLS;

/// Whether the route is on in this process ([`block_isa`]).
pub(super) fn in_use() -> bool {
    block_isa().is_some()
}

/// The register block the route runs on in this process: the widest vector set available
/// and not lowered by `LORAKIT_CPU_ISA` (AVX-512F or AVX2), none without vectors or when
/// `LORAKIT_PACKED_PRODUCTS=0` (read once) turns the route off.
pub(crate) fn block_isa() -> Option<BlockIsa> {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("LORAKIT_PACKED_PRODUCTS").as_deref() == Ok("0"));
    BlockIsa::of(machine().isa).filter(|_| !off)
}

/// Whether the route takes `product` (module docs), its term aside.
pub(super) fn takes_product<T: WithDType>(product: &MatProduct<T>) -> bool {
    takes(&product.lhs, &product.rhs)
}

/// Whether an `lhs · rhs` product of `T` takes the route (module docs).
fn takes<T: WithDType>(lhs: &MatRef<T>, rhs: &MatRef<T>) -> bool {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    same_type::is::<T, f32>()
        && lhs.cs == 1
        && (rhs.cs == 1 || rhs.rs == 1 && takes_chunked(lhs, rhs))
        && m >= MIN_ROWS
        && k.min(n) > SHORT_SIDE
        && m.saturating_mul(n).saturating_mul(k) >= gemm::get_threading_threshold()
        && in_use()
}

/// Columns of the right-hand side packed at a time: as many whole panels as fill half of
/// a core's L2 at a depth of [`DEPTH`] (the other half for the rows streaming past and
/// the destination), at least one panel.
fn block_columns(l2: usize) -> usize {
    let panel_bytes = DEPTH * COLS * std::mem::size_of::<f32>();
    (l2 / 2 / panel_bytes).max(1) * COLS
}

/// How a product runs: `columns` of the right-hand side packed at a time, on `isa`'s
/// register block.
#[derive(Clone, Copy, Debug)]
struct Plan {
    columns: usize,
    isa: BlockIsa,
}

impl Plan {
    /// This process's: [`block_columns`] of this machine's L2, on [`block_isa`]'s block;
    /// `None` when the route is off.
    fn here() -> Option<Plan> {
        Some(Plan {
            columns: block_columns(machine().l2),
            isa: block_isa()?,
        })
    }

    /// An error unless this CPU has the plan's vector set (a plan from [`Plan::here`]
    /// always passes; the tests make others).
    fn check(self) -> candle_core::Result<()> {
        match self.isa.isa().available() {
            true => Ok(()),
            false => candle_core::bail!("packed product: {:?} is not available", self.isa),
        }
    }
}

/// Runs [`super::gemm_into`]'s product on this route and returns `Some`, or `None` when it
/// does not take it (module docs); with `term`, a second product `scale · lhs₂ · rhs₂`
/// added into the same destination, which it takes too where it can ([`term_fits`]):
/// `Some(Ok(true))` when the term was added, `Some(Ok(false))` when the caller still has
/// to add it. The caller has checked the shapes and that `dst` holds the `m × n` result at
/// row stride `dst_rs ≥ n`.
pub(super) fn reroute<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
    term: Option<AddedTerm<T>>,
) -> Option<candle_core::Result<bool>> {
    let ops = operands(product, term, None)?;
    let plan = Plan::here()?;
    let dst = same_type::same_slice_mut::<T, f32>(dst)?;
    let added = ops.term.is_some();
    Some(multiply(dst, dst_rs, ops, plan).map(|()| added))
}

/// [`reroute`] into a new `m × n` result instead of a destination: `lhs · rhs`, plus `bias`
/// (`n` values) on every row, with `term` where it fits; the result is written once, never
/// filled first (`Some(Ok((result, added)))`, `added` as in [`reroute`]), or `None` when
/// the route does not take the product. The caller has checked the shapes and that no
/// route before this one takes it.
pub(super) fn owned<T: WithDType>(
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    bias: Option<&[T]>,
    term: Option<AddedTerm<T>>,
) -> Option<candle_core::Result<(Vec<T>, bool)>> {
    let product = MatProduct::new(lhs, rhs, Accum::Replace, T::from_f64(1.0));
    let ops = operands(product, term, bias)?;
    match written_once(ops, Plan::here()?) {
        Ok(out) => Some(Ok((same_type::same_vec(out)?, ops.term.is_some()))),
        Err(e) => Some(Err(e)),
    }
}

/// `product`, `term` (where it fits its last step) and `bias` as the route's `f32`
/// operands, or `None` when the route does not take the product.
fn operands<'a, T: WithDType>(
    product: MatProduct<'a, T>,
    term: Option<AddedTerm<'a, T>>,
    bias: Option<&'a [T]>,
) -> Option<Operands<'a>> {
    let (lhs, rhs, accum, beta) = product.parts();
    if !takes(&lhs, &rhs) {
        return None;
    }
    let (lhs, rhs) = (
        same_type::same::<T, f32>(lhs)?,
        same_type::same::<T, f32>(rhs)?,
    );
    let product = MatProduct::new(lhs, rhs, accum, beta.to_f64() as f32);
    let bias = match bias {
        Some(b) => Some(same_type::same_slice::<T, f32>(b)?),
        None => None,
    };
    Some(Operands {
        product,
        term: term.and_then(|t| fitting_term(t, &product)),
        bias,
    })
}

/// `term` as `f32`'s when it joins `product`'s last step ([`term_fits`]).
fn fitting_term<'a, T: WithDType>(
    term: AddedTerm<'a, T>,
    product: &MatProduct<f32>,
) -> Option<AddedTerm<'a, f32>> {
    let term = AddedTerm {
        lhs: same_type::same::<T, f32>(term.lhs)?,
        rhs: same_type::same::<T, f32>(term.rhs)?,
        scale: term.scale.to_f64() as f32,
    };
    term_fits(&term, product).then_some(term)
}

/// Whether a second term joins the base product's last step: the base product's `beta`
/// is 1 (the term's scale is packed into its rows), the term's result has the base
/// product's `m × n` shape, its rows are contiguous on the left and its right-hand side
/// has contiguous rows or columns, and its depth (a LoRA factor pair's rank) fits the row
/// panel's room beside a full step ([`STRIDE`] − [`DEPTH`], 64).
fn term_fits(term: &AddedTerm<f32>, product: &MatProduct<f32>) -> bool {
    let r = term.lhs.cols;
    product.beta == 1.0
        && term.lhs.rows == product.lhs.rows
        && term.rhs.cols == product.rhs.cols
        && term.rhs.rows == r
        && (1..=STRIDE - DEPTH).contains(&r)
        && term.lhs.cs == 1
        && (term.rhs.cs == 1 || term.rhs.rs == 1)
}

/// One product, `dst = beta · lhs · rhs` or `dst += beta · lhs · rhs`, plus the term that
/// joins its last step, and with [`Accum::Replace`] a bias (`n` values) added to every row
/// in its first step.
#[derive(Clone, Copy)]
struct Operands<'a> {
    product: MatProduct<'a, f32>,
    term: Option<AddedTerm<'a, f32>>,
    bias: Option<&'a [f32]>,
}

/// A thread's packed panel buffers, kept for the life of the thread (about 1.1 MiB with a
/// 2 MiB L2) so that the products of a training step do not allocate them.
#[derive(Default)]
struct Panels {
    rows: Vec<f32>,
    columns: Vec<f32>,
}

thread_local! {
    static PANELS: RefCell<Panels> = RefCell::new(Panels::default());
}

/// The product into `dst` (`m × n` at row stride `dst_rs`, an error when shorter), the
/// columns split over rayon's threads, as `plan` says.
fn multiply(dst: &mut [f32], dst_rs: usize, ops: Operands, plan: Plan) -> candle_core::Result<()> {
    plan.check()?;
    let (m, n) = (ops.product.lhs.rows, ops.product.rhs.cols);
    let too_short = m.checked_sub(1).is_some_and(|last| {
        let needed = last.checked_mul(dst_rs).and_then(|v| v.checked_add(n));
        needed.is_none_or(|needed| dst.len() < needed)
    });
    if too_short || dst_rs < n {
        candle_core::bail!(
            "packed product: destination of {} shorter than {m} × {n}",
            dst.len()
        );
    }
    // SAFETY: the plan's vectors are available and `dst` holds the `m × n` result at row
    // stride `dst_rs ≥ n` (both checked above), initialized, and the `&mut` borrow keeps
    // every other access out during the call.
    unsafe { multiply_at(SharedDst(dst.as_mut_ptr()), dst_rs, ops, plan) }
}

/// The product ([`Accum::Replace`]) into a new contiguous `m × n` vector, each element
/// written once and never read before: no fill first.
fn written_once(ops: Operands, plan: Plan) -> candle_core::Result<Vec<f32>> {
    plan.check()?;
    let (m, k, n) = (
        ops.product.lhs.rows,
        ops.product.lhs.cols,
        ops.product.rhs.cols,
    );
    let Some(len) = m.checked_mul(n) else {
        candle_core::bail!("packed product: {m} × {n} overflows usize")
    };
    if ops.product.accum != Accum::Replace || k == 0 {
        candle_core::bail!("packed product: a new result needs a replacing product of depth ≥ 1");
    }
    let mut out = Vec::with_capacity(len);
    // SAFETY: the plan's vectors are available, the new vector's capacity holds the
    // `m × n` result at row stride `n`, only this call touches it, and the product
    // replaces (checked above).
    unsafe { multiply_at(SharedDst(out.as_mut_ptr()), n, ops, plan)? };
    // SAFETY: `with_capacity(len)` holds `m · n` elements. `multiply_at` split `0..n` into
    // column ranges (`even_ranges` covers it), and each range's first depth step (`k ≥ 1`)
    // stored every element of its columns on every row (tiles of `ROWS` rows from 0 to
    // `m`, of `COLS` columns masked to the range's end) with `Start::Zero` or
    // `Start::Row`, which do not read the destination; later steps read only what the
    // first one wrote. It returned `Ok`, so every task ran to its end.
    unsafe { out.set_len(len) };
    Ok(out)
}

/// [`multiply`] at `dst`.
///
/// # Safety
/// `plan.isa`'s vector set is available; `dst` is valid for writes of the `m × n` result at row stride `dst_rs ≥ n` (and holds
/// initialized values there unless the product is [`Accum::Replace`]: the first depth
/// step then writes each element before any step reads it), and nothing else accesses
/// those elements during the call.
unsafe fn multiply_at(
    dst: SharedDst<f32>,
    dst_rs: usize,
    ops: Operands,
    plan: Plan,
) -> candle_core::Result<()> {
    let n = ops.product.rhs.cols;
    if ops
        .bias
        .is_some_and(|b| b.len() != n || ops.product.accum != Accum::Replace)
    {
        candle_core::bail!("packed product: a bias needs {n} values and a replacing product");
    }
    even_ranges(n, COLS).try_for_each(|(start, end)| {
        PANELS.with(|panels| {
            let mut panels = panels.borrow_mut();
            // SAFETY: the caller's contract, for this task's own columns (`even_ranges`
            // gives each task its own range).
            unsafe { columns_of(dst, dst_rs, ops, (start, end), plan, &mut panels) }
        })
    })
}

/// Columns `start..end` of the product, `plan.columns` at a time (module docs).
///
/// # Safety
/// As for [`multiply_at`], for columns `start..end` of `dst`'s rows.
unsafe fn columns_of(
    dst: SharedDst<f32>,
    dst_rs: usize,
    ops: Operands,
    (start, end): (usize, usize),
    plan: Plan,
    panels: &mut Panels,
) -> candle_core::Result<()> {
    let (m, k) = (ops.product.lhs.rows, ops.product.lhs.cols);
    let block = plan.columns;
    let Panels {
        rows: row_buffer,
        columns: column_buffer,
    } = panels;
    let widest = block.min(end - start).next_multiple_of(COLS);
    let row_panel = cache_aligned(row_buffer, ROWS * STRIDE).ok_or_else(|| short("row"))?;
    let column_panels =
        cache_aligned(column_buffer, STRIDE * widest).ok_or_else(|| short("column"))?;
    for j0 in (start..end).step_by(block) {
        let width = block.min(end - j0);
        for k0 in (0..k).step_by(DEPTH) {
            let (lhs_pieces, rhs_pieces, count) = step_pieces(&ops, k0);
            let lhs_pieces = lhs_pieces.get(..count).unwrap_or_default();
            let rhs_pieces = rhs_pieces.get(..count).unwrap_or_default();
            let depth: usize = rhs_pieces.iter().map(|piece| piece.depth).sum();
            debug_assert!(depth <= STRIDE);
            let cols = Extent {
                start: j0,
                len: width,
            };
            pack::column_panels(rhs_pieces, cols, column_panels, plan.isa)?;
            let adds_to_dst = ops.product.accum == Accum::Add || k0 > 0;
            for i0 in (0..m).step_by(ROWS) {
                let rows = ROWS.min(m - i0);
                let extent = Extent {
                    start: i0,
                    len: rows,
                };
                let (lhs_rows, lhs_rs) = match pack::rows_in_place(lhs_pieces, extent, depth) {
                    Some((values, rs)) => (values.as_ptr(), rs),
                    None => {
                        pack::row_panel(lhs_pieces, extent, row_panel)?;
                        (row_panel.as_ptr(), STRIDE)
                    }
                };
                for (p, j) in (j0..j0 + width).step_by(COLS).enumerate() {
                    let start_from = match ops.bias {
                        _ if adds_to_dst => Start::Dst,
                        Some(bias) => Start::Row(bias.as_ptr().wrapping_add(j)),
                        None => Start::Zero,
                    };
                    let tile = Tile {
                        out: dst.0.wrapping_add(i0 * dst_rs + j),
                        out_rs: dst_rs,
                        rows,
                        width: COLS.min(j0 + width - j),
                        beta: ops.product.beta,
                        start: start_from,
                    };
                    let panel = column_panels
                        .get(p * depth * COLS..(p + 1) * depth * COLS)
                        .ok_or_else(|| short("column"))?;
                    // SAFETY: `plan.isa`'s vectors are available (`multiply_at`'s contract:
                    // checked by `block_isa`, or by the tests); `lhs_rows` holds `rows` rows
                    // of `depth ≤ STRIDE` values at stride `lhs_rs` (the left-hand side's
                    // slice, which `rows_in_place` checked for this `depth`, or the row
                    // panel at `STRIDE`, which `row_panel` filled), the column panel
                    // `depth · COLS` values from a 64-byte boundary (`cache_aligned`, and every
                    // panel is a multiple of 64 bytes long); the tile lies in the checked
                    // destination, in this task's own columns, and is read (`Start::Dst`)
                    // only where the caller's values or an earlier step's are; a bias holds
                    // `n` values (`multiply_at`), so `width` from column `j`.
                    unsafe {
                        kernel::multiply(plan.isa, depth, lhs_rows, lhs_rs, panel.as_ptr(), tile)
                    };
                }
            }
        }
    }
    Ok(())
}

/// The left- and right-hand-side pieces of the step at depth `k0` (the first `count` of
/// each array): the base product's slice `k0 .. k0 + DEPTH` (or to its end), and on the
/// last step the whole term.
fn step_pieces<'a>(ops: &Operands<'a>, k0: usize) -> ([Piece<'a>; 2], [Piece<'a>; 2], usize) {
    let (lhs, rhs) = (ops.product.lhs, ops.product.rhs);
    let k = lhs.cols;
    let depth = DEPTH.min(k - k0);
    let base = |mat, scale| Piece {
        mat,
        k0,
        depth,
        scale,
    };
    let (lhs, rhs) = (base(lhs, 1.0), base(rhs, 1.0));
    match ops.term.filter(|_| k0 + depth == k) {
        Some(term) => {
            let whole = |mat, scale| Piece {
                mat,
                k0: 0,
                depth: term.lhs.cols,
                scale,
            };
            let (term_lhs, term_rhs) = (whole(term.lhs, term.scale), whole(term.rhs, 1.0));
            ([lhs, term_lhs], [rhs, term_rhs], 2)
        }
        None => ([lhs, lhs], [rhs, rhs], 1),
    }
}

/// The error of a panel buffer that could not be sized (`which`: row or column).
fn short(which: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "packed product: the {which} panels could not be sized"
    ))
}

#[cfg(test)]
mod tests {
    use super::super::{assert_matches_triple_loop, low_rank_test_term, on_threads, test_values};
    use super::*;

    fn vals(len: usize, seed: f64) -> Vec<f32> {
        test_values(len, seed)
            .into_iter()
            .map(|v| v as f32)
            .collect()
    }

    /// The register blocks this CPU runs (both where it has AVX-512F): the tests below run
    /// each, whichever the route would pick here.
    fn blocks_here() -> Vec<BlockIsa> {
        let here: Vec<BlockIsa> = BlockIsa::ALL
            .into_iter()
            .filter(|block| block.isa().available())
            .collect();
        if here.is_empty() {
            eprintln!("no AVX2 or AVX-512F on this CPU: the packed products are not tested here");
        }
        here
    }

    /// `columns` packed at a time, on `isa`'s block.
    fn plan(columns: usize, isa: BlockIsa) -> Plan {
        Plan { columns, isa }
    }

    /// The product through [`multiply`] as `plan` says.
    fn run(
        dst: &mut [f32],
        dst_rs: usize,
        product: MatProduct<f32>,
        plan: Plan,
    ) -> candle_core::Result<()> {
        multiply(
            dst,
            dst_rs,
            Operands {
                product,
                term: None,
                bias: None,
            },
            plan,
        )
    }

    /// Ragged shapes (rows not a multiple of the block's 6, columns not of its 64 or of
    /// 16, depth not of 16 or of the 384-deep steps, 513 over two steps, each remainder of
    /// the depth loop's four steps a pass: 17, 130, 31, and a last step of two, 386), a
    /// right-hand side row-major and column-major (a slice of a taller matrix, as `Wᵀ` of a
    /// padded weight), a left-hand side with padded rows (NaN in the padding), a padded
    /// destination, replace and add, `beta`, one and several column blocks, on each
    /// register block this CPU runs: against an `f64` triple loop.
    #[test]
    fn every_shape_and_layout_matches_a_triple_loop() -> candle_core::Result<()> {
        let shapes = [
            (1, 16, 1),
            (13, 17, 15),
            (14, 256, 32),
            (6, 256, 64),
            (7, 300, 65),
            (15, 300, 33),
            (13, 129, 130),
            (20, 300, 128),
            (29, 513, 100),
            (40, 64, 16),
            (3, 31, 17),
            (9, 130, 40),
            (5, 386, 20),
        ];
        for (m, k, n) in shapes {
            let lhs_padded: Vec<f32> = vals(m * (k + 2), 0.37)
                .into_iter()
                .enumerate()
                .map(|(v, x)| if v % (k + 2) < k { x } else { f32::NAN })
                .collect();
            let lhs = MatRef::new(&lhs_padded, m, k, k + 2, 1)?;
            let row_major = vals(k * (n + 5), 0.71);
            let column_major = vals((k + 3) * n, 0.53);
            let rhs_views = [
                ("row-major", MatRef::new(&row_major, k, n, n + 5, 1)?),
                // Its last full panel's last row ends where the operand does.
                (
                    "row-major, unpadded",
                    MatRef::contiguous(&row_major[..k * n], k, n)?,
                ),
                ("column-major", MatRef::new(&column_major, k, n, 1, k + 3)?),
            ];
            for (layout, rhs) in rhs_views {
                for (accum, beta) in [(Accum::Replace, 1.0), (Accum::Add, -0.5)] {
                    for (block, isa) in [COLS, 2 * COLS, 1024]
                        .into_iter()
                        .flat_map(|block| blocks_here().into_iter().map(move |isa| (block, isa)))
                    {
                        let dst_rs = n + 2;
                        let start = vals(m * dst_rs, 1.3);
                        let mut dst = start.clone();
                        let product = MatProduct::new(lhs, rhs, accum, beta);
                        run(&mut dst, dst_rs, product, plan(block, isa))?;
                        let context =
                            format!("{layout} rhs, {accum:?}, blocks of {block}, {isa:?}");
                        assert_matches_triple_loop(&dst, &start, dst_rs, product, 1e-6, &context);
                    }
                }
            }
        }
        Ok(())
    }

    /// `dst (+)= lhs · rhs + scale · lhs₂ · rhs₂` against an `f64` double sum.
    fn check_with_term(
        dst: &[f32],
        start: &[f32],
        product: &MatProduct<f32>,
        term: &AddedTerm<f32>,
        context: &str,
    ) {
        let (m, k, n, r) = (
            product.lhs.rows,
            product.lhs.cols,
            product.rhs.cols,
            term.lhs.cols,
        );
        let dot = |a: MatRef<f32>, b: MatRef<f32>, i: usize, j: usize, len: usize| -> f64 {
            (0..len)
                .map(|t| f64::from(a.at(i, t)) * f64::from(b.at(t, j)))
                .sum()
        };
        for i in 0..m {
            for j in 0..n {
                let base = match product.accum {
                    Accum::Replace => 0.0,
                    Accum::Add => f64::from(start[i * n + j]),
                };
                let want = base
                    + f64::from(product.beta) * dot(product.lhs, product.rhs, i, j, k)
                    + f64::from(term.scale) * dot(term.lhs, term.rhs, i, j, r);
                let got = f64::from(dst[i * n + j]);
                let tol = 1e-6 * (1.0 + want.abs()) * (k + r) as f64;
                assert!(
                    (got - want).abs() <= tol,
                    "{context} ({i}, {j}): {got} vs {want}"
                );
            }
        }
    }

    /// A second term (a LoRA pair's `s (x Aᵀ) Bᵀ` or `s (g B) A`) in the base product's
    /// last step: its right-hand side column-major (`Bᵀ`) and row-major (`A`), ranks 1,
    /// 16 and 64 (the most that fits), a base product of one and of two depth steps,
    /// replace and add, on each register block this CPU runs.
    #[test]
    fn a_second_term_in_the_last_step_matches_a_double_sum() -> candle_core::Result<()> {
        for isa in blocks_here() {
            second_term_matches_a_double_sum(isa)?;
        }
        Ok(())
    }

    /// [`a_second_term_in_the_last_step_matches_a_double_sum`] on `isa`'s block.
    fn second_term_matches_a_double_sum(isa: BlockIsa) -> candle_core::Result<()> {
        for (m, k, n) in [(30, 100, 70), (17, 400, 40)] {
            let lhs_data = vals(m * k, 0.37);
            let rhs_data = vals(k * n, 0.71);
            let lhs = MatRef::contiguous(&lhs_data, m, k)?;
            let rhs = MatRef::new(&rhs_data, k, n, 1, k)?;
            for r in [1, 16, STRIDE - DEPTH] {
                let xa_data = vals(m * r, 0.9);
                let b_data = vals(n * r, 0.4);
                let xa = MatRef::contiguous(&xa_data, m, r)?;
                let b_t = MatRef::contiguous(&b_data, n, r)?.t();
                let a = MatRef::contiguous(&b_data, r, n)?;
                for (layout, term_rhs) in [("column-major", b_t), ("row-major", a)] {
                    let term = AddedTerm {
                        lhs: xa,
                        rhs: term_rhs,
                        scale: -0.75,
                    };
                    for accum in [Accum::Replace, Accum::Add] {
                        let product = MatProduct::new(lhs, rhs, accum, 1.0);
                        assert!(term_fits(&term, &product), "r {r} should fit");
                        let ops = Operands {
                            product,
                            term: Some(term),
                            bias: None,
                        };
                        let start = vals(m * n, 1.3);
                        let mut dst = start.clone();
                        multiply(&mut dst, n, ops, plan(2 * COLS, isa))?;
                        let context =
                            format!("{m}x{k}x{n}, r {r}, {layout} term, {accum:?}, {isa:?}");
                        check_with_term(&dst, &start, &product, &term, &context);
                    }
                }
            }
        }
        Ok(())
    }

    /// A new result (`written_once`), with and without a bias in the first step and a term
    /// in the last, over one and two depth steps: against an `f64` double sum, and the same
    /// bits as the product replacing a destination full of NaN (which a read of it would
    /// carry into the result). A bias of the wrong length, or beside a product that adds,
    /// is an error. On each register block this CPU runs.
    #[test]
    fn new_results_are_written_once() -> candle_core::Result<()> {
        for isa in blocks_here() {
            written_once_on(isa)?;
        }
        Ok(())
    }

    /// [`new_results_are_written_once`] on `isa`'s block.
    fn written_once_on(isa: BlockIsa) -> candle_core::Result<()> {
        let r = 16;
        // The last: two threads, each with two blocks of one panel (`block` is `COLS`
        // below), so later steps read what the first wrote across blocks and tasks.
        for (m, k, n) in [(30, 400, 70), (15, 129, 33), (20, 400, 200)] {
            let (lhs_data, rhs_data) = (vals(m * k, 0.37), vals(k * n, 0.71));
            let (xa_data, b_data, bias) = (vals(m * r, 0.9), vals(n * r, 0.4), vals(n, 1.7));
            let lhs = MatRef::contiguous(&lhs_data, m, k)?;
            let rhs = MatRef::new(&rhs_data, k, n, 1, k)?;
            let product = MatProduct::new(lhs, rhs, Accum::Replace, 1.0);
            let term = AddedTerm {
                lhs: MatRef::contiguous(&xa_data, m, r)?,
                rhs: MatRef::contiguous(&b_data, n, r)?.t(),
                scale: -0.75,
            };
            for with_bias in [true, false] {
                for with_term in [true, false] {
                    let ops = Operands {
                        product,
                        term: with_term.then_some(term),
                        bias: with_bias.then_some(&bias[..]),
                    };
                    let block = if n > 2 * COLS { COLS } else { 2 * COLS };
                    let out = on_threads(2, || written_once(ops, plan(block, isa)))??;
                    let context =
                        format!("{m}x{k}x{n}, bias {with_bias}, term {with_term}, {isa:?}");
                    // The bias as the start of a product that adds onto it.
                    let start: Vec<f32> = match with_bias {
                        true => (0..m).flat_map(|_| bias.iter().copied()).collect(),
                        false => vec![0.0; m * n],
                    };
                    let adding = MatProduct {
                        accum: Accum::Add,
                        ..product
                    };
                    match with_term {
                        true => check_with_term(&out, &start, &adding, &term, &context),
                        false => {
                            assert_matches_triple_loop(&out, &start, n, adding, 1e-6, &context)
                        }
                    }
                    let mut over_nan = vec![f32::NAN; m * n];
                    multiply(&mut over_nan, n, ops, plan(block, isa))?;
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert!(bits(&out) == bits(&over_nan), "{context}: bits differ");
                }
            }
        }
        let data = vals(200 * 200, 0.3);
        let square = MatRef::contiguous(&data, 200, 200)?;
        let short_bias = vals(199, 1.0);
        let wrong = [
            (Accum::Replace, &short_bias[..]),
            (Accum::Add, &data[..200]),
        ];
        for (accum, bias) in wrong {
            let ops = Operands {
                product: MatProduct::new(square, square, accum, 1.0),
                term: None,
                bias: Some(bias),
            };
            let mut dst = vec![0.0; 200 * 200];
            let err = multiply(&mut dst, 200, ops, plan(COLS, isa)).expect_err("a wrong bias");
            assert!(err.to_string().contains("bias"), "{err}");
        }
        let adding = Operands {
            product: MatProduct::new(square, square, Accum::Add, 1.0),
            term: None,
            bias: None,
        };
        assert!(written_once(adding, plan(COLS, isa)).is_err());
        Ok(())
    }

    /// A term that does not fit (rank past 64, another shape, a base `beta` other than 1)
    /// is left to the caller; through `gemm_plus_into` it is added all the same.
    #[test]
    fn a_term_that_does_not_fit_is_left_to_the_caller() -> candle_core::Result<()> {
        let (m, k, n) = (64, 300, 256);
        let data = vals(m.max(k).max(n) * 80, 0.5);
        let lhs = MatRef::contiguous(&data, m, k)?;
        let rhs_data = vals(k * n, 0.7);
        let rhs = MatRef::contiguous(&rhs_data, k, n)?;
        let product = MatProduct::new(lhs, rhs, Accum::Replace, 1.0);
        let too_deep = AddedTerm {
            lhs: MatRef::contiguous(&data, m, 65)?,
            rhs: MatRef::contiguous(&data, 65, n)?,
            scale: 1.0,
        };
        assert!(!term_fits(&too_deep, &product));
        let fits = AddedTerm {
            lhs: MatRef::contiguous(&data, m, 8)?,
            ..too_deep
        };
        let fits = AddedTerm {
            rhs: MatRef::contiguous(&data, 8, n)?,
            ..fits
        };
        assert!(term_fits(&fits, &product));
        assert!(!term_fits(
            &fits,
            &MatProduct {
                beta: 0.5,
                ..product
            }
        ));
        let shorter = MatProduct {
            lhs: MatRef::contiguous(&data, m - 1, k)?,
            ..product
        };
        assert!(!term_fits(&fits, &shorter));
        if !in_use() {
            return Ok(());
        }
        let zeros = vec![0f32; m * n];
        for (term, taken) in [(fits, true), (too_deep, false)] {
            let context = format!("rank {}", term.lhs.cols);
            let mut dst = zeros.clone();
            let took = reroute(&mut dst, n, product, Some(term)).expect("a large f32 product")?;
            assert_eq!(took, taken, "{context}");
            if took {
                check_with_term(&dst, &zeros, &product, &term, &context);
            }
            let mut whole = zeros.clone();
            super::super::gemm_plus_into(&mut whole, n, product, Some(term))?;
            check_with_term(&whole, &zeros, &product, &term, &context);
        }
        Ok(())
    }

    /// The same bits on 1, 2, 3 and 5 threads, whose column ranges fall differently, with
    /// and without a second term, and on each register block this CPU runs (AVX-512's and
    /// AVX2's give the same bits: the kernel's docs). Ragged edges (45 and 200 rows, 200
    /// and 300 columns, depths 600 and 96) go through the masked loads and stores.
    #[test]
    fn the_bits_do_not_depend_on_the_thread_count_or_the_block() -> candle_core::Result<()> {
        let blocks = blocks_here();
        let Some(&first) = blocks.first() else {
            return Ok(());
        };
        for (m, k, n, r) in [(45, 600, 200, 0), (200, 96, 300, 8)] {
            let lhs_data = vals(m * k, 0.37);
            let rhs_data = vals(k * n, 0.71);
            let xa_data = vals(m * r, 0.9);
            let b_data = vals(n * r, 0.4);
            let lhs = MatRef::contiguous(&lhs_data, m, k)?;
            let rhs = MatRef::new(&rhs_data, k, n, 1, k)?;
            let term = low_rank_test_term(&xa_data, &b_data, (m, n, r))?;
            let product = MatProduct::new(lhs, rhs, Accum::Add, 1.0);
            let ops = Operands {
                product,
                term,
                bias: None,
            };
            let with = |threads: usize, isa: BlockIsa| -> candle_core::Result<Vec<u32>> {
                let mut dst = vals(m * n, 1.1);
                on_threads(threads, || {
                    multiply(&mut dst, n, ops, plan(block_columns(2 << 20), isa))
                })??;
                Ok(dst.iter().map(|x| x.to_bits()).collect())
            };
            let one = with(1, first)?;
            for &isa in &blocks {
                for threads in [1, 2, 3, 5] {
                    assert!(
                        one == with(threads, isa)?,
                        "{m}x{k}x{n} r {r}: {first:?} on 1 thread and {isa:?} on {threads} differ"
                    );
                }
            }
        }
        Ok(())
    }

    /// A destination shorter than the product is an error, not a write past its end.
    #[test]
    fn a_short_destination_is_an_error() -> candle_core::Result<()> {
        let data = vals(20 * 20, 0.3);
        let lhs = MatRef::contiguous(&data, 20, 20)?;
        for isa in blocks_here() {
            let mut dst = vec![0.0; 20 * 20 - 1];
            let product = MatProduct::new(lhs, lhs, Accum::Replace, 1.0);
            let err = run(&mut dst, 20, product, plan(COLS, isa)).expect_err("short destination");
            assert!(err.to_string().contains("shorter"), "{err}");
        }
        Ok(())
    }

    /// Half of a 2 MiB L2 holds 10 column panels of 64 columns 384 deep (96 KiB each),
    /// half of 1 MiB 5; a cache too small for one panel still gets one.
    #[test]
    fn column_blocks_follow_the_l2() {
        assert_eq!((DEPTH, COLS), (384, 64));
        assert_eq!(block_columns(2 << 20), 10 * COLS);
        assert_eq!(block_columns(1 << 20), 5 * COLS);
        assert_eq!(block_columns(16 << 10), COLS);
    }

    /// The route takes large `f32` products with contiguous rows on the left (`x Wᵀ` at
    /// many rows, `g W` at any batch from [`MIN_ROWS`] rows) and leaves `f64`, a
    /// column-major left-hand side, small products, a short side and `x Wᵀ` at few rows to
    /// the others.
    #[test]
    fn the_route_takes_what_its_docs_say() -> candle_core::Result<()> {
        if !in_use() {
            eprintln!("the packed route is off here (no AVX2 or AVX-512F, or turned off)");
            return Ok(());
        }
        let (m, k) = (512, 512);
        let f32s = vec![0f32; m * k];
        let f64s = vec![0f64; m * k];
        let row_major = MatRef::contiguous(&f32s, m, k)?;
        assert!(takes(&row_major, &row_major.t()));
        // A row-major right-hand side (`g W`) from `MIN_ROWS` rows on.
        let rows_100 = MatRef::contiguous(&f32s, 100, k)?;
        assert!(takes(&rows_100, &row_major));
        assert!(takes(&MatRef::contiguous(&f32s, 128, k)?, &row_major));
        assert!(takes(&row_major, &row_major));
        assert!(!takes(&row_major.t(), &row_major));
        let f64_view = MatRef::contiguous(&f64s, m, k)?;
        assert!(!takes(&f64_view, &f64_view));
        let small = MatRef::contiguous(&f32s, 8, 8)?;
        assert!(!takes(&small, &small));
        // A short side (a LoRA rank) stays on the thin route or the `gemm` crate.
        // On every vector set: up to `SHORT_SIDE` (128), not past it.
        let thin = MatRef::contiguous(&f32s, m, SHORT_SIDE)?;
        assert!(!takes(&thin, &MatRef::contiguous(&f32s, SHORT_SIDE, k)?));
        assert!(!takes(
            &row_major,
            &MatRef::contiguous(&f32s, k, SHORT_SIDE)?
        ));
        let deeper = MatRef::contiguous(&f32s, m, SHORT_SIDE + 1)?;
        assert!(takes(
            &deeper,
            &MatRef::contiguous(&f32s, SHORT_SIDE + 1, k)?
        ));
        let wider = MatRef::contiguous(&f32s, k, SHORT_SIDE + 1)?;
        assert!(takes(&row_major, &wider));
        // `x Wᵀ` at 32 rows against 1024 goes through the column-major route's transposes.
        let wide = vec![0f32; 1024 * 1024];
        let few = MatRef::contiguous(&wide, 32, 1024)?;
        let w = MatRef::contiguous(&wide, 1024, 1024)?;
        assert!(takes(&few, &w));
        assert!(!takes(&few, &w.t()));
        // `g W` from two rows, not one (products past the `gemm` crate's threading
        // threshold, so that only the row count decides).
        assert!(takes(&MatRef::contiguous(&wide, 2, 1024)?, &w));
        assert!(!takes(&MatRef::contiguous(&wide, 1, 1024)?, &w));
        Ok(())
    }
}
