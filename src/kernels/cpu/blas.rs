//! Optional BLAS backends for the fused ops' GEMMs.
//!
//! With the `openblas` feature (the system OpenBLAS, e.g. Debian's `libopenblas-dev`) or
//! the `mkl` feature (Intel MKL, linked by candle's `mkl` feature through
//! `intel-mkl-src`; `scripts/mkl-env.sh` sets it up from PyPI's wheels), [`gemm`] sends every f32 / f64 product whose three matrices each
//! have a unit stride on one axis, except the few-row products the decode kernel takes
//! first (`gemv.rs`), to `cblas_sgemm` / `cblas_dgemm` (row-major, each
//! operand transposed or not by its unit axis; [`Accum::Add`] is BLAS's `beta = 1`, the
//! product's scale its `alpha`). Other products (broadcast or otherwise strided operands,
//! other dtypes, dimensions past `i32`) return `None` and take the `gemm` crate as in the
//! default build. With both features, OpenBLAS is used.
//!
//! Threads: before each call the library's thread count is set to candle's
//! (`RAYON_NUM_THREADS`, or all cores), only when it changed since the last call
//! (`openblas_set_num_threads` / `MKL_Set_Num_Threads`).
//!
//! Results are not bit-identical across thread counts with a BLAS backend (OpenBLAS
//! partitions differently per thread count): the default build's thread determinism
//! does not carry over.
//!
//! **OpenBLAS kernels older than the CPU.** OpenBLAS picks its kernels from the CPU model
//! when it loads, and a build older than the CPU falls back to generic ones: Debian
//! bookworm's 0.3.21 runs its SSE3 `Prescott` kernels on an Intel Xeon of 2023
//! (family 6, model 207), 5–6× slower than the `gemm` crate there (`benches/RESULTS.md`).
//! So with `openblas` the library's kernel family (`openblas_get_corename`) is read once;
//! when it is one OpenBLAS documents for a narrower vector width than the CPU's
//! ([`super::machine`]: AVX-512, or AVX2 + FMA), no product goes to OpenBLAS in that
//! process and the default build's routes run instead. Setting `OPENBLAS_CORETYPE` (for
//! example `SkylakeX` or `Cooperlake` on an AVX-512 CPU, `Haswell` on an AVX2 one) makes
//! OpenBLAS load kernels that fit, and then it is used. Names this module does not know are
//! trusted. MKL selects its kernels from the CPU's features, so it is not checked.
//!
//! Without either feature this module is not compiled and nothing links a BLAS.

use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, WithDType};

#[cfg(feature = "openblas")]
use super::machine::Isa;
use super::{Accum, MatProduct, MatRef};

/// `CblasRowMajor`.
const ROW_MAJOR: c_int = 101;
/// `CblasNoTrans`.
const NO_TRANS: c_int = 111;
/// `CblasTrans`.
const TRANS: c_int = 112;

/// Declares `cblas_?gemm` for one element type.
macro_rules! cblas_gemm {
    ($name:ident, $t:ty) => {
        #[cfg_attr(feature = "openblas", link(name = "openblas"))]
        extern "C" {
            fn $name(
                order: c_int,
                trans_a: c_int,
                trans_b: c_int,
                m: c_int,
                n: c_int,
                k: c_int,
                alpha: $t,
                a: *const $t,
                lda: c_int,
                b: *const $t,
                ldb: c_int,
                beta: $t,
                c: *mut $t,
                ldc: c_int,
            );
        }
    };
}
cblas_gemm!(cblas_sgemm, f32);
cblas_gemm!(cblas_dgemm, f64);

#[cfg_attr(feature = "openblas", link(name = "openblas"))]
extern "C" {
    #[cfg(feature = "openblas")]
    fn openblas_set_num_threads(n: c_int);
    #[cfg(feature = "openblas")]
    fn openblas_get_corename() -> *const std::ffi::c_char;
    #[cfg(not(feature = "openblas"))]
    fn MKL_Set_Num_Threads(n: c_int);
}

/// The thread count last given to the library (0: never).
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Gives the library candle's thread count when it changed.
fn sync_threads() {
    let n = candle_core::utils::get_num_threads().max(1);
    if THREADS.swap(n, Ordering::Relaxed) != n {
        let n = c_int::try_from(n).unwrap_or(c_int::MAX);
        // SAFETY: setting the thread count has no memory-safety preconditions.
        #[cfg(feature = "openblas")]
        unsafe {
            openblas_set_num_threads(n)
        };
        // SAFETY: as above.
        #[cfg(not(feature = "openblas"))]
        unsafe {
            MKL_Set_Num_Threads(n)
        };
    }
}

