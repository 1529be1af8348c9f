//! The panels of [`super`]: the left-hand side's rows read where they are
//! ([`rows_in_place`]) or, for a step of two pieces (the last, where a LoRA term joins it),
//! copied into a row panel (up to [`ROWS`] rows, each [`STRIDE`] apart); and the column
//! panels of a block of the right-hand side ([`COLS`] columns each, laid out for the
//! register block that reads them, [`PanelLayout`]; zero past the block's last column),
//! each from one or two pieces of depth ([`Piece`]).

use std::arch::x86_64::{
    __m256, __m512, __m512d, _mm256_loadu_ps, _mm256_permute2f128_ps, _mm256_shuffle_ps,
    _mm256_storeu_ps, _mm256_unpackhi_ps, _mm256_unpacklo_ps, _mm512_castpd_ps, _mm512_castps_pd,
    _mm512_loadu_ps, _mm512_shuffle_f32x4, _mm512_storeu_ps, _mm512_unpackhi_pd,
    _mm512_unpackhi_ps, _mm512_unpacklo_pd, _mm512_unpacklo_ps,
};

use super::kernel::{BlockIsa, PanelLayout, COLS, ROWS, STRIDE};
use crate::kernels::cpu::MatRef;

/// A slice of an operand along the depth: its depth `k0 .. k0 + depth`, each value packed
/// times `scale` (row panels; column panels are packed as they stand). A step's panels
/// are one or two pieces one after the other: the base product's depth slice, then a
/// second term's whole depth.
#[derive(Clone, Copy, Debug)]
pub(super) struct Piece<'a> {
    pub mat: MatRef<'a, f32>,
    pub k0: usize,
    pub depth: usize,
    pub scale: f32,
}

/// Rows or columns `start .. start + len` of the destination.
#[derive(Clone, Copy, Debug)]
pub(super) struct Extent {
    pub start: usize,
    pub len: usize,
}

/// The error of a view or panel shorter than a piece needs.
fn short(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("packed product: {what} shorter than its view"))
}

/// Rows `rows` of a step `depth` deep whose single left-hand-side piece the register block
/// can read in place: the piece's values from its first row's first element of the step
/// to its last row's last, and its row stride. `None` (then [`row_panel`] copies the rows)
/// when the step has a second piece, a scaled one or one of another depth, rows not
/// contiguous, no rows, or rows past the piece's values.
pub(super) fn rows_in_place<'a>(
    pieces: &[Piece<'a>],
    rows: Extent,
    depth: usize,
) -> Option<(&'a [f32], usize)> {
    let [piece] = pieces else { return None };
    let mat = piece.mat;
    if piece.scale != 1.0 || mat.cs != 1 || piece.depth != depth {
        return None;
    }
    let last_row = rows.start.checked_add(rows.len.checked_sub(1)?)?;
    let from = rows.start.checked_mul(mat.rs)?.checked_add(piece.k0)?;
    let last = last_row.checked_mul(mat.rs)?.checked_add(piece.k0)?;
    let values = mat.data.get(from..last.checked_add(depth)?)?;
    Some((values, mat.rs))
}

/// Copies rows `rows` (at most [`ROWS`]) of the left-hand-side pieces (each with
/// contiguous rows, `cs == 1`), one piece after the other along each row (together at
/// most [`STRIDE`] deep), into `out`, row `i` at `i · STRIDE`.
pub(super) fn row_panel(
    pieces: &[Piece],
    rows: Extent,
    out: &mut [f32],
) -> candle_core::Result<()> {
    debug_assert!(rows.len <= ROWS);
    for i in 0..rows.len {
        let mut at = i * STRIDE;
        for piece in pieces {
            let (mat, depth) = (piece.mat, piece.depth);
            debug_assert!(mat.cs == 1);
            let from = (rows.start + i) * mat.rs + piece.k0;
            let src = mat
                .data
                .get(from..from + depth)
                .ok_or_else(|| short("a row"))?;
            let dst = out
                .get_mut(at..at + depth)
                .ok_or_else(|| short("a row panel"))?;
            if piece.scale == 1.0 {
                dst.copy_from_slice(src);
            } else {
                dst.iter_mut()
                    .zip(src)
                    .for_each(|(d, v)| *d = piece.scale * v);
            }
            at += depth;
        }
    }
    Ok(())
}

