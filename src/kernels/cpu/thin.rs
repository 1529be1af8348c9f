//! Products with one short side besides a long row count: a LoRA layer's low-rank
//! products, where the rank `r` is the inner dimension or the output's width — `x Aᵀ`
//! (`n × d_in` by `d_in × r`), `(x Aᵀ) Bᵀ` (inner `r`), `g B`, `(g B) A` and
//! `dB = gᵀ (x Aᵀ)` (`d_out × n` by `n × r`). Those `r` wide with `r` below a vector's
//! lanes, and `dB` a full vector wide once `g` is at least one core's L2, go to the decode
//! kernel, transposed, before this route ([`super::gemv`]'s `transposed`).
//!
//! With the destination's rows cut into one contiguous range per thread, each range one
//! single-threaded `gemm` call, each of these took 15–45% less time than through the
//! `gemm` crate's own threading. On an Intel Xeon (AVX-512, 2 threads, f32, `n = 512`
//! rows), the five products of a LoRA step took 0.85–1.02 ms split against 1.23–1.35
//! through the `gemm` crate at `d = 1024`, `r = 16`, and 1.76–2.08 against 2.17–2.48 at
//! `d = 2048`; 8–20% less at `r = 64` and `128`; about even at `r = 256` (`x Aᵀ` and
//! `(x Aᵀ) Bᵀ` slower, the others faster); slower from `r = 512` on (`benches/RESULTS.md`,
//! "Thin products"). So a product whose inner dimension or width is at most one chunk of
//! the column-major route ([`super::col_major::chunk_width`]: `8 · lanes`, 128 `f32` with
//! AVX-512, 64 with AVX2), and whose row count is longer than that, is split this way.
//!
//! Any column-major right-hand side with more than one column and fewer columns than rows
//! is copied row-major, once per call, its rows spread over the threads, before the split
//! ([`factor_to_row_major`]). The one a LoRA step has is `x Aᵀ`'s factor, which comes as
//! `Aᵀ` (`d_in × r`), a column-major view of the row-major `A` (`r × d_in`); only its
//! shapes were timed, in `f32`, on an AMD EPYC Zen 4 (family 25 model 17, 2 threads,
//! `n = 512` rows; `benches/RESULTS.md`, "`x Aᵀ`'s factor copied row-major"):
//! - the split on the view took 1.57–1.73 × the time of the split on a row-major factor
//!   at `r` = 64 and 128 (`d = 1024`, and 2048 at `r = 64`). The copy and split together
//!   took 0.67–0.68 × the split on the view at `r = 128` (`d` = 1024–4096) and `r = 64`
//!   (`d = 4096`), two runs, and 0.93–0.95 × at `r = 16`. In two runs before, a copy made
//!   on the calling thread had taken 0.74–0.84 × there (0.94–1.03 × at `r = 16`);
//! - with the copy, a LoRA layer's training step took 0.97–0.99 × the time without it at
//!   `r = 128` and 0.99 × at `r = 64`, and 0.97–1.01 × at `r` ≤ 32 and for DoRA at `r` =
//!   16 and 64 (DoRA not timed at 128), within the host's noise (one paired run at each of
//!   `d` = 1024 and 2048);
//! - `(x Aᵀ) Bᵀ`'s column-major `Bᵀ`, whose inner dimension is the short side, is not
//!   copied: copy and split took 1.12–1.30 × the split on the view.
//!
//! The copy changes no bit of the parts this route makes: the `gemm` crate runs the same
//! general kernels in the same order on either layout. (Its dot-product kernels, which
//! only a column-major right-hand side gets, take products of at most 256 elements, and no
//! part here is one: [`parts_keep_the_general_kernels`].) `tests/suite/thread_determinism.rs`
//! checks it at `r = 16`, where one thread hands the `gemm` crate the view. Not timed on an
//! Intel Xeon; the Xeon's numbers above predate the copy.
//!
//! Kept on the `gemm` crate's own path:
//! - products too small for it to thread (`m · k · n` below its threading threshold);
//! - splits that would give a part other kernels of the `gemm` crate than the whole
//!   product gets ([`parts_keep_the_general_kernels`]), whose rounding differs, so that
//!   outputs would depend on the thread count (`tests/suite/thread_determinism.rs`): a
//!   part of 64 rows or fewer (products of at most 64 × 64 go through a shortcut that
//!   blocks the inner dimension differently: 512 at a time, against an even split), or
//!   of at most 256 elements (dot-product kernels along the inner dimension, which take
//!   such products when one to three columns wide);
//! - products with a short row count and a long width (`dA = (g B)ᵀ x`, `r × d_in`):
//!   splitting them, by columns or along the inner dimension, was faster at
//!   `d_in = 1024` and slower at 2048 and 4096 (same machine).
//!
//! Each element is still one dot over the whole inner dimension, by the same kernel in
//! the same order as in the whole product, so the split changes no bit of the result.

