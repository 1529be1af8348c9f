//! Which route runs a product of [`super::gemm_into`]: one list, [`ORDER`], that
//! [`route_product`] tries in turn and that `earlier_than_packed_takes` (on x86_64, where
//! the packed route is) reads, so the order a product is offered to the routes is written
//! once.

use candle_core::WithDType;

#[cfg(target_arch = "x86_64")]
use super::{amx, packed};
use super::{check_product, col_major, gemm_checked, gemv, parallelism, thin};
use super::{AddedTerm, MatProduct};

/// A route of [`super::gemm_into`]'s products (each module's docs say what it takes and
/// why it comes where it does in [`ORDER`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// A few rows against a large `W`: the decode kernel streams `W` once, ahead of a BLAS
    /// backend too (faster than `cblas_sgemm` at one row, `benches/RESULTS.md`).
    Decode,
    /// A BLAS backend (features `openblas`, `mkl`) whose library fits the CPU.
    Blas,
    /// A narrow result (a low-rank product fewer than a vector's lanes wide, or `dB` a full
    /// vector wide from a `g` of at least one L2): the decode kernel on its transpose.
    DecodeTransposed,
    /// A short side (a LoRA factor's rank) besides many rows: the rows split by hand.
    Thin,
    /// Large `f32` products on AMX tiles, at `f32`-level accuracy, when asked for
    /// (`LORAKIT_CPU_AMX=1`).
    Amx,
    /// Large `f32` products on lorakit's own packing and register block (AVX-512 or AVX2), with a
    /// LoRA term in the same passes where it fits.
    Packed,
    /// The column-major right-hand side's reroutes (row by row, via transposes, chunked).
    ColMajor,
}

/// The routes in the order a product is offered to them; one that takes none goes to the
/// `gemm` crate.
const ORDER: [Route; 7] = [
    Route::Decode,
    Route::Blas,
    Route::DecodeTransposed,
    Route::Thin,
    Route::Amx,
    Route::Packed,
    Route::ColMajor,
];

