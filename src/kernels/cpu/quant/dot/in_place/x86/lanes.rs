//! The vector operations of the in-place kernels, once per width: [`Avx2`] (8 lanes, AVX2 +
//! FMA + F16C) and [`Avx512`] (16 lanes, AVX-512F). The blocks' kernels
//! ([`super::InPlace`]) are written once over [`BlockLanes`]; each width's driver
//! (`rows_avx2`, `rows_avx512`) carries the instruction sets, and every operation here is
//! inlined into it.
//!
//! Every operation is `unsafe`: the caller guarantees the CPU has the width's instruction
//! sets and, for the loads, that the elements read lie inside the slice.

use std::arch::x86_64::*;

/// A width's vectors of `f32` and `i32` and the operations the block kernels need.
pub(in super::super::super) trait BlockLanes {
    /// `WIDTH` lanes of `f32`.
    type F: Copy;
    /// `WIDTH` lanes of `i32`.
    type I: Copy;
    /// Lanes per vector.
    const WIDTH: usize;

    /// All zeros.
    ///
    /// # Safety
    /// The CPU has the width's instruction sets (so for every operation below).
    unsafe fn zero() -> Self::F;
    /// `x[at .. at + WIDTH]`.
    ///
    /// # Safety
    /// As [`BlockLanes::zero`], and `x` has at least `at + WIDTH` elements.
    unsafe fn load(x: &[f32], at: usize) -> Self::F;
    /// `block[at .. at + WIDTH]` zero-extended to `i32` lanes.
    ///
    /// # Safety
    /// As [`BlockLanes::zero`], and `block` has at least `at + WIDTH` bytes.
    unsafe fn bytes(block: &[u8], at: usize) -> Self::I;
    /// `block[at .. at + WIDTH]` as `i8`, sign-extended to `i32` lanes.
    ///
    /// # Safety
    /// As [`BlockLanes::bytes`].
    unsafe fn signed_bytes(block: &[u8], at: usize) -> Self::I;
    /// `v` in every `i32` lane.
    ///
    /// # Safety
    /// As [`BlockLanes::zero`].
    unsafe fn splat(v: i32) -> Self::I;
    /// `a & b`.
    ///
    /// # Safety
    /// As [`BlockLanes::zero`].
    unsafe fn and(a: Self::I, b: Self::I) -> Self::I;
    /// `a | b`.
    ///
    /// # Safety
    /// As [`BlockLanes::zero`].
    unsafe fn or(a: Self::I, b: Self::I) -> Self::I;
    /// `v << bits` (`bits < 32`).
    ///
    /// # Safety
    /// As [`BlockLanes::zero`].
    unsafe fn shift_left(v: Self::I, bits: usize) -> Self::I;
    /// `v >> bits`, logical (`bits < 32`).
    ///
    /// # Safety
    /// As [`BlockLanes::zero`].
    unsafe fn shift_right(v: Self::I, bits: usize) -> Self::I;
    /// The `i32` lanes as `f32` (exact for the blocks' small integers).
    ///
    /// # Safety
    /// As [`BlockLanes::zero`].
    unsafe fn to_f32(v: Self::I) -> Self::F;
    /// `a · b`.
    ///
    /// # Safety
    /// As [`BlockLanes::zero`].
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    /// `acc + a · b`, one rounding.
    ///
    /// # Safety
    /// As [`BlockLanes::zero`].
    unsafe fn fma(acc: Self::F, a: Self::F, b: Self::F) -> Self::F;
    /// Lane `lane` of `a` (a block's 8 group scales) in every lane.
    ///
    /// # Safety
    /// As [`BlockLanes::zero`].
    unsafe fn broadcast(a: __m256, lane: usize) -> Self::F;
    /// `acc − a · sums[at .. at + 8]` in the first 8 lanes (the others unchanged): a block's
    /// 8 group offsets against the input's group sums.
    ///
    /// # Safety
    /// As [`BlockLanes::zero`], and `sums` has at least `at + 8` elements.
    unsafe fn minus_offsets(acc: Self::F, a: __m256, sums: &[f32], at: usize) -> Self::F;
    /// The sum of the lanes of `a + b`, in a fixed order.
    ///
    /// # Safety
    /// As [`BlockLanes::zero`].
    unsafe fn sum(a: Self::F, b: Self::F) -> f32;
}

