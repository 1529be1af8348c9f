//! The decode kernel on the transpose of a product with a narrow result: `dst = L R`
//! with many rows and fewer columns than a vector has lanes (`n` of them) is run as
//! `dstᵀ = Rᵀ Lᵀ`, `n` rows of `Rᵀ` against `L`'s rows, and written back transposed.
//! These are a LoRA layer's low-rank products whose result is `r` wide, at ranks below 16
//! (`f32` with AVX-512; below 8 with AVX2), and `dB` at 16 (8) when `g` is large ("A full
//! vector" below):
//!
//! - `x Aᵀ` and `g B` (`L` row-major, `n × d` by `d × r`): the dots form, `L`'s rows being
//!   the weight rows it streams ([`super::dots`]; `B`'s columns are copied into rows);
//! - `dB = gᵀ (x Aᵀ)` (`L = gᵀ`, whose transpose `g` is row-major, `d_out × n` by
//!   `n × r`): the row-major form, streaming `g`'s rows ([`super::row_major`]).
//!
//! The `gemm` crate lays such a product's result along its vectors, `r` outputs per
//! vector, so below a vector's lanes part of every register idles (half of it at `r = 8`
//! with AVX-512); the decode kernel lays the inner dimension along its vectors instead.
//! On an Intel Xeon (family 6 model 207, AVX-512, 2 threads, `f32`, 512 rows; medians of
//! 100 calls, 5 rounds alternating in one process, on a busy host), the three products
//! of a step together, against the route they took before (the rows split over the
//! threads, [`super::super::thin`]): at `d = 1024` 389 → 253 µs at `r = 8` and 415 → 153
//! at `r = 4`; at `d = 2048` 809 → 479 and 822 → 293 (`benches/RESULTS.md`, "Narrow
//! low-rank products").
//!
//! So the bound is one from what the CPU reports, not a constant fitted to those timings:
//! fewer columns than a vector's lanes (and a full vector for `dB` from a large `g`,
//! below), within each form's own limits ([`super::dot_rows`],
//! [`super::row_major::max_rows`]). A dots product with a short inner dimension, where
//! the straight route copies `W` row-major ([`super::short_dots_pay_for_a_copy`]), is left
//! to the other routes: the copy here would be of the large operand. The portable code
//! (no AVX2) does not take the route: it was not timed against the `gemm` crate's.
//!
//! **A full vector.** At `r` = the lanes (16 `f32` with AVX-512, 8 with AVX2) the `gemm`
//! crate's vectors are full, and which route is faster for `dB` depends on the size of `g`:
//! the `gemm` crate while `g` is small, the row-major form, which streams `g`'s rows in
//! order, once `g` is large; the `gemm` crate suffers most at the power-of-two widths,
//! where `g`'s rows are a multiple of 4 KiB apart. On an Intel Xeon (family 6 model 207,
//! 2 MiB L2 per core, 2 threads, `f32`; `dB` at `r = 16`, the two alternating in one
//! process, paired medians of the row-major form's time over the `gemm` crate's;
//! `benches/RESULTS.md`, "A full vector's `dB`"): at 128 rows 1.26–1.92 (`d` = 768–2048,
//! `g` 0.4–1 MiB); at 512 rows 1.08 at `d = 768` (1.5 MiB), 0.97 at 1008 (1.97 MiB), 0.78
//! at 1024, 0.90–0.98 at 1040–1200, 0.77–0.78 at 1536 and 2000, 0.58–0.59 at 2048 and
//! 4096; at 2048 rows 0.64–0.96. So the crossover is near one core's L2 of `g` (not the
//! `threads ×` L2 that the `gemm` crate's split of `g` over the threads would suggest:
//! from 2 to 3.9 MiB the row-major form was already ahead), and the row-major form takes
//! a full vector's width when `L` is at least one core's L2 ([`widest_streamed_result`]).
//! That bound is a measured crossover put in the unit the CPU reports, not derived: it was
//! timed on that one CPU at 2 threads, in `f32` only (in `f64` the rule sends `r = 8`
//! with AVX-512, untimed), and not on an AVX2 CPU (with the decode kernel forced to AVX2
//! on the Xeon, `r = 8` against the `gemm` crate still on AVX-512, the rule's pick was the
//! faster route or within 3% in 9 cases). On an AMD EPYC Zen 4 (1 MiB L2), one point:
//! `dB` at `r = 16` from a 2 MiB `g` took 0.155 ms against the `gemm` crate's 0.160
//! (`benches/RESULTS.md`, "`g W` on the packed route at every batch size").
//!
//! With a BLAS backend (the `openblas` or `mkl` feature) the backend takes these
//! products first, as before; this route was not timed against it.
//!
//! Tasks: each element of `L` meets all `n` rows in one task, so tasks get at least
//! `L2 / n` bytes of `L`, the straight route's rule for `n` rows ([`super::Split::of`]:
//! one core's L2 cache of work against one row).
//!
//! The results are the decode kernel's: one fixed summation order per element, whatever
//! the thread count or the block an element falls in.