/// Packs columns `cols` of the right-hand-side pieces (each with contiguous rows,
/// `cs == 1`, or columns, `rs == 1`: a transposed row-major matrix such as `Wᵀ`) into
/// `out`: column panel `p` (columns `cols.start + p · COLS ..`) at `p · depth · COLS`
/// for the pieces' total `depth`, element `(k, j)` of a panel where
/// [`PanelLayout::of`] `isa` and `depth` puts it (`k · COLS + j` for AVX-512), the pieces
/// one after the other along `k`, zero past the last column; with `isa`'s vectors (an
/// error where this CPU lacks them).
pub(super) fn column_panels(
    pieces: &[Piece],
    cols: Extent,
    out: &mut [f32],
    isa: BlockIsa,
) -> candle_core::Result<()> {
    if !isa.isa().available() {
        return Err(candle_core::Error::Msg(format!(
            "packed product: {isa:?} is not available"
        )));
    }
    let depth: usize = pieces.iter().map(|piece| piece.depth).sum();
    let layout = PanelLayout::of(isa, depth);
    let panel_len = depth * COLS;
    for (p, j0) in (cols.start..cols.start + cols.len)
        .step_by(COLS)
        .enumerate()
    {
        let width = Extent {
            start: j0,
            len: COLS.min(cols.start + cols.len - j0),
        };
        let panel = out
            .get_mut(p * panel_len..(p + 1) * panel_len)
            .ok_or_else(|| short("a column panel"))?;
        let mut k_at = 0;
        for piece in pieces {
            let part = Part {
                panel: &mut *panel,
                layout,
                k_at,
            };
            if piece.mat.cs == 1 {
                panel_from_rows(*piece, width, part, isa)?;
            } else {
                panel_from_columns(*piece, width, part, isa)?;
            }
            k_at += piece.depth;
        }
    }
    Ok(())
}

/// The steps of a column panel that one piece fills: `panel` (all of it, `layout.depth ·
/// COLS` values) from step `k_at`.
struct Part<'a> {
    panel: &'a mut [f32],
    layout: PanelLayout,
    k_at: usize,
}

impl Part<'_> {
    /// The index in the panel of the piece's element `(k, j)`.
    fn at(&self, k: usize, j: usize) -> usize {
        self.layout.at(self.k_at + k, j)
    }

    /// An error unless the panel holds `depth` steps from `k_at`, in `isa`'s layout (whose
    /// strip the vector copies write at; that it divides [`COLS`] is asserted at compile
    /// time in each copy).
    fn check(&self, depth: usize, isa: BlockIsa) -> candle_core::Result<()> {
        let fits = self.k_at + depth <= self.layout.depth
            && self.panel.len() >= self.layout.depth * COLS
            && self.layout.strip == isa.strip();
        match fits {
            true => Ok(()),
            false => Err(short("a column panel")),
        }
    }
}