/// The widest vector set a kernel family of OpenBLAS (`openblas_get_corename`, the names
/// of its `DYNAMIC_ARCH` builds) uses, as far as the decode kernel's sets go: `Avx512` for
/// the AVX-512 families, `Avx2` for the AVX2 + FMA ones, `Scalar` for the older ones
/// (SSE, or AVX without FMA); `None` for a name not listed here.
#[cfg(feature = "openblas")]
fn kernel_family_isa(core: &str) -> Option<Isa> {
    const AVX512: [&str; 3] = ["skylakex", "cooperlake", "sapphirerapids"];
    const AVX2: [&str; 3] = ["haswell", "zen", "excavator"];
    const OLDER: [&str; 21] = [
        "unknown",
        "katmai",
        "coppermine",
        "northwood",
        "prescott",
        "banias",
        "atom",
        "core2",
        "penryn",
        "dunnington",
        "nehalem",
        "athlon",
        "opteron",
        "opteron_sse3",
        "barcelona",
        "nano",
        "sandybridge",
        "bobcat",
        "bulldozer",
        "piledriver",
        "steamroller",
    ];
    let core = core.trim().to_ascii_lowercase();
    let is = |names: &[&str]| names.contains(&core.as_str());
    if is(&AVX512) {
        Some(Isa::Avx512)
    } else if is(&AVX2) {
        Some(Isa::Avx2)
    } else if is(&OLDER) {
        Some(Isa::Scalar)
    } else {
        None
    }
}

/// Whether OpenBLAS's kernels use at least the vector width `cpu` has (an unknown family is
/// trusted).
#[cfg(feature = "openblas")]
fn kernels_fit(core: &str, cpu: Isa) -> bool {
    kernel_family_isa(core).is_none_or(|isa| isa >= cpu)
}

/// Whether products go to the linked BLAS in this process (the module docs): always with
/// MKL; with OpenBLAS when its kernel family fits the CPU, read once. (A product whose
/// layout BLAS cannot take still goes to the other routes.)
pub(super) fn library_fits_the_cpu() -> bool {
    #[cfg(feature = "openblas")]
    {
        static FITS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *FITS.get_or_init(|| {
            // SAFETY: OpenBLAS returns a pointer to a static NUL-terminated name (or null,
            // checked).
            let core = unsafe {
                let p = openblas_get_corename();
                (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
            };
            core.is_none_or(|core| kernels_fit(&core, super::machine::machine().isa))
        })
    }
    #[cfg(not(feature = "openblas"))]
    true
}

/// A view as a BLAS operand: its transpose flag and leading dimension, when one axis has
/// unit stride (a one-row or one-column view takes any stride on the other axis).
fn operand<T>(v: &MatRef<T>) -> Option<(c_int, c_int)> {
    let ld = |x: usize| c_int::try_from(x).ok();
    if v.cs == 1 && (v.rows <= 1 || v.rs >= v.cols) {
        Some((
            NO_TRANS,
            ld(if v.rows <= 1 { v.cols.max(1) } else { v.rs })?,
        ))
    } else if v.rs == 1 && (v.cols <= 1 || v.cs >= v.rows) {
        Some((TRANS, ld(if v.cols <= 1 { v.rows.max(1) } else { v.cs })?))
    } else {
        None
    }
}

/// `dst (+)= beta · lhs · rhs` through `cblas_?gemm`, or `None` where BLAS does not take
/// the product (see the module docs). The caller checked the shapes and that `dst` holds
/// `lhs.rows` rows of stride `dst_rs ≥ rhs.cols`, and that no dimension is zero.
pub(super) fn gemm<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
) -> Option<candle_core::Result<()>> {
    if !library_fits_the_cpu() {
        return None;
    }
    cblas_product(dst, dst_rs, product)
}