use candle_core::WithDType;

use super::super::machine::{Isa, Machine};
use super::super::MatProduct;
use super::{
    decode_machine, dot_rows, l2_rows, oriented_product_on, row_major, short_dots_pay_for_a_copy,
    Orientation, Split,
};

/// Whether [`reroute`] takes `product` (the module docs).
#[cfg(target_arch = "x86_64")]
pub(in crate::kernels::cpu) fn takes<T: WithDType>(product: &MatProduct<T>) -> bool {
    split_of(product).is_some()
}

/// Runs [`super::super::gemm_into`]'s product transposed and returns `Some`, or `None`
/// when this route does not take it (the decode kernel off, a result wider than the
/// bounds above or not narrower than it is tall, a left-hand side with no unit stride, a
/// short inner dimension for the dots, another dtype). The caller has checked the shapes,
/// that `k ≥ 1` and that `dst` holds the `m × n` result at row stride `dst_rs ≥ n`.
pub(in crate::kernels::cpu) fn reroute<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
) -> Option<candle_core::Result<()>> {
    let split = split_of(&product)?;
    let (lhs, rhs, accum, beta) = product.parts();
    let transpose = MatProduct::new(rhs.t(), lhs.t(), accum, beta);
    oriented_product_on(split, dst, dst_rs, transpose, Orientation::Transposed)
}

/// How [`reroute`] splits `product`, or `None` when it does not take it.
fn split_of<T: WithDType>(product: &MatProduct<T>) -> Option<Split> {
    let machine = decode_machine()?;
    let (lhs, rhs) = (product.lhs, product.rhs);
    let shape = (lhs.rows, lhs.cols, rhs.cols);
    split_for(machine, (lhs.rs, lhs.cs), shape, std::mem::size_of::<T>())
}

/// How an `m × k` by `k × n` product of `size`-byte elements whose left-hand side has the
/// strides `(rs, cs)` runs transposed on `machine`, or `None` when it does not (module
/// docs).
fn split_for(
    machine: &Machine,
    (rs, cs): (usize, usize),
    (m, k, n): (usize, usize, usize),
    size: usize,
) -> Option<Split> {
    // Only the vector code was timed against the other routes (module docs).
    if machine.isa == Isa::Scalar {
        return None;
    }
    // The transpose's right-hand side is `lhsᵀ`: its columns are `lhs`'s rows when those
    // are contiguous (the dots), its rows `lhs`'s columns when those are (the row-major
    // form).
    let most_rows = match (cs, rs) {
        (1, _) if short_dots_pay_for_a_copy(n, k, size, machine) => return None,
        (1, _) => dot_rows(k, size, machine),
        (_, 1) => l2_rows(k, size, machine)
            .min(row_major::max_rows(machine.isa))
            .min(widest_streamed_result(machine, m * k * size, size)),
        _ => return None,
    };
    (n > 0 && n <= most_rows && n < m).then(|| Split::of(machine, n))
}

