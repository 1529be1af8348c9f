//! The register blocks of [`super`]: up to [`ROWS`] rows by [`COLS`] columns of the
//! destination held in vector registers while the left-hand side's rows (in place, or from
//! a row panel) and a packed column panel stream past, one multiply-add per register per
//! step of depth; one block per vector width ([`BlockIsa`]), each on panels laid out for
//! it ([`PanelLayout`]).
//!
//! - [`avx512`]: the whole 6 × 64 tile in 24 registers, four loads and six broadcasts per
//!   step of depth;
//! - [`avx2`]: the tile as four 6 × 16 blocks of 12 registers each (two loads and six
//!   broadcasts per step), AVX2 having 16 registers: each block reads its own 16-column
//!   strip of the panel, one cache line per step of depth, the strip's steps contiguous
//!   ([`PanelLayout`]).
//!
//! Both sum each destination element's products in depth order in one FMA chain, then
//! scale by `beta` and add the start ([`Start`]) as the same two operations, so the two
//! blocks give the same bits. The block is one, [`block`] (its depth loop [`accumulate`],
//! then [`finish`]), over either vector set's registers ([`Vectors`]); each set brings only
//! its intrinsics and its edge loads and stores (AVX-512's lane masks, AVX2's plain full
//! vectors and masked partial ones).

use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

use super::super::machine::Isa;

/// The [`Vectors`] methods that are one intrinsic each, for a register type `$reg`, in a
/// vector set's `impl Vectors`.
macro_rules! one_intrinsic_ops {
    ($reg:ty, zero: $zero:ident, load: $load:ident, splat: $splat:ident,
     fma: $fma:ident, mul: $mul:ident, add: $add:ident) => {
        #[inline(always)]
        unsafe fn zero() -> $reg {
            // SAFETY: the caller's contract: the vector set is available.
            unsafe { $zero() }
        }
        #[inline(always)]
        unsafe fn load_aligned(at: *const f32) -> $reg {
            // SAFETY: the caller's contract: the vector set, `at` aligned with `LANES` values.
            unsafe { $load(at) }
        }
        #[inline(always)]
        unsafe fn splat(value: f32) -> $reg {
            // SAFETY: the caller's contract: the vector set is available.
            unsafe { $splat(value) }
        }
        #[inline(always)]
        unsafe fn fma(a: $reg, b: $reg, c: $reg) -> $reg {
            // SAFETY: the caller's contract: the vector set (with FMA) is available.
            unsafe { $fma(a, b, c) }
        }
        #[inline(always)]
        unsafe fn mul(a: $reg, b: $reg) -> $reg {
            // SAFETY: the caller's contract: the vector set is available.
            unsafe { $mul(a, b) }
        }
        #[inline(always)]
        unsafe fn add(a: $reg, b: $reg) -> $reg {
            // SAFETY: the caller's contract: the vector set is available.
            unsafe { $add(a, b) }
        }
    };
}

mod avx2;
mod avx512;
#[cfg(all(test, target_os = "linux"))]
mod compiled_loops;

/// Rows of the destination per block: 6 rows of four AVX-512 vectors are 24 accumulators
/// (with the four column vectors and a broadcast, 29 of AVX-512's 32 registers; 7 rows
/// would need 33), and 6 rows of two AVX2 vectors 12 (15 of AVX2's 16).
pub(super) const ROWS: usize = 6;

/// Columns of the destination per tile, and of a column panel: four AVX-512 vectors.
pub(super) const COLS: usize = 64;

/// The depth of a step of the base product: [`ROWS`] rows' slice this deep is 9 KiB, so
/// it stays in L1 while the column panels (96 KiB each) stream from L2. On an
/// Intel Xeon (model 207) depths of 256, 384 and 512 ran within the host's noise of each
/// other with the AVX-512 block, none ahead in every case (`benches/RESULTS.md`, "A wider
/// register block").
pub(super) const DEPTH: usize = 384;

/// The row panel's row stride, and the deepest step a call takes: [`DEPTH`] and room for
/// a second term up to 64 deep (a LoRA factor pair's rank) in the same step.
pub(super) const STRIDE: usize = DEPTH + 64;