use candle_core::WithDType;
use rayon::prelude::*;

use super::col_major::chunk_width;
use super::machine::{machine, Machine};
use super::pool::Scratch;
use super::transpose::{row_major_copy, CopyOn};
use super::{check_product, gemm_checked, MatProduct, MatRef};

/// The most rows (and columns) of a product that the `gemm` crate's small-product
/// shortcut takes (module docs).
const GEMM_SHORTCUT_ROWS: usize = 64;

/// The most elements of a product that the `gemm` crate's dot-product kernels take
/// (module docs).
const GEMM_DOT_KERNEL_ELEMENTS: usize = 256;

/// Whether every part of an `m`-row, `n`-column product cut into `parts` row ranges (the
/// smallest `m / parts` rows) goes through the `gemm` crate's general kernels, as a whole
/// product with more rows does: more than 64 rows and more than 256 elements.
fn parts_keep_the_general_kernels(m: usize, n: usize, parts: usize) -> bool {
    let rows = m / parts.max(1);
    rows > GEMM_SHORTCUT_ROWS && rows.saturating_mul(n) > GEMM_DOT_KERNEL_ELEMENTS
}

/// Whether an `m × k` by `k × n` product on `threads` threads takes this route, for
/// elements of `size` bytes on `machine`.
fn takes(m: usize, k: usize, n: usize, threads: usize, size: usize, machine: &Machine) -> bool {
    let short = chunk_width(size, machine);
    threads > 1
        && k.min(n) <= short
        && m > short
        && parts_keep_the_general_kernels(m, n, threads)
        && m.saturating_mul(k).saturating_mul(n) >= gemm::get_threading_threshold()
}

/// Runs [`super::gemm_into`]'s product split over the threads and returns `Some`, or
/// `None` when it does not take this route (module docs). The caller has checked the
/// shapes and that `dst` holds the `m × n` result at row stride `dst_rs ≥ n`.
pub(super) fn reroute<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
) -> Option<candle_core::Result<()>> {
    let threads = rayon::current_num_threads();
    takes_product(&product).then(|| split_rows(dst, dst_rs, product, threads))
}

/// Whether [`reroute`] takes `product` on rayon's threads here (module docs).
pub(super) fn takes_product<T: WithDType>(product: &MatProduct<T>) -> bool {
    let (m, k, n) = (product.lhs.rows, product.lhs.cols, product.rhs.cols);
    let threads = rayon::current_num_threads();
    takes(m, k, n, threads, std::mem::size_of::<T>(), machine())
}

/// A row-major copy of `rhs` when it is a column-major view of more than one column whose
/// width is its short side (such as `Aᵀ` in `x Aᵀ`, module docs), from the pool, its rows copied
/// on rayon's threads; `None` for any other operand (one column is contiguous either way).
fn factor_to_row_major<T: WithDType>(rhs: MatRef<T>) -> Option<Scratch<T>> {
    let (k, n) = (rhs.rows(), rhs.cols());
    let column_major = rhs.rs == 1 && rhs.cs != 1 && n > 1;
    (column_major && n < k).then(|| row_major_copy(rhs, CopyOn::Pool))
}