/// One column panel of a right-hand side with contiguous rows: one copy per depth step
/// (in vector registers where the panel is full: with a `memcpy` call of 256 bytes per
/// step, `memmove` took 8.7% of a forced `g W`'s time, with the row panels' copies; now
/// this copy 5.0% and `memmove` 3.6%). Only [`column_panels`] calls it, having checked
/// that `isa`'s vectors are available.
fn panel_from_rows(
    piece: Piece,
    cols: Extent,
    part: Part,
    isa: BlockIsa,
) -> candle_core::Result<()> {
    let (rhs, depth) = (piece.mat, piece.depth);
    part.check(depth, isa)?;
    let first = piece
        .k0
        .checked_mul(rhs.rs)
        .and_then(|v| v.checked_add(cols.start));
    let last_end = first.and_then(|first| {
        let last_row = (depth.max(1) - 1).checked_mul(rhs.rs)?;
        last_row.checked_add(first)?.checked_add(COLS)
    });
    let fits = last_end.is_some_and(|end| rhs.data.len() >= end);
    if let (true, true, Some(first)) = (cols.len == COLS, fits, first) {
        // SAFETY: `isa`'s vectors are available (checked in `column_panels`); the operand
        // holds `first + (depth - 1) · rs + COLS` values (checked just above, without
        // overflow) and the panel its layout's steps from `k_at`, in `isa`'s strips
        // (`part.check`).
        unsafe {
            match isa {
                BlockIsa::Avx512 => copy_full_rows_avx512(rhs.data, first, rhs.rs, depth, part),
                BlockIsa::Avx2 => copy_full_rows_avx2(rhs.data, first, rhs.rs, depth, part),
            }
        };
        return Ok(());
    }
    for k in 0..depth {
        let from = (piece.k0 + k) * rhs.rs + cols.start;
        let src = rhs
            .data
            .get(from..from + cols.len)
            .ok_or_else(|| short("a row"))?;
        for j in 0..COLS {
            let at = part.at(k, j);
            let slot = part
                .panel
                .get_mut(at)
                .ok_or_else(|| short("a column panel"))?;
            *slot = src.get(j).copied().unwrap_or(0.0);
        }
    }
    Ok(())
}

/// Defines `$name(data, first, rs, depth, part)`, which writes the piece's element
/// `(k, j)`, `data[first + k · rs + j]`, at `part.at(k, j)` for `j < COLS` and
/// `k < depth` with `$feature`'s unaligned loads and stores of `$lanes` values, for a
/// layout of `$strip`-column strips (`$lanes` divides `$strip`, so that each vector's
/// columns are contiguous in the panel; a constant, so that the compiler can step the
/// stores by it).
///
/// The function's safety contract: `$feature` must be available; `data` holds at least
/// `first + (depth - 1) · rs + COLS` values, `part` passes `part.check(depth, isa)` for
/// the `isa` whose strip is `$strip`.
macro_rules! full_rows_copy {
    ($name:ident, $feature:literal, $lanes:literal, $strip:expr, $load:ident, $store:ident) => {
        /// The piece's element `(k, j)` at `part.at(k, j)` (`full_rows_copy`).
        ///
        /// # Safety
        /// As `full_rows_copy` says.
        #[target_feature(enable = $feature)]
        unsafe fn $name(data: &[f32], first: usize, rs: usize, depth: usize, part: Part) {
            const STRIP: usize = $strip;
            const { assert!(STRIP.is_multiple_of($lanes) && COLS.is_multiple_of(STRIP)) };
            debug_assert!(part.layout.strip == STRIP);
            // `part.at(k, j)`, spelled with the strip a constant: `j / STRIP` and
            // `j % STRIP` are constants for each of the row's vectors.
            let (first_step, strip_len) = (part.at(0, 0), part.layout.depth * STRIP);
            for k in 0..depth {
                let step = part.panel.as_mut_ptr().wrapping_add(first_step + k * STRIP);
                // SAFETY: the caller's contract bounds every load and store: `part.at(k, j)`
                // for `k < depth` and `j < COLS` lies in the panel's `layout.depth · COLS`
                // values, and a strip's `$lanes` columns from `j` are contiguous.
                unsafe {
                    let src = data.as_ptr().add(first + k * rs);
                    for j in (0..COLS).step_by($lanes) {
                        let at = step.add(j / STRIP * strip_len + j % STRIP);
                        $store(at, $load(src.add(j)));
                    }
                }
            }
        }
    };
}

full_rows_copy!(
    copy_full_rows_avx512,
    "avx512f",
    16,
    BlockIsa::Avx512.strip(),
    _mm512_loadu_ps,
    _mm512_storeu_ps
);
full_rows_copy!(
    copy_full_rows_avx2,
    "avx2",
    8,
    BlockIsa::Avx2.strip(),
    _mm256_loadu_ps,
    _mm256_storeu_ps
);