/// [`gemm`]'s `cblas_?gemm` call, whatever the library's kernels (its contract).
fn cblas_product<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    product: MatProduct<T>,
) -> Option<candle_core::Result<()>> {
    let (lhs, rhs, accum, beta) = product.parts();
    let dim = |x: usize| c_int::try_from(x).ok();
    let (m, n, k, ldc) = (dim(lhs.rows)?, dim(rhs.cols)?, dim(lhs.cols)?, dim(dst_rs)?);
    let (ta, lda) = operand(&lhs)?;
    let (tb, ldb) = operand(&rhs)?;
    let (alpha, keep) = (beta.to_f64(), if accum == Accum::Add { 1.0 } else { 0.0 });
    sync_threads();
    let (a, b, c) = (lhs.data.as_ptr(), rhs.data.as_ptr(), dst.as_mut_ptr());
    match T::DTYPE {
        // SAFETY: `T` is f32 here, so the casts only rename the element type; the views
        // were bounds-checked when built (every element their strides reach is in
        // `data`), the leading dimensions describe exactly those strides, and `dst` is a
        // unique borrow holding `m` rows of stride `ldc ≥ n` (the caller's check).
        DType::F32 => unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                ta,
                tb,
                m,
                n,
                k,
                alpha as f32,
                a.cast(),
                lda,
                b.cast(),
                ldb,
                keep as f32,
                c.cast(),
                ldc,
            )
        },
        // SAFETY: as above, with f64.
        DType::F64 => unsafe {
            cblas_dgemm(
                ROW_MAJOR,
                ta,
                tb,
                m,
                n,
                k,
                alpha,
                a.cast(),
                lda,
                b.cast(),
                ldb,
                keep,
                c.cast(),
                ldc,
            )
        },
        _ => return None,
    }
    Some(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::super::test_values as vals;
    use super::*;

    /// `cblas_?gemm` on `T` copies of `lhs`, `rhs` against an f64 triple loop, both
    /// accumulations, into a padded destination (whether or not [`gemm`] would send the
    /// product to the library in this process).
    fn check<T: WithDType>(lhs: MatRef<f64>, rhs: MatRef<f64>, tol: f64) {
        let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
        let cast = |v: &MatRef<f64>| -> Vec<T> { v.data.iter().map(|&x| T::from_f64(x)).collect() };
        let (ld, rd) = (cast(&lhs), cast(&rhs));
        let l = MatRef::new(&ld, m, k, lhs.rs, lhs.cs).unwrap();
        let r = MatRef::new(&rd, k, n, rhs.rs, rhs.cs).unwrap();
        assert!(operand(&l).is_some() && operand(&r).is_some());
        for (accum, beta) in [(Accum::Replace, 1.0), (Accum::Add, -0.5)] {
            let dst_rs = n + 2;
            let start = vals(m * dst_rs, 1.3);
            let mut dst: Vec<T> = start.iter().map(|&x| T::from_f64(x)).collect();
            let product = MatProduct::new(l, r, accum, T::from_f64(beta));
            cblas_product(&mut dst, dst_rs, product)
                .expect("a BLAS operand")
                .unwrap();
            for i in 0..m {
                for j in 0..dst_rs {
                    let old = start[i * dst_rs + j];
                    let want = if j >= n {
                        old // padding untouched
                    } else {
                        let dot: f64 = (0..k).map(|t| lhs.at(i, t) * rhs.at(t, j)).sum();
                        beta * dot + if accum == Accum::Add { old } else { 0.0 }
                    };
                    let got = dst[i * dst_rs + j].to_f64();
                    assert!(
                        (got - want).abs() <= tol * (1.0 + want.abs()) * k as f64,
                        "{m}x{k}x{n} {:?} {accum:?} ({i}, {j}): {got} vs {want}",
                        T::DTYPE
                    );
                }
            }
        }
    }

    /// Row-major and column-major operands, padded or not, one-row and one-column ones,
    /// through `cblas_sgemm` / `cblas_dgemm`; a broadcast operand is left to `gemm`.
    #[test]
    fn blas_products_match_a_triple_loop() -> candle_core::Result<()> {
        for (m, k, n) in [(1, 7, 5), (6, 1, 4), (9, 13, 11), (33, 40, 17)] {
            let a = vals((m + 3) * (k + 3), 0.37);
            let b = vals((k + 3) * (n + 3), 0.71);
            let lhs = [
                MatRef::contiguous(&a[..m * k], m, k)?,
                MatRef::new(&a, m, k, k + 3, 1)?,
                MatRef::new(&a, m, k, 1, m + 3)?,
            ];
            let rhs = [
                MatRef::contiguous(&b[..k * n], k, n)?,
                MatRef::new(&b, k, n, 1, k + 3)?,
            ];
            for l in lhs {
                for r in rhs {
                    check::<f64>(l, r, 1e-13);
                    check::<f32>(l, r, 1e-5);
                }
            }
        }
        let a = vals(4, 0.5);
        assert!(operand(&MatRef::new(&a, 3, 4, 0, 1)?).is_none());
        assert!(operand(&MatRef::new(&a, 3, 2, 0, 0)?).is_none());
        Ok(())
    }

    /// OpenBLAS's generic kernels are refused on a CPU with wider vectors, fitting ones are
    /// used, unknown names trusted.
    #[cfg(feature = "openblas")]
    #[test]
    fn openblas_kernel_families_are_matched_to_the_cpu() {
        assert!(!kernels_fit("Prescott", Isa::Avx512));
        assert!(!kernels_fit("Sandybridge", Isa::Avx2));
        assert!(!kernels_fit("Haswell", Isa::Avx512));
        assert!(kernels_fit("Haswell", Isa::Avx2));
        assert!(kernels_fit("SKYLAKEX", Isa::Avx512));
        assert!(kernels_fit("Cooperlake", Isa::Avx2));
        assert!(kernels_fit("Prescott", Isa::Scalar));
        assert!(kernels_fit("SomeFutureLake", Isa::Avx512));
        println!(
            "this process: OpenBLAS {} the CPU",
            if library_fits_the_cpu() {
                "fits"
            } else {
                "does not fit"
            }
        );
    }
}