/// The widest result the row-major form takes here for a left-hand side of `bytes`:
/// fewer columns than a vector's lanes, or a full vector's worth once the left-hand side
/// is at least one core's L2 cache (module docs, "A full vector": a crossover measured on
/// one Intel Xeon).
fn widest_streamed_result(machine: &Machine, bytes: usize, size: usize) -> usize {
    let lanes = machine.isa.lanes(size);
    if bytes >= machine.l2 {
        lanes
    } else {
        lanes - 1
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::{assert_matches_triple_loop, test_values as vals, Accum, MatRef};
    use super::*;

    const AVX512: Machine = Machine::AVX512_SERVER;

    /// Of a LoRA step's products at `n = 512`, `d = 1024` (`f32`): `x Aᵀ` and `g B` (a
    /// row-major left-hand side) through the dots, up to `r = 15` with AVX-512 and 7 with
    /// AVX2; `dB` (a column-major one, `g` 2 MiB: one L2) through the row-major form up
    /// to a full vector, `r = 16` and 8, and at `d = 768` (1.5 MiB) below it; the base
    /// products, the ones with `r` as their inner dimension, and a result as wide as it is
    /// tall do not take the route; nor a short inner dimension for the dots.
    #[test]
    fn the_narrow_low_rank_products_take_the_route() {
        let avx2 = Machine {
            isa: Isa::Avx2,
            ..AVX512
        };
        let row_major = (1024, 1);
        let column_major = (1, 1024);
        let takes = |machine: &Machine, strides, shape| split_for(machine, strides, shape, 4);
        for (machine, dots, sums) in [(&AVX512, 15, 16), (&avx2, 7, 8)] {
            for r in 1..=20 {
                let x_at = takes(machine, row_major, (512, 1024, r));
                assert_eq!(x_at.is_some(), r <= dots, "x Aᵀ at r = {r}");
                let db = takes(machine, column_major, (1024, 512, r));
                assert_eq!(db.is_some(), r <= sums, "dB at r = {r}");
                // `g` under the L2 (1.5 MiB): a full vector's width stays with the `gemm` crate.
                let small_db = takes(machine, (1, 768), (768, 512, r));
                assert_eq!(small_db.is_some(), r < sums, "dB at d = 768, r = {r}");
            }
            assert!(takes(machine, row_major, (512, 1024, 1024)).is_none());
            assert!(takes(machine, row_major, (512, 8, 1024)).is_none());
            assert!(takes(machine, (8, 1), (8, 1024, 8)).is_none());
            assert!(takes(machine, (3, 7), (512, 1024, 4)).is_none());
        }
        // f64 with AVX-512 (8 lanes): `dB` at r = 8 from a 4 MiB `g`, not from a 1 MiB one.
        let takes8 = |strides, shape| split_for(&AVX512, strides, shape, 8).is_some();
        assert!(takes8(column_major, (1024, 512, 8)));
        assert!(!takes8((1, 256), (256, 512, 8)) && takes8((1, 256), (256, 512, 7)));
        // The bound is the machine's L2: with 512 KiB, `dB` at d = 768 (1.5 MiB) takes it.
        let small_l2 = Machine {
            l2: 512 << 10,
            ..AVX512
        };
        assert!(takes(&small_l2, (1, 768), (768, 512, 16)).is_some());
        let portable = Machine {
            isa: Isa::Scalar,
            ..AVX512
        };
        assert!(takes(&portable, row_major, (512, 1024, 2)).is_none());
        assert!(takes(&portable, column_major, (1024, 512, 2)).is_none());
        // Dots over 4 elements for 4 rows: the straight route would copy; this one refuses.
        assert!(takes(&AVX512, (4, 1), (512, 4, 4)).is_none());
        // Tasks of L2 / n bytes of the left-hand side: two for `x Aᵀ` at r = 8.
        let split = takes(&AVX512, row_major, (512, 1024, 8));
        assert_eq!(split.map(|s| s.min_task_bytes), Some(256 << 10));
    }

    /// Through [`reroute`] on this CPU, where it takes them: `x Aᵀ`-like (a row-major,
    /// padded left-hand side and a column-major right-hand side) and `dB`-like (a
    /// column-major left-hand side and a row-major right-hand side) products, `f32` and
    /// `f64`, replacing and accumulating with `beta` into a padded destination whose
    /// padding stays as it was, against an f64 triple loop.
    #[test]
    fn rerouted_products_match_a_triple_loop() -> candle_core::Result<()> {
        let mut ran = false;
        for (m, k, n) in [(300, 700, 7), (130, 64, 3), (77, 1000, 1)] {
            ran |= rerouted::<f32>(m, k, n, 1e-6)?;
            ran |= rerouted::<f64>(m, k, n, 1e-14)?;
        }
        if !ran {
            println!("transposed decode route: skipped, not taken on this CPU");
        }
        Ok(())
    }

    /// A result a full vector wide from a column-major left-hand side of at least one
    /// L2 (`dB` at `r = 16` with AVX-512, 8 with AVX2), `f32` and `f64`, on this CPU's
    /// vector code: taken, and as [`rerouted_products_match_a_triple_loop`] checks.
    #[test]
    fn full_vector_results_from_a_large_operand_match_a_triple_loop() -> candle_core::Result<()> {
        let Some(machine) = decode_machine().filter(|m| m.isa != Isa::Scalar) else {
            println!("transposed decode route: skipped, no vector code on this CPU");
            return Ok(());
        };
        let m = 1100;
        let shape = |size: usize| (machine.l2.div_ceil(m * size) + 3, machine.isa.lanes(size));
        let (k, n) = shape(4);
        assert!(rerouted::<f32>(m, k, n, 1e-6)?, "f32 {m}x{k}x{n} not taken");
        let (k, n) = shape(8);
        assert!(
            rerouted::<f64>(m, k, n, 1e-14)?,
            "f64 {m}x{k}x{n} not taken"
        );
        Ok(())
    }

    /// [`rerouted_products_match_a_triple_loop`]'s products of `T`, to `tol · k` relative;
    /// whether the route took any.
    fn rerouted<T: WithDType>(m: usize, k: usize, n: usize, tol: f64) -> candle_core::Result<bool> {
        let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
        let (l, r) = (
            cast(vals((m + 3) * (k + 3), 0.37)),
            cast(vals(k * (n + 2), 0.71)),
        );
        let operands = [
            (
                MatRef::new(&l, m, k, k + 3, 1)?,
                MatRef::new(&r, k, n, 1, k + 2)?,
            ),
            (
                MatRef::new(&l, m, k, 1, m + 3)?,
                MatRef::new(&r, k, n, n + 2, 1)?,
            ),
        ];
        let size = std::mem::size_of::<T>();
        let Some(machine) = decode_machine() else {
            return Ok(false);
        };
        let mut ran = false;
        for (lhs, rhs) in operands {
            if split_for(machine, (lhs.rs, lhs.cs), (m, k, n), size).is_none() {
                continue;
            }
            for (accum, beta) in [(Accum::Replace, 1.0), (Accum::Add, -0.5)] {
                let dst_rs = n + 5;
                let start = cast(vals(m * dst_rs, 1.3));
                let mut dst = start.clone();
                let product = MatProduct::new(lhs, rhs, accum, T::from_f64(beta));
                match reroute(&mut dst, dst_rs, product) {
                    Some(done) => done?,
                    None => candle_core::bail!("{m}x{k}x{n} refused"),
                }
                assert_matches_triple_loop(&dst, &start, dst_rs, product, tol, "transposed");
                ran = true;
            }
        }
        Ok(ran)
    }
}
