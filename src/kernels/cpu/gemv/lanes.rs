//! The vector operations of the decode kernel ([`super`]), one implementation per
//! instruction set and dtype: [`Scalar`] (portable, four independent lanes), AVX2 + FMA
//! (256-bit) and AVX-512F (512-bit), for `f32` and `f64`.
//!
//! Every operation is `unsafe`: the caller guarantees the CPU has the implementation's
//! instruction set ([`super::super::machine::Isa::available`]) and, for `load` and
//! `store`, that `WIDTH` elements are readable (writable) at the pointer.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::marker::PhantomData;

use candle_core::WithDType;

/// A vector of `WIDTH` elements of `T` and the operations the decode kernels need.
pub(super) trait Lanes {
    /// The element type.
    type T: WithDType;
    /// The vector type.
    type V: Copy;
    /// Elements per vector.
    const WIDTH: usize;
    /// All zeros.
    ///
    /// # Safety
    /// The CPU has the implementation's instruction set.
    unsafe fn zero() -> Self::V;
    /// `WIDTH` elements from `p` (unaligned).
    ///
    /// # Safety
    /// As [`Lanes::zero`], and `WIDTH` elements are readable at `p`.
    unsafe fn load(p: *const Self::T) -> Self::V;
    /// Every lane `v`.
    ///
    /// # Safety
    /// As [`Lanes::zero`].
    unsafe fn splat(v: Self::T) -> Self::V;
    /// Writes the `WIDTH` lanes to `p` (unaligned).
    ///
    /// # Safety
    /// As [`Lanes::zero`], and `WIDTH` elements are writable at `p`.
    unsafe fn store(p: *mut Self::T, v: Self::V);
    /// `acc + a · b`, lane by lane.
    ///
    /// # Safety
    /// As [`Lanes::zero`].
    unsafe fn fma(acc: Self::V, a: Self::V, b: Self::V) -> Self::V;
    /// The sum of the lanes, in a fixed order.
    ///
    /// # Safety
    /// As [`Lanes::zero`].
    unsafe fn sum(v: Self::V) -> Self::T;
}

/// Portable code: four lanes in an array (independent chains the compiler may vectorise).
pub(super) struct Scalar<T>(PhantomData<T>);

impl<T: WithDType> Lanes for Scalar<T> {
    type T = T;
    type V = [T; 4];
    const WIDTH: usize = 4;

    #[inline(always)]
    unsafe fn zero() -> [T; 4] {
        [T::from_f64(0.0); 4]
    }

    #[inline(always)]
    unsafe fn load(p: *const T) -> [T; 4] {
        // SAFETY: the caller's contract: 4 readable elements at `p`.
        unsafe { p.cast::<[T; 4]>().read_unaligned() }
    }

    #[inline(always)]
    unsafe fn splat(v: T) -> [T; 4] {
        [v; 4]
    }

    #[inline(always)]
    unsafe fn store(p: *mut T, v: [T; 4]) {
        // SAFETY: the caller's contract: 4 writable elements at `p`.
        unsafe { p.cast::<[T; 4]>().write_unaligned(v) }
    }

    #[inline(always)]
    unsafe fn fma(acc: [T; 4], a: [T; 4], b: [T; 4]) -> [T; 4] {
        let [a0, a1, a2, a3] = a;
        let [b0, b1, b2, b3] = b;
        let [c0, c1, c2, c3] = acc;
        [c0 + a0 * b0, c1 + a1 * b1, c2 + a2 * b2, c3 + a3 * b3]
    }

    #[inline(always)]
    unsafe fn sum(v: [T; 4]) -> T {
        let [a, b, c, d] = v;
        (a + b) + (c + d)
    }
}

/// AVX2 + FMA, 256-bit.
#[cfg(target_arch = "x86_64")]
pub(super) struct Avx2<T>(PhantomData<T>);

/// AVX-512F, 512-bit.
#[cfg(target_arch = "x86_64")]
pub(super) struct Avx512<T>(PhantomData<T>);

// SAFETY (every function below): the trait's contract; the intrinsics need only the
// instruction set the caller vouches for, `load` reads and `store` writes the `WIDTH`
// elements at `p`.
#[cfg(target_arch = "x86_64")]
impl Lanes for Avx2<f32> {
    type T = f32;
    type V = __m256;
    const WIDTH: usize = 8;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: see above.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn splat(v: f32) -> __m256 {
        _mm256_set1_ps(v)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: see above.
        unsafe { _mm256_storeu_ps(p, v) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma(acc: __m256, a: __m256, b: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, acc)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<0x55>(s, s)))
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx2<f64> {
    type T = f64;
    type V = __m256d;
    const WIDTH: usize = 4;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn zero() -> __m256d {
        _mm256_setzero_pd()
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const f64) -> __m256d {
        // SAFETY: see above.
        unsafe { _mm256_loadu_pd(p) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn splat(v: f64) -> __m256d {
        _mm256_set1_pd(v)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(p: *mut f64, v: __m256d) {
        // SAFETY: see above.
        unsafe { _mm256_storeu_pd(p, v) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma(acc: __m256d, a: __m256d, b: __m256d) -> __m256d {
        _mm256_fmadd_pd(a, b, acc)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum(v: __m256d) -> f64 {
        let s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
        _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx512<f32> {
    type T = f32;
    type V = __m512;
    const WIDTH: usize = 16;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: see above.
        unsafe { _mm512_loadu_ps(p) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn splat(v: f32) -> __m512 {
        _mm512_set1_ps(v)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: see above.
        unsafe { _mm512_storeu_ps(p, v) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fma(acc: __m512, a: __m512, b: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, acc)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx512<f64> {
    type T = f64;
    type V = __m512d;
    const WIDTH: usize = 8;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn zero() -> __m512d {
        _mm512_setzero_pd()
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const f64) -> __m512d {
        // SAFETY: see above.
        unsafe { _mm512_loadu_pd(p) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn splat(v: f64) -> __m512d {
        _mm512_set1_pd(v)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(p: *mut f64, v: __m512d) {
        // SAFETY: see above.
        unsafe { _mm512_storeu_pd(p, v) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fma(acc: __m512d, a: __m512d, b: __m512d) -> __m512d {
        _mm512_fmadd_pd(a, b, acc)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sum(v: __m512d) -> f64 {
        _mm512_reduce_add_pd(v)
    }
}