/// Which register block runs a product: the widest vector set the machine offers
/// ([`BlockIsa::of`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockIsa {
    /// AVX-512F.
    Avx512,
    /// AVX2 and FMA.
    Avx2,
}

impl BlockIsa {
    /// Both blocks, widest first.
    #[cfg(test)]
    pub(super) const ALL: [BlockIsa; 2] = [BlockIsa::Avx512, BlockIsa::Avx2];

    /// The block for a vector set: none for portable scalar code.
    pub(crate) fn of(isa: Isa) -> Option<BlockIsa> {
        match isa {
            Isa::Avx512 => Some(BlockIsa::Avx512),
            Isa::Avx2 => Some(BlockIsa::Avx2),
            Isa::Scalar => None,
        }
    }

    /// The vector set the block needs.
    pub(super) fn isa(self) -> Isa {
        match self {
            BlockIsa::Avx512 => Isa::Avx512,
            BlockIsa::Avx2 => Isa::Avx2,
        }
    }

    /// The columns the block reads per step of depth: the width of a column panel's
    /// strips ([`PanelLayout`]).
    pub(super) const fn strip(self) -> usize {
        match self {
            BlockIsa::Avx512 => avx512::BLOCK_COLS,
            BlockIsa::Avx2 => avx2::BLOCK_COLS,
        }
    }
}

/// Where the values of a column panel ([`COLS`] columns, `depth` steps) lie for a block
/// that reads `strip` of its columns per step ([`BlockIsa::strip`]): in strips of `strip`
/// columns, one after the other, each strip's steps contiguous, so that the block reads
/// its strip as one sequential stream. Element `(k, j)` is at
/// `j / strip · depth · strip + k · strip + j % strip`: `k · COLS + j` for AVX-512's block,
/// which reads the whole width.
///
/// Until 2026-12-06 every panel was laid out as AVX-512's, and AVX2's block read its 16
/// columns of each 64-wide step: one cache line every 256 bytes. In 16-column strips the
/// route's AVX2 products took 0.89–0.97 × that time on an AMD EPYC Zen 4 (family 25 model
/// 17) held to AVX2, `x Wᵀ` and `g W` from 64 to 2048 rows at `d` = 1024 to 4096, two runs
/// of 30 paired rounds in one process each, on a host whose memory was busy (one case
/// 1.09, in a fast moment of the other layout); a replica of the block alone, one thread,
/// 0.88–1.00 (`benches/RESULTS.md`, "AVX2 panels in 16-column strips").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PanelLayout {
    /// Steps of depth in the panel.
    pub depth: usize,
    /// Columns per strip: a divisor of [`COLS`].
    pub strip: usize,
}

impl PanelLayout {
    /// `isa`'s block's layout of a panel `depth` deep.
    pub(super) fn of(isa: BlockIsa, depth: usize) -> PanelLayout {
        PanelLayout {
            depth,
            strip: isa.strip(),
        }
    }

    /// The index of element `(k, j)` (`k < depth`, `j <` [`COLS`]) in the panel.
    pub(super) fn at(self, k: usize, j: usize) -> usize {
        j / self.strip * self.depth * self.strip + k * self.strip + j % self.strip
    }
}

/// Where a block's sums go: `width` (1 to [`COLS`]) columns of `rows` rows of a row-major
/// destination at row stride `out_rs`, scaled by `beta`, added to what [`Start`] says.
#[derive(Clone, Copy)]
pub(super) struct Tile {
    pub out: *mut f32,
    pub out_rs: usize,
    pub rows: usize,
    pub width: usize,
    pub beta: f32,
    pub start: Start,
}

/// What a block's scaled sums are added to before they are stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Start {
    /// Nothing: the destination is written without being read, so it may be memory not
    /// yet initialized.
    Zero,
    /// The destination's own values.
    Dst,
    /// The same `width` values (a bias, from the block's first column) on every row; the
    /// destination is written without being read.
    Row(*const f32),
}