impl Route {
    /// Whether this route takes `product` (a BLAS backend: any product, as it may; a route
    /// this build lacks: none).
    #[cfg(target_arch = "x86_64")]
    fn takes<T: WithDType>(self, product: &MatProduct<T>) -> bool {
        match self {
            Route::Decode => gemv::takes(product),
            #[cfg(any(feature = "openblas", feature = "mkl"))]
            Route::Blas => super::blas::library_fits_the_cpu(),
            Route::DecodeTransposed => gemv::takes_transposed(product),
            Route::Thin => thin::takes_product(product),
            Route::Amx => amx::takes_product(product),
            Route::Packed => packed::takes_product(product),
            Route::ColMajor => col_major::takes(product),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Runs `product` (and `term`, where the route takes it too) into `dst`: `None` when the
    /// route does not take the product, else whether `term` was added.
    fn run<T: WithDType>(
        self,
        dst: &mut [T],
        dst_rs: usize,
        product: MatProduct<T>,
        term: Option<AddedTerm<T>>,
    ) -> Option<candle_core::Result<bool>> {
        let without_term = |done: candle_core::Result<()>| done.map(|()| false);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = term;
        match self {
            Route::Decode => gemv::reroute(dst, dst_rs, product).map(without_term),
            #[cfg(any(feature = "openblas", feature = "mkl"))]
            Route::Blas => super::blas::gemm(dst, dst_rs, product).map(without_term),
            Route::DecodeTransposed => {
                gemv::reroute_transposed(dst, dst_rs, product).map(without_term)
            }
            Route::Thin => thin::reroute(dst, dst_rs, product).map(without_term),
            #[cfg(target_arch = "x86_64")]
            Route::Amx => amx::reroute(dst, dst_rs, product).map(without_term),
            #[cfg(target_arch = "x86_64")]
            Route::Packed => packed::reroute(dst, dst_rs, product, term),
            Route::ColMajor => col_major::reroute(dst, dst_rs, product).map(without_term),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

/// Runs a product by the first route of [`ORDER`] that takes it, or on the `gemm` crate
/// with candle's thread setting; returns whether `term` was added with it (the caller adds
/// it otherwise).
pub(super) fn route_product<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
    term: Option<AddedTerm<T>>,
) -> candle_core::Result<bool> {
    let (lhs, rhs, accum, _) = product.parts();
    if !check_product(dst, dst_rs, lhs, rhs, accum)? {
        return Ok(false);
    }
    for route in ORDER {
        if let Some(done) = route.run(dst, dst_rs, product, term) {
            return done;
        }
    }
    gemm_checked(dst, dst_rs, product, parallelism());
    Ok(false)
}

/// Whether a route before the packed one in [`ORDER`] takes `product`: then
/// [`route_product`] would not reach the packed route, and a caller that asks the packed
/// route directly (a new result, `packed::owned`) must not either.
#[cfg(target_arch = "x86_64")]
pub(super) fn earlier_than_packed_takes<T: WithDType>(product: &MatProduct<T>) -> bool {
    ORDER
        .into_iter()
        .take_while(|route| *route != Route::Packed)
        .any(|route| route.takes(product))
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::{machine, test_values, Accum, Isa, MatRef};
    use super::*;

    /// Whether the shapes of [`each_route_takes_what_it_runs`] reach `route` (each offered
    /// to every route, not in [`ORDER`]) on this machine, build and settings: a BLAS backend
    /// where its library fits the CPU, the decode kernel unless turned off (its transposed
    /// form also needs vectors), the thin split on two threads or more, AMX tiles and the
    /// packed route where they are in use.
    fn reached_here(route: Route) -> bool {
        let decode = machine().decode_kernel;
        match route {
            Route::Decode => decode,
            #[cfg(any(feature = "openblas", feature = "mkl"))]
            Route::Blas => super::super::blas::library_fits_the_cpu(),
            #[cfg(not(any(feature = "openblas", feature = "mkl")))]
            Route::Blas => false,
            Route::DecodeTransposed => decode && machine().isa != Isa::Scalar,
            Route::Thin => rayon::current_num_threads() > 1,
            Route::Amx => amx::in_use(),
            Route::Packed => packed::in_use(),
            Route::ColMajor => true,
        }
    }

    /// `data` as a `rows × cols` view: row-major, or (`transposed`) the transpose of a
    /// row-major `cols × rows` matrix (column-major).
    fn view<T: Copy>(
        data: &[T],
        rows: usize,
        cols: usize,
        transposed: bool,
    ) -> candle_core::Result<MatRef<'_, T>> {
        match transposed {
            false => MatRef::contiguous(data, rows, cols),
            true => MatRef::contiguous(data, cols, rows).map(MatRef::t),
        }
    }

    /// Each route's `takes` says what its `run` does, for `f32` and `f64`: `run` takes a
    /// product exactly when `takes` says so (a BLAS backend only where `takes` allows it),
    /// so that [`earlier_than_packed_takes`] sees the products the routes before the packed
    /// one would run. Shapes from one row to many, narrow and wide results, shallow and
    /// deep products; both operands row-major and column-major; replacing and adding with a
    /// scale. The shapes reach every route this machine, build and settings have on.
    #[test]
    fn each_route_takes_what_it_runs() -> candle_core::Result<()> {
        let shapes = [
            (1, 64, 300),
            (3, 300, 520),
            (16, 2048, 2048),
            (40, 300, 8),
            (200, 300, 4),
            (200, 8, 300),
            (200, 384, 16),
            (300, 400, 520),
            (512, 1024, 1024),
        ];
        let mut taken = [0usize; ORDER.len()];
        for (m, k, n) in shapes {
            let lhs = test_values(m * k, 0.3);
            let rhs = test_values(k * n, 0.7);
            let (lhs32, rhs32): (Vec<f32>, Vec<f32>) = (
                lhs.iter().map(|&v| v as f32).collect(),
                rhs.iter().map(|&v| v as f32).collect(),
            );
            for (lhs_t, rhs_t) in [(false, false), (false, true), (true, false)] {
                let (l, r) = (view(&lhs, m, k, lhs_t)?, view(&rhs, k, n, rhs_t)?);
                let (l32, r32) = (view(&lhs32, m, k, lhs_t)?, view(&rhs32, k, n, rhs_t)?);
                for (accum, beta) in [(Accum::Replace, 1.0), (Accum::Add, -0.5)] {
                    for (position, route) in ORDER.into_iter().enumerate() {
                        let product = MatProduct::new(l, r, accum, beta);
                        let ran = route.run(&mut vec![0f64; m * n], n, product, None);
                        let product32 = MatProduct::new(l32, r32, accum, beta as f32);
                        let ran32 = route.run(&mut vec![0f32; m * n], n, product32, None);
                        for (dtype, ran, takes) in [
                            ("f64", ran.transpose()?.is_some(), route.takes(&product)),
                            ("f32", ran32.transpose()?.is_some(), route.takes(&product32)),
                        ] {
                            let context = format!(
                                "{route:?}, {dtype} {m}x{k}x{n}, lhs transposed {lhs_t}, \
                                 rhs transposed {rhs_t}, {accum:?}"
                            );
                            match route {
                                Route::Blas => assert!(!ran || takes, "{context}"),
                                _ => assert_eq!(ran, takes, "{context}"),
                            }
                            taken[position] += usize::from(ran);
                        }
                    }
                }
            }
        }
        for (route, count) in ORDER.into_iter().zip(taken) {
            assert_eq!(
                count > 0,
                reached_here(route),
                "{route:?}: {count} products"
            );
        }
        Ok(())
    }
}