/// One column panel of a right-hand side with contiguous columns (each column of the
/// panel a contiguous line of the operand): square blocks of `isa`'s vector width (16 × 16
/// or 8 × 8) transposed in registers, the ragged edges element by element, zero past the
/// last column. Only [`column_panels`] calls it, having checked that `isa`'s vectors are
/// available.
fn panel_from_columns(
    piece: Piece,
    cols: Extent,
    part: Part,
    isa: BlockIsa,
) -> candle_core::Result<()> {
    let (rhs, depth) = (piece.mat, piece.depth);
    part.check(depth, isa)?;
    let mut lines: [&[f32]; COLS] = [&[]; COLS];
    for (j, line) in lines.iter_mut().enumerate().take(cols.len) {
        let from = (cols.start + j) * rhs.cs + piece.k0 * rhs.rs;
        *line = rhs
            .data
            .get(from..)
            .filter(|l| l.len() > (depth.max(1) - 1) * rhs.rs)
            .ok_or_else(|| short("a column"))?;
    }
    let side = match isa {
        BlockIsa::Avx512 => 16,
        BlockIsa::Avx2 => 8,
    };
    let whole_k = if rhs.rs == 1 { depth / side * side } else { 0 };
    let whole_groups = if whole_k > 0 { cols.len / side } else { 0 };
    let strip = part.layout.strip;
    debug_assert!(strip.is_multiple_of(side));
    for (group, square) in lines.chunks_exact(side).take(whole_groups).enumerate() {
        let first = part.at(0, group * side);
        let out = part
            .panel
            .get_mut(first..)
            .ok_or_else(|| short("a column panel"))?;
        if out.len() < (whole_k - 1) * strip + side || square.iter().any(|l| l.len() < whole_k) {
            return Err(short("a column panel"));
        }
        // SAFETY: `isa`'s vectors are available (checked in `column_panels`); `square`
        // holds `side` lines (`chunks_exact`), the lengths of the lines and of `out` were
        // checked just above, at the layout's strip, which is `isa`'s (`part.check`), the
        // one its transpose writes at.
        unsafe {
            match isa {
                BlockIsa::Avx512 => transpose_lines_avx512(square, whole_k, out),
                BlockIsa::Avx2 => transpose_lines_avx2(square, whole_k, out),
            }
        };
    }
    for k in 0..depth {
        let done = if k < whole_k { whole_groups * side } else { 0 };
        for (j, line) in lines.iter().enumerate().skip(done) {
            let at = part.at(k, j);
            let slot = part
                .panel
                .get_mut(at)
                .ok_or_else(|| short("a column panel"))?;
            *slot = line.get(k * rhs.rs).copied().unwrap_or(0.0);
        }
    }
    Ok(())
}

/// Defines `$name(lines, depth, out)`, which writes `out[k · $strip + j] = lines[j][k]`
/// for `$side` contiguous lines and `k < depth` (a multiple of `$side`), `$side × $side`
/// blocks at a time, transposed in `$feature`'s registers by `$transpose`: `$side` columns
/// of a panel in `$strip`-column strips (a constant, as in `full_rows_copy`).
///
/// The function's safety contract: `$feature` must be available; `lines` holds `$side`
/// lines of at least `depth` values each and `out` at least
/// `(depth - 1) · $strip + $side` values.
macro_rules! lines_transpose {
    ($name:ident, $feature:literal, $side:literal, $strip:expr, $vector:ty, $load:ident, $store:ident, $transpose:ident) => {
        /// `out[k · $strip + j] = lines[j][k]` (`lines_transpose`).
        ///
        /// # Safety
        /// As `lines_transpose` says.
        #[allow(clippy::indexing_slicing)] // `lines[j]`, `j < $side`: the caller passes that many
        #[target_feature(enable = $feature)]
        unsafe fn $name(lines: &[&[f32]], depth: usize, out: &mut [f32]) {
            const STRIP: usize = $strip;
            const { assert!(STRIP.is_multiple_of($side) && COLS.is_multiple_of(STRIP)) };
            for k0 in (0..depth).step_by($side) {
                // SAFETY: the caller's contract bounds every load and store.
                unsafe {
                    let block: [$vector; $side] =
                        std::array::from_fn(|j| $load(lines[j].as_ptr().add(k0)));
                    for (k, v) in $transpose(block).into_iter().enumerate() {
                        $store(out.as_mut_ptr().add((k0 + k) * STRIP), v);
                    }
                }
            }
        }
    };
}