/// The sums over `depth` (at most [`STRIDE`]) steps into `tile`, on `isa`'s block, the
/// rows' values read from `rows`, row `i` at `i · rows_rs` (a packed row panel at
/// [`STRIDE`], or the left-hand side's own rows), the columns' from a panel laid out as
/// [`PanelLayout::of`] `isa` and `depth` says.
///
/// # Safety
/// `isa`'s vector set must be available ([`BlockIsa::isa`]). `rows` holds `tile.rows`
/// (1 to [`ROWS`]) rows of at least `depth` values at stride `rows_rs`; `cols` holds
/// `depth · COLS` values at a 64-byte boundary; `tile.out` is valid for writes of
/// `tile.width` elements at each of its `tile.rows` rows (and for reads, of initialized
/// values, with [`Start::Dst`]), and no other thread touches them during the call; a
/// [`Start::Row`] pointer is valid for reads of `tile.width` values.
pub(super) unsafe fn multiply(
    isa: BlockIsa,
    depth: usize,
    rows: *const f32,
    rows_rs: usize,
    cols: *const f32,
    tile: Tile,
) {
    debug_assert!((1..=ROWS).contains(&tile.rows) && depth <= STRIDE);
    debug_assert!((1..=COLS).contains(&tile.width));
    // SAFETY: the caller's contract, with `isa`'s vector set available.
    unsafe {
        match isa {
            BlockIsa::Avx512 => avx512::multiply(depth, rows, rows_rs, cols, tile),
            BlockIsa::Avx2 => avx2::multiply(depth, rows, rows_rs, cols, tile),
        }
    }
}

/// Asks for the cache lines of a tile's `R` destination rows, `cols` columns from
/// `tile.out` (the first and last of each row, and every 64 bytes between): the block
/// writes them (and perhaps reads them) once, at its end.
#[inline(always)]
fn prefetch_destination<const R: usize>(tile: &Tile, cols: usize) {
    let bytes = 4 * cols.max(1);
    for i in 0..R {
        let row = tile.out.wrapping_add(i * tile.out_rs) as *const i8;
        for at in (0..bytes).step_by(64).chain([bytes - 1]) {
            // SAFETY: a prefetch is a hint: it reads nothing and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(at)) };
        }
    }
}

/// One vector set's `f32` registers and the operations [`block`] needs. Each method is
/// `#[inline(always)]` and called only from a block compiled with its set
/// (`#[target_feature]`), where the intrinsics inline into one loop.
pub(super) trait Vectors {
    /// A register of `LANES` values.
    type Reg: Copy;
    /// `f32` lanes of a register.
    const LANES: usize;
    /// A register of zeros.
    ///
    /// # Safety
    /// The vector set is available.
    unsafe fn zero() -> Self::Reg;
    /// `LANES` values at `at`, aligned to the register's size.
    ///
    /// # Safety
    /// The vector set is available; `at` is so aligned and valid for reads of `LANES` values.
    unsafe fn load_aligned(at: *const f32) -> Self::Reg;
    /// `value` in every lane.
    ///
    /// # Safety
    /// The vector set is available.
    unsafe fn splat(value: f32) -> Self::Reg;
    /// `a · b + c`, fused.
    ///
    /// # Safety
    /// The vector set is available.
    unsafe fn fma(a: Self::Reg, b: Self::Reg, c: Self::Reg) -> Self::Reg;
    /// `a · b`.
    ///
    /// # Safety
    /// The vector set is available.
    unsafe fn mul(a: Self::Reg, b: Self::Reg) -> Self::Reg;
    /// `a + b`.
    ///
    /// # Safety
    /// The vector set is available.
    unsafe fn add(a: Self::Reg, b: Self::Reg) -> Self::Reg;
    /// The first `lanes` (at most `LANES`) values at `at`, the rest zero.
    ///
    /// # Safety
    /// The vector set is available; `at` is valid for reads of `lanes` values.
    unsafe fn load_first(at: *const f32, lanes: usize) -> Self::Reg;
    /// Stores the first `lanes` (at most `LANES`) values of `value` at `at`.
    ///
    /// # Safety
    /// The vector set is available; `at` is valid for writes of `lanes` values.
    unsafe fn store_first(at: *mut f32, lanes: usize, value: Self::Reg);
}