/// 8 lanes: AVX2 + FMA + F16C.
pub(super) struct Avx2;

impl BlockLanes for Avx2 {
    type F = __m256;
    type I = __m256i;
    const WIDTH: usize = 8;

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load(x: &[f32], at: usize) -> __m256 {
        // SAFETY: the caller's length guarantee.
        unsafe { _mm256_loadu_ps(x.as_ptr().add(at)) }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn bytes(block: &[u8], at: usize) -> __m256i {
        // SAFETY: the caller's length guarantee.
        _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(block.as_ptr().add(at).cast()) })
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn signed_bytes(block: &[u8], at: usize) -> __m256i {
        // SAFETY: the caller's length guarantee.
        _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(block.as_ptr().add(at).cast()) })
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn splat(v: i32) -> __m256i {
        _mm256_set1_epi32(v)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn and(a: __m256i, b: __m256i) -> __m256i {
        _mm256_and_si256(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn or(a: __m256i, b: __m256i) -> __m256i {
        _mm256_or_si256(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn shift_left(v: __m256i, bits: usize) -> __m256i {
        _mm256_sll_epi32(v, _mm_cvtsi32_si128(bits as i32))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn shift_right(v: __m256i, bits: usize) -> __m256i {
        _mm256_srl_epi32(v, _mm_cvtsi32_si128(bits as i32))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn to_f32(v: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(v)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma(acc: __m256, a: __m256, b: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, acc)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn broadcast(a: __m256, lane: usize) -> __m256 {
        _mm256_permutevar8x32_ps(a, _mm256_set1_epi32(lane as i32))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn minus_offsets(acc: __m256, a: __m256, sums: &[f32], at: usize) -> __m256 {
        // SAFETY: the caller's length guarantee.
        _mm256_fnmadd_ps(a, unsafe { Self::load(sums, at) }, acc)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sum(a: __m256, b: __m256) -> f32 {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds the 8 floats the store writes.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a, b)) };
        lanes.iter().sum()
    }
}

/// 16 lanes: AVX-512F (with AVX2 + FMA + F16C for the blocks' 8-lane scales).
pub(super) struct Avx512;

impl BlockLanes for Avx512 {
    type F = __m512;
    type I = __m512i;
    const WIDTH: usize = 16;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(x: &[f32], at: usize) -> __m512 {
        // SAFETY: the caller's length guarantee.
        unsafe { _mm512_loadu_ps(x.as_ptr().add(at)) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn bytes(block: &[u8], at: usize) -> __m512i {
        // SAFETY: the caller's length guarantee.
        _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(block.as_ptr().add(at).cast()) })
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn signed_bytes(block: &[u8], at: usize) -> __m512i {
        // SAFETY: the caller's length guarantee.
        _mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(block.as_ptr().add(at).cast()) })
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn splat(v: i32) -> __m512i {
        _mm512_set1_epi32(v)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn and(a: __m512i, b: __m512i) -> __m512i {
        _mm512_and_si512(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn or(a: __m512i, b: __m512i) -> __m512i {
        _mm512_or_si512(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn shift_left(v: __m512i, bits: usize) -> __m512i {
        _mm512_sll_epi32(v, _mm_cvtsi32_si128(bits as i32))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn shift_right(v: __m512i, bits: usize) -> __m512i {
        _mm512_srl_epi32(v, _mm_cvtsi32_si128(bits as i32))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn to_f32(v: __m512i) -> __m512 {
        _mm512_cvtepi32_ps(v)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fma(acc: __m512, a: __m512, b: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, acc)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn broadcast(a: __m256, lane: usize) -> __m512 {
        let picked = _mm256_permutevar8x32_ps(a, _mm256_set1_epi32(lane as i32));
        _mm512_broadcastss_ps(_mm256_castps256_ps128(picked))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn minus_offsets(acc: __m512, a: __m256, sums: &[f32], at: usize) -> __m512 {
        // SAFETY: the caller's length guarantee.
        let s = unsafe { _mm256_loadu_ps(sums.as_ptr().add(at)) };
        _mm512_fnmadd_ps(_mm512_zextps256_ps512(a), _mm512_zextps256_ps512(s), acc)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sum(a: __m512, b: __m512) -> f32 {
        _mm512_reduce_add_ps(_mm512_add_ps(a, b))
    }
}