/// The product with `dst`'s rows cut into `parts` contiguous ranges, as evenly as whole
/// rows allow, one single-threaded `gemm` call each on rayon's pool.
fn split_rows<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
    parts: usize,
) -> candle_core::Result<()> {
    let (lhs, rhs, accum, beta) = product.parts();
    let copy = factor_to_row_major(rhs);
    let rhs = match &copy {
        Some(copy) => MatRef::contiguous(copy, rhs.rows(), rhs.cols())?,
        None => rhs,
    };
    let m = lhs.rows();
    let parts = parts.clamp(1, m.max(1));
    let mut pieces = Vec::with_capacity(parts);
    let mut rest = dst;
    for part in 0..parts {
        let (start, end) = (part * m / parts, (part + 1) * m / parts);
        let len = match end == m {
            true => rest.len(),
            false => ((end - start) * dst_rs).min(rest.len()),
        };
        let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
        pieces.push((start, end - start, piece));
        rest = tail;
    }
    pieces.into_par_iter().try_for_each(|(start, rows, piece)| {
        let part = MatProduct::new(lhs.rows_range(start, rows)?, rhs, accum, beta);
        let (lhs, rhs, accum, _) = part.parts();
        if check_product(piece, dst_rs, lhs, rhs, accum)? {
            gemm_checked(piece, dst_rs, part, gemm::Parallelism::None);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::super::machine::Isa;
    use super::super::{assert_matches_triple_loop, gemm_into, test_values as vals, Accum, MatRef};
    use super::*;

    const AVX512: Machine = Machine::AVX512_SERVER;

    /// The products of a LoRA step at `n = 512`, `d = 1024`, `r = 16` take the route on two
    /// threads with AVX-512 (`f32`); `dA`, the base products, a rank past one chunk, one
    /// thread, and too few rows per thread do not. (This route's own rule: in
    /// [`gemm_into`] the narrower results among them, fewer columns than a vector's lanes,
    /// and this `dB`, whose `g` is one L2, go to the decode kernel's transposed route
    /// first.)
    #[test]
    fn the_low_rank_products_take_the_route() {
        let takes2 = |m, k, n| takes(m, k, n, 2, 4, &AVX512);
        assert!(takes2(512, 1024, 16)); // x Aᵀ, g B
        assert!(takes2(512, 16, 1024)); // (x Aᵀ) Bᵀ, (g B) A
        assert!(takes2(1024, 512, 16)); // dB
        assert!(takes2(512, 128, 1024)); // r = 128: one chunk
        assert!(!takes2(16, 512, 1024)); // dA
        assert!(!takes2(512, 1024, 1024)); // the base products
        assert!(!takes2(512, 256, 1024)); // r = 256
        assert!(!takes(512, 1024, 16, 1, 4, &AVX512)); // one thread
        assert!(!takes2(129, 1024, 16)); // 64 rows and one more: the shortcut's reach
        assert!(takes2(130, 1024, 16));
        // One to three columns: more than 256 elements a part.
        assert!(!takes2(200, 2048, 2));
        assert!(takes2(258, 2048, 2));
        assert!(!takes2(300, 2048, 1) && takes2(514, 2048, 1));
        // With AVX2 a chunk is 64 `f32`: r = 128 stays on the `gemm` crate.
        let avx2 = Machine {
            isa: Isa::Avx2,
            ..AVX512
        };
        assert!(!takes(512, 128, 1024, 2, 4, &avx2));
        assert!(takes(512, 64, 1024, 2, 4, &avx2));
    }

    /// Split into 1–4 parts of more than 64 rows, the products give the `gemm` crate's
    /// whole-product result bit for bit and match an f64 triple loop, in `f64` and `f32`,
    /// with a padded destination, a column-major (copied row-major first where its width
    /// is the short side: `x Aᵀ`'s factor) and a padded row-major operand, accumulation and
    /// `beta`.
    #[test]
    fn split_products_match_the_whole_product_bit_for_bit() -> candle_core::Result<()> {
        split_products_match_whole_ones::<f64>(1e-12)?;
        split_products_match_whole_ones::<f32>(1e-6)
    }

    fn split_products_match_whole_ones<T: WithDType>(tol: f64) -> candle_core::Result<()> {
        let vals = |len: usize, seed: f64| -> Vec<T> {
            vals(len, seed).into_iter().map(T::from_f64).collect()
        };
        for (m, k, n) in [(300, 700, 9), (300, 9, 130), (260, 520, 16), (400, 2048, 2)] {
            let lhs_data = vals(m * (k + 2), 0.37);
            let lhs = MatRef::new(&lhs_data, m, k, k + 2, 1)?;
            let rhs_data = vals((k + 3) * n, 0.71);
            // Column-major inside a taller buffer, then row-major.
            let rhs_views = [
                MatRef::new(&rhs_data, k, n, 1, k + 3)?,
                MatRef::contiguous(&rhs_data[..k * n], k, n)?,
            ];
            for rhs in rhs_views {
                for (accum, beta) in [(Accum::Replace, 1.0), (Accum::Add, -0.5)] {
                    let beta = T::from_f64(beta);
                    let dst_rs = n + 2;
                    let start = vals(m * dst_rs, 1.3);
                    let mut whole = start.clone();
                    let product = MatProduct::new(lhs, rhs, accum, beta);
                    // The reference: the whole product, the `gemm` crate on one thread.
                    assert!(check_product(&mut whole, dst_rs, lhs, rhs, accum)?);
                    gemm_checked(&mut whole, dst_rs, product, gemm::Parallelism::None);
                    let context = format!(
                        "{}, {m}x{k}x{n}, rhs strides {}, {}",
                        T::DTYPE.as_str(),
                        rhs.rs,
                        rhs.cs
                    );
                    // As the route splits: parts that keep the general kernels.
                    for parts in (1..=5).filter(|&p| parts_keep_the_general_kernels(m, n, p)) {
                        let mut split = start.clone();
                        split_rows(&mut split, dst_rs, product, parts)?;
                        assert!(
                            split
                                .iter()
                                .zip(&whole)
                                .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits()),
                            "{context}, {parts} parts: not the whole product's bits"
                        );
                    }
                    assert_matches_triple_loop(&whole, &start, dst_rs, product, tol, &context);
                    // And through `gemm_into`, whichever route it takes here.
                    let mut routed = start.clone();
                    gemm_into(&mut routed, dst_rs, lhs, rhs, accum, beta)?;
                    for (a, b) in routed.iter().zip(&whole) {
                        let (a, b) = (a.to_f64(), b.to_f64());
                        assert!(
                            (a - b).abs() <= tol * (1.0 + b.abs()) * k as f64,
                            "{context}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// `x Aᵀ`'s factor, a column-major view as wide as the rank, is copied row-major with
    /// its values in place; `(x Aᵀ) Bᵀ`'s (column-major, its inner dimension the short
    /// side), row-major operands and a single column are not copied.
    #[test]
    fn only_a_column_major_factor_as_wide_as_the_rank_is_copied() -> candle_core::Result<()> {
        let (r, d) = (16, 700);
        let a = vals(r * d, 0.3);
        let a_t = MatRef::contiguous(&a, r, d)?.t();
        let copy = factor_to_row_major(a_t).expect("x Aᵀ's factor is copied");
        assert_eq!(copy.len(), d * r);
        for i in 0..d {
            for j in 0..r {
                assert_eq!(
                    copy[i * r + j].to_bits(),
                    a_t.at(i, j).to_bits(),
                    "({i}, {j})"
                );
            }
        }
        let b = vals(d * r, 0.7);
        assert!(factor_to_row_major(MatRef::contiguous(&b, d, r)?.t()).is_none()); // Bᵀ
        assert!(factor_to_row_major(MatRef::contiguous(&b, d, r)?).is_none()); // B
        let column = MatRef::new(&b, d, 1, 1, d)?; // one column of a column-major view
        assert!(factor_to_row_major(column).is_none());
        Ok(())
    }
}