/// [`multiply`] for one block of `S`'s registers `V` wide (`tile.width` at most
/// `V · S::LANES`), compiled per row count so that its sums stay in registers.
///
/// # Safety
/// As for [`multiply`], with `S`'s vector set available and `cols` the block's strip of
/// the panel ([`PanelLayout`]): `depth · V · S::LANES` values, aligned to a register.
#[inline(always)]
unsafe fn block<S: Vectors, const V: usize>(
    depth: usize,
    lhs: (*const f32, usize),
    cols: *const f32,
    tile: Tile,
) {
    // SAFETY: the caller's contract, for every row count.
    unsafe {
        match tile.rows {
            0 => {}
            1 => rows_block::<S, 1, V>(depth, lhs, cols, tile),
            2 => rows_block::<S, 2, V>(depth, lhs, cols, tile),
            3 => rows_block::<S, 3, V>(depth, lhs, cols, tile),
            4 => rows_block::<S, 4, V>(depth, lhs, cols, tile),
            5 => rows_block::<S, 5, V>(depth, lhs, cols, tile),
            _ => rows_block::<S, ROWS, V>(depth, lhs, cols, tile),
        }
    }
}

/// [`block`] for `R` rows: the destination asked for, the sums, then [`finish`].
///
/// # Safety
/// As for [`block`], with `tile.rows == R`.
#[inline(always)]
unsafe fn rows_block<S: Vectors, const R: usize, const V: usize>(
    depth: usize,
    lhs: (*const f32, usize),
    cols: *const f32,
    tile: Tile,
) {
    prefetch_destination::<R>(&tile, tile.width);
    // SAFETY: the caller's contract.
    unsafe { finish::<S, R, V>(accumulate::<S, R, V>(depth, lhs, cols), &tile) }
}

/// Stores `sums` into `tile`: each scaled by `beta`, then added to what [`Start`] says,
/// the lanes past `tile.width` neither read nor written.
///
/// # Safety
/// `S`'s vector set is available; `tile.out` is valid for writes of `tile.width` (at most
/// `V · S::LANES`) elements at each of its `R` rows (and for reads, of initialized values,
/// with [`Start::Dst`]); a [`Start::Row`] pointer is valid for reads of `tile.width`
/// values.
#[inline(always)]
unsafe fn finish<S: Vectors, const R: usize, const V: usize>(sums: [[S::Reg; V]; R], tile: &Tile) {
    let lanes = lanes_within::<V>(tile.width, S::LANES);
    // SAFETY: the caller's contract; `load_first` and `store_first` stay inside each
    // vector's `lanes` (0 for a vector past the width, which is skipped), and the
    // destination is read only with `Start::Dst`.
    unsafe {
        let beta = S::splat(tile.beta);
        let row: Option<[S::Reg; V]> = match tile.start {
            Start::Row(values) => {
                let mut row = [S::zero(); V];
                for (v, (slot, &n)) in row.iter_mut().zip(&lanes).enumerate() {
                    *slot = S::load_first(values.wrapping_add(S::LANES * v), n);
                }
                Some(row)
            }
            Start::Zero | Start::Dst => None,
        };
        for (i, sum) in sums.iter().enumerate() {
            let out = tile.out.add(i * tile.out_rs);
            for (v, (&s, &n)) in sum.iter().zip(&lanes).enumerate() {
                if n == 0 {
                    continue;
                }
                let at = out.wrapping_add(S::LANES * v);
                let mut value = S::mul(s, beta);
                if tile.start == Start::Dst {
                    value = S::add(S::load_first(at, n), value);
                } else if let Some(&start) = row.as_ref().and_then(|row| row.get(v)) {
                    value = S::add(start, value);
                }
                S::store_first(at, n, value);
            }
        }
    }
}