lines_transpose!(
    transpose_lines_avx512,
    "avx512f",
    16,
    BlockIsa::Avx512.strip(),
    __m512,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    transpose16
);
lines_transpose!(
    transpose_lines_avx2,
    "avx2",
    8,
    BlockIsa::Avx2.strip(),
    __m256,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    transpose8
);

/// The transpose of an 8 × 8 block of `f32` held as 8 row vectors: pairs interleaved by
/// element, then by pairs, then 128-bit halves gathered.
#[allow(clippy::indexing_slicing)] // fixed 8-element arrays, every index below 8
#[inline(always)]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // SAFETY: register-only intrinsics, under the caller's AVX2.
    unsafe {
        // t[2q], t[2q + 1]: rows 2q and 2q + 1 interleaved, low and high pairs of each lane.
        let t: [__m256; 8] = std::array::from_fn(|i| match i % 2 {
            0 => _mm256_unpacklo_ps(r[i], r[i + 1]),
            _ => _mm256_unpackhi_ps(r[i - 1], r[i]),
        });
        // u[4h + c]: rows 4h .. 4h + 4, element c of each 4-element lane.
        let u: [__m256; 8] = std::array::from_fn(|i| {
            let (b, c) = (i / 4 * 4, i % 4);
            let (x, y) = (t[b + c / 2], t[b + c / 2 + 2]);
            match c % 2 {
                0 => _mm256_shuffle_ps::<0x44>(x, y),
                _ => _mm256_shuffle_ps::<0xee>(x, y),
            }
        });
        std::array::from_fn(|i| match i / 4 {
            0 => _mm256_permute2f128_ps::<0x20>(u[i], u[4 + i]),
            _ => _mm256_permute2f128_ps::<0x31>(u[i - 4], u[i]),
        })
    }
}

