//! The decode kernel on the transpose of a product with a narrow result: `dst = L R`
//! with many rows and fewer columns than a vector has lanes (`n` of them) is run as
//! `dstᵀ = Rᵀ Lᵀ`, `n` rows of `Rᵀ` against `L`'s rows, and written back transposed.
//! These are a LoRA layer's low-rank products whose result is `r` wide, at ranks below 16
//! (`f32` with AVX-512; below 8 with AVX2):
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
//! at `r = 4`; at `d = 2048` 809 → 479 and 822 → 293. At `r = 16`, a full vector, the
//! two were within a few percent either way (`dB` 178 → 190 µs at `d = 1024`, 365 → 316
//! at 2048), so there the products stay where they were (`benches/RESULTS.md`, "Narrow
//! low-rank products").
//!
//! So the bound is one from what the CPU reports, not a constant fitted to those timings:
//! fewer columns than a vector's lanes, within each form's own limits ([`super::dot_rows`],
//! [`super::row_major::max_rows`]). A dots product with a short inner dimension, where
//! the straight route copies `W` row-major ([`super::short_dots_pay_for_a_copy`]), is left
//! to the other routes: the copy here would be of the large operand. The portable code
//! (no AVX2) does not take the route: it was not timed against the `gemm` crate's.
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
    let machine = decode_machine()?;
    let (lhs, rhs, accum, beta) = product.parts();
    let shape = (lhs.rows, lhs.cols, rhs.cols);
    let split = split_for(machine, (lhs.rs, lhs.cs), shape, std::mem::size_of::<T>())?;
    let transpose = MatProduct::new(rhs.t(), lhs.t(), accum, beta);
    oriented_product_on(split, dst, dst_rs, transpose, Orientation::Transposed)
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
            .min(machine.isa.lanes(size) - 1),
        _ => return None,
    };
    (n > 0 && n <= most_rows && n < m).then(|| Split::of(machine, n))
}

#[cfg(test)]
mod tests {
    use super::super::super::{assert_matches_triple_loop, test_values as vals, Accum, MatRef};
    use super::*;

    const AVX512: Machine = Machine::AVX512_SERVER;

    /// Of a LoRA step's products at `n = 512`, `d = 1024` (`f32`): `x Aᵀ` and `g B` (a
    /// row-major left-hand side) through the dots, `dB` (a column-major one) through the
    /// row-major form, up to `r = 15` with AVX-512 and 7 with AVX2; the base
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
        for (machine, dots, sums) in [(&AVX512, 15, 15), (&avx2, 7, 7)] {
            for r in 1..=20 {
                let x_at = takes(machine, row_major, (512, 1024, r));
                assert_eq!(x_at.is_some(), r <= dots, "x Aᵀ at r = {r}");
                let db = takes(machine, column_major, (1024, 512, r));
                assert_eq!(db.is_some(), r <= sums, "dB at r = {r}");
            }
            assert!(takes(machine, row_major, (512, 1024, 1024)).is_none());
            assert!(takes(machine, row_major, (512, 8, 1024)).is_none());
            assert!(takes(machine, (8, 1), (8, 1024, 8)).is_none());
            assert!(takes(machine, (3, 7), (512, 1024, 4)).is_none());
        }
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