/// The sums of an `R`-row block `V` registers wide over `depth` steps: row `i`'s value at
/// each step (from `rows`, row `i` at `i · rows_rs`) times the step's `V` column registers
/// (from `cols`, a strip of [`PanelLayout`]: the steps' `V · S::LANES` values one after
/// the other), one FMA chain per register in depth order.
///
/// Each row's value is read at its own start plus the step, the starts passed through
/// [`opaque`] so that the compiler keeps each in a register: the six-row loop is then its
/// loads, broadcasts and FMAs and four instructions more (the step's count, the panel's
/// pointer, a compare and the branch). With the rows read at `rows + i · rows_rs` the
/// compiler rebuilt most of the six addresses every step, five or four instructions more;
/// in `llvm-mca`'s models of cores that dispatch four instructions a cycle, that held the
/// AVX2 loop below its FMA rate (`benches/RESULTS.md`, "Row starts the compiler cannot
/// rebuild"). A test of the optimized build (`compiled_loops`, run by CI) reads the
/// compiled loops back and fails if a loop spills or the six-row loop grows past those
/// four; `scripts/kernel_loops.py` prints its counts and models the loops on other CPUs.
///
/// The loop takes [`STEPS_PER_PASS`] steps a pass ([`depth_step`] each; the last
/// `depth % STEPS_PER_PASS` steps one at a time after it), so those four instructions come
/// once per four steps: the six-row loop is 21 instructions a step on AVX2 (24 at one step
/// a pass) and 35 on AVX-512 (38). The one-step loop already ran at the FMA rate on a core
/// of its own, but on a core whose front end issues four instructions a cycle (`llvm-mca`'s
/// Haswell and Zen 2) AVX2's 24 left no room, and on a shared host it lost more than
/// AVX-512's loop in the busy moments (another guest on the core's other hardware thread,
/// we suspect: no counter was read). On an AMD EPYC Zen 4 (family 25 model 17), paired in
/// one process, the route's products held to AVX2 took 0.96–1.02 × the one-step loop's time
/// (medians, 17 of 20 at or below 1; the host's busy moments gave the lowest and the
/// highest) and on AVX-512 0.99–1.01. Replicas of the AVX2 loop alone on both cores at once
/// (`scripts/loop_bursts.py` and the scratch program it came from, four runs of two
/// minutes) kept 83–87% of their best rate at their 5th percentile at four steps a pass,
/// 76–82% at one (`benches/RESULTS.md`, "Four steps a pass"). The bits are the same: each
/// register's chain is still in depth order.
///
/// # Safety
/// `S`'s vector set is available; `rows` holds `R` rows of `depth` values at `rows_rs`;
/// `cols` holds `depth · V · S::LANES` values, aligned to a register.
#[inline(always)]
unsafe fn accumulate<S: Vectors, const R: usize, const V: usize>(
    depth: usize,
    (rows, rows_rs): (*const f32, usize),
    cols: *const f32,
) -> [[S::Reg; V]; R] {
    // SAFETY: the caller's contract bounds every load.
    unsafe {
        let mut sums = [[S::zero(); V]; R];
        // `wrapping_add`: with `depth` 0 the rows need not exist. `opaque` hands back the
        // same pointer, so each start is row `i`'s and the loads below stay in the rows.
        let row_starts: [*const f32; R] =
            std::array::from_fn(|i| opaque(rows.wrapping_add(i * rows_rs)));
        let passes_end = depth - depth % STEPS_PER_PASS;
        let mut k = 0;
        while k < passes_end {
            for u in 0..STEPS_PER_PASS {
                depth_step::<S, R, V>(&mut sums, &row_starts, cols, k + u);
            }
            k += STEPS_PER_PASS;
        }
        while k < depth {
            depth_step::<S, R, V>(&mut sums, &row_starts, cols, k);
            k += 1;
        }
        sums
    }
}

/// Steps of depth per pass of [`accumulate`]'s loop.
const STEPS_PER_PASS: usize = 4;