/// The transpose of a 16 × 16 block of `f32` held as 16 row vectors: pairs interleaved
/// by element, then by pairs, then 128-bit lanes gathered in two rounds.
#[allow(clippy::indexing_slicing)] // fixed 16-element arrays, every index below 16
#[inline(always)]
unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let pd = |v: __m512| -> __m512d { _mm512_castps_pd(v) };
    let ps = |v: __m512d| -> __m512 { _mm512_castpd_ps(v) };
    // SAFETY: register-only intrinsics, under the caller's AVX-512F.
    unsafe {
        let t: [__m512; 16] = std::array::from_fn(|i| match i % 2 {
            0 => _mm512_unpacklo_ps(r[i], r[i + 1]),
            _ => _mm512_unpackhi_ps(r[i - 1], r[i]),
        });
        // u[4q + c]: rows 4q..4q + 4, element c of each 4-element lane.
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (b, c) = (i / 4 * 4, i % 4);
            let (x, y) = (pd(t[b + c / 2]), pd(t[b + c / 2 + 2]));
            match c % 2 {
                0 => ps(_mm512_unpacklo_pd(x, y)),
                _ => ps(_mm512_unpackhi_pd(x, y)),
            }
        });
        let v: [__m512; 16] = std::array::from_fn(|i| {
            let (g, c) = (i / 4, i % 4);
            let (x, y) = match g {
                0 | 1 => (u[c], u[4 + c]),
                _ => (u[8 + c], u[12 + c]),
            };
            match g % 2 {
                0 => _mm512_shuffle_f32x4::<0x88>(x, y),
                _ => _mm512_shuffle_f32x4::<0xdd>(x, y),
            }
        });
        std::array::from_fn(|i| {
            let (g, c) = (i / 4, i % 4);
            let (x, y) = match g {
                0 | 2 => (v[c], v[8 + c]),
                _ => (v[4 + c], v[12 + c]),
            };
            match g {
                0 | 1 => _mm512_shuffle_f32x4::<0x88>(x, y),
                _ => _mm512_shuffle_f32x4::<0xdd>(x, y),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Column panels hold each piece's values where [`PanelLayout::at`] puts them, for
    /// every block this CPU has: two pieces one after the other along the depth (the
    /// second from step 20), depths that are not a multiple of a transpose's side, and a
    /// ragged last panel zero past its columns; from a row-major operand (vector copies
    /// for full panels) and a transposed one (register transposes, then the remainder).
    #[test]
    fn column_panels_follow_the_layout() -> candle_core::Result<()> {
        let (k, n) = (37, 150);
        let data: Vec<f32> = (0..k * n).map(|v| v as f32 + 1.0).collect();
        let row_major = MatRef::new(&data, k, n, n, 1)?;
        let transposed = MatRef::new(&data, k, n, 1, k)?;
        let cols = Extent { start: 5, len: 145 };
        let panels = cols.len.div_ceil(COLS);
        for isa in BlockIsa::ALL
            .into_iter()
            .filter(|isa| isa.isa().available())
        {
            for mat in [row_major, transposed] {
                let piece = |k0, depth| Piece {
                    mat,
                    k0,
                    depth,
                    scale: 1.0,
                };
                let pieces = [piece(3, 20), piece(0, 16)];
                let depth = 36;
                let mut out = vec![f32::NAN; panels * depth * COLS];
                column_panels(&pieces, cols, &mut out, isa)?;
                let layout = PanelLayout::of(isa, depth);
                for p in 0..panels {
                    for step in 0..depth {
                        let (first, k_at) = if step < 20 { (3, 0) } else { (0, 20) };
                        for j in 0..COLS {
                            let col = p * COLS + j;
                            let want = match col < cols.len {
                                true => mat.at_checked(first + step - k_at, cols.start + col)?,
                                false => 0.0,
                            };
                            let got = out[p * depth * COLS + layout.at(step, j)];
                            assert_eq!(
                                got, want,
                                "{isa:?} rs {}: panel {p}, ({step}, {j})",
                                mat.rs
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A single unscaled piece with contiguous rows is read where it is: from its first
    /// row's first value of the step, at its own row stride, up to its last row's last
    /// value of the step. A second piece, a scale, another depth, strided rows, no rows
    /// and rows past the values are declined (the caller copies them, or errs).
    #[test]
    fn rows_in_place_only_for_one_plain_piece() -> candle_core::Result<()> {
        let data: Vec<f32> = (0..10 * 7).map(|v| v as f32).collect();
        let mat = MatRef::new(&data, 10, 5, 7, 1)?;
        let piece = Piece {
            mat,
            k0: 2,
            depth: 3,
            scale: 1.0,
        };
        let rows = Extent { start: 4, len: 3 };
        let (values, rs) = rows_in_place(&[piece], rows, 3).expect("one plain piece");
        assert_eq!(rs, 7);
        assert_eq!(values.first(), Some(&30.0), "row 4, column 2");
        assert_eq!(values.last(), Some(&46.0), "row 6, column 4");
        assert_eq!(values.len(), 2 * 7 + 3);
        assert!(rows_in_place(&[piece, piece], rows, 3).is_none());
        let scaled = Piece {
            scale: 0.5,
            ..piece
        };
        assert!(rows_in_place(&[scaled], rows, 3).is_none());
        assert!(rows_in_place(&[piece], rows, 4).is_none());
        let strided = Piece {
            mat: MatRef::new(&data, 5, 10, 1, 7)?,
            ..piece
        };
        assert!(rows_in_place(&[strided], Extent { start: 0, len: 3 }, 3).is_none());
        assert!(rows_in_place(&[piece], Extent { start: 4, len: 0 }, 3).is_none());
        // Rows 8 to 10 of a view whose values end with row 9: from 58 to 75, past 70.
        assert!(rows_in_place(&[piece], Extent { start: 8, len: 3 }, 3).is_none());
        Ok(())
    }
}