/// Step `k` of [`accumulate`]: each row's value at `k` times the step's `V` column
/// registers (the strip's `V · S::LANES` values from `k · V · S::LANES` on), added to the
/// row's sums.
///
/// # Safety
/// `S`'s vector set is available; each of `row_starts` is valid for a read at `k`; `cols`
/// holds more than `k` steps of `V · S::LANES` values, aligned to a register.
#[inline(always)]
unsafe fn depth_step<S: Vectors, const R: usize, const V: usize>(
    sums: &mut [[S::Reg; V]; R],
    row_starts: &[*const f32; R],
    cols: *const f32,
    k: usize,
) {
    // SAFETY: the caller's contract.
    unsafe {
        let step = cols.add(k * V * S::LANES);
        let column: [S::Reg; V] = std::array::from_fn(|v| S::load_aligned(step.add(S::LANES * v)));
        for (sum, &row) in sums.iter_mut().zip(row_starts) {
            let ai = S::splat(*row.add(k));
            for (s, &c) in sum.iter_mut().zip(&column) {
                *s = S::fma(ai, c, *s);
            }
        }
    }
}

/// `at`, passed through an empty `asm!` block: the same address, which the compiler can no
/// longer tell is `rows + i · rows_rs`, so it keeps each row's start in a register of its
/// own rather than rebuilding it from the others inside the loop ([`accumulate`]).
#[inline(always)]
#[expect(
    clippy::pointers_in_nomem_asm_block,
    reason = "the block reads and writes no memory: it hands the address back as it was"
)]
fn opaque(at: *const f32) -> *const f32 {
    let mut at = at;
    // SAFETY: the template is a comment (an `asm!` must name each operand, hence `{0}`):
    // no instruction runs, nothing is read, written or jumped to, and `at` comes back
    // unchanged.
    unsafe {
        std::arch::asm!("/* {0} */", inout(reg) at, options(pure, nomem, nostack, preserves_flags))
    };
    at
}

/// How many lanes of each of a row's `VECTORS` vectors of `lanes` lanes fall within
/// `width` columns: full vectors, then the rest, then none.
fn lanes_within<const VECTORS: usize>(width: usize, lanes: usize) -> [usize; VECTORS] {
    std::array::from_fn(|v| width.saturating_sub(lanes * v).min(lanes))
}

#[cfg(test)]
mod tests {
    use super::{lanes_within, BlockIsa, PanelLayout, COLS};

    /// Each block's panel layout puts every element of a panel at its own index within
    /// the panel, each strip's step contiguous and the strip's steps one after the other;
    /// AVX-512's is the plain `k · COLS + j`.
    #[test]
    fn panel_layouts_place_each_element_once() {
        for isa in BlockIsa::ALL {
            for depth in [1, 7, 384, 448] {
                let layout = PanelLayout::of(isa, depth);
                let mut seen = vec![false; depth * COLS];
                for k in 0..depth {
                    for j in 0..COLS {
                        let at = layout.at(k, j);
                        assert!(
                            !std::mem::replace(&mut seen[at], true),
                            "{isa:?} ({k}, {j})"
                        );
                        if j % layout.strip > 0 {
                            assert_eq!(at, layout.at(k, j - 1) + 1, "{isa:?} ({k}, {j})");
                        } else if k > 0 {
                            let strip_end = layout.at(k - 1, j + layout.strip - 1);
                            assert_eq!(at, strip_end + 1, "{isa:?} ({k}, {j})");
                        }
                    }
                }
                assert!(seen.iter().all(|&s| s), "{isa:?} at depth {depth}");
            }
        }
        assert_eq!(
            PanelLayout::of(BlockIsa::Avx512, 5).at(3, 17),
            3 * COLS + 17
        );
        assert_eq!(
            PanelLayout::of(BlockIsa::Avx2, 5).at(3, 17),
            5 * 16 + 3 * 16 + 1
        );
    }

    #[test]
    fn lanes_cover_exactly_the_width() {
        for lanes in [8, 16] {
            for width in 0..=64 {
                let each = lanes_within::<4>(width, lanes);
                assert_eq!(each.iter().sum::<usize>(), width.min(4 * lanes));
                assert!(each.windows(2).all(|w| w[0] >= w[1]), "{each:?}");
                assert!(each.iter().all(|&n| n <= lanes));
            }
        }
    }
}
