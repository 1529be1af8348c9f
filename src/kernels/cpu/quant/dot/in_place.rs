//! AVX2 kernels that read their blocks in place, for the types whose weights are cheap to
//! form straight from the block bytes: Q8_0 (`w = d · q`, one product) and Q4_K
//! (`w = (d · sc) · q − dmin · m` with 4-bit `q`). The generic kernel (`avx2.rs`) first
//! unpacks each block into a stack buffer of `i8`s and reads it back; these skip that copy
//! and convert the scales with F16C. Each weight is the same f32 value as the generic
//! kernel's (the same roundings), multiply-added into the same two accumulators per input
//! row in the same order, so the results are the same bits.

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{q4k_rows, q8_0_rows};

#[cfg(not(target_arch = "x86_64"))]
pub(super) use portable::{q4k_rows, q8_0_rows};

#[cfg(not(target_arch = "x86_64"))]
mod portable {
    use super::super::portable_rows;
    use super::super::unpack::{Q4K, Q8_0};

    /// The portable kernel (no AVX2 on this architecture).
    pub(in super::super) fn q8_0_rows<const N: usize>(rows: &[u8], xs: &[&[f32]], out: &mut [f32]) {
        portable_rows::<Q8_0, N>(rows, xs, out);
    }

    /// The portable kernel (no AVX2 on this architecture).
    pub(in super::super) fn q4k_rows<const N: usize>(rows: &[u8], xs: &[&[f32]], out: &mut [f32]) {
        portable_rows::<Q4K, N>(rows, xs, out);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_and_si256, _mm256_broadcastss_ps, _mm256_cvtepi32_ps,
        _mm256_cvtepi8_epi32, _mm256_cvtepu8_epi32, _mm256_fmadd_ps, _mm256_loadu_ps,
        _mm256_mul_ps, _mm256_set1_epi32, _mm256_set1_ps, _mm256_setzero_ps, _mm256_srli_epi32,
        _mm256_storeu_ps, _mm256_sub_ps, _mm_cvtph_ps, _mm_cvtsi32_si128, _mm_loadl_epi64,
    };

    use super::super::unpack::{k4_groups, Block, MAX_GROUPS, Q4K, Q8_0};
    use super::super::{avx2, portable_rows, row_bytes_of};

    /// Two 8-lane accumulators per input row.
    type Acc<const N: usize> = [[__m256; 2]; N];

    /// A block type these kernels read in place.
    trait InPlace: Block {
        /// `acc[i] += x_i[at ..] · w` over one whole block (`Self::BYTES` bytes); the
        /// input rows hold at least `at + Self::VALUES` values (callers check).
        ///
        /// # Safety
        /// The CPU has AVX2, FMA and F16C; `block.len() == Self::BYTES`; every `x` has at
        /// least `at + Self::VALUES` elements.
        unsafe fn block<const N: usize>(
            block: &[u8],
            at: usize,
            xs: &[&[f32]; N],
            acc: &mut Acc<N>,
        );
    }

    /// The Q8_0 kernel for `N` input rows (the portable one on a CPU without AVX2, FMA
    /// and F16C).
    pub(in super::super) fn q8_0_rows<const N: usize>(rows: &[u8], xs: &[&[f32]], out: &mut [f32]) {
        run::<Q8_0, N>(rows, xs, out);
    }

    /// The Q4_K kernel for `N` input rows (the portable one on a CPU without AVX2, FMA
    /// and F16C).
    pub(in super::super) fn q4k_rows<const N: usize>(rows: &[u8], xs: &[&[f32]], out: &mut [f32]) {
        run::<Q4K, N>(rows, xs, out);
    }

    fn run<B: InPlace, const N: usize>(rows: &[u8], xs: &[&[f32]], out: &mut [f32]) {
        let Ok(xs) = <&[&[f32]; N]>::try_from(xs) else {
            return;
        };
        let d_in = xs.first().map_or(0, |x| x.len());
        let fits = d_in > 0 && d_in.is_multiple_of(B::VALUES) && xs.iter().all(|x| x.len() == d_in);
        if !(fits && avx2::available() && is_x86_feature_detected!("f16c")) {
            return portable_rows::<B, N>(rows, xs, out);
        }
        // SAFETY: the CPU has AVX2, FMA and F16C, and the rows' lengths fit (checked above).
        unsafe { rows_avx2::<B, N>(rows, xs, out) }
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; every `x` has the same length, a nonzero multiple of
    /// `B::VALUES`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_avx2<B: InPlace, const N: usize>(
        rows: &[u8],
        xs: &[&[f32]; N],
        out: &mut [f32],
    ) {
        let row_bytes = row_bytes_of::<B>(xs);
        for (row, out) in rows
            .chunks_exact(row_bytes.max(1))
            .zip(out.chunks_exact_mut(N))
        {
            let mut acc = [[_mm256_setzero_ps(); 2]; N];
            for (b, block) in row.chunks_exact(B::BYTES).enumerate() {
                // SAFETY: `row` holds `d_in / VALUES` whole blocks, so block `b`'s values
                // end at `(b + 1) · VALUES ≤ d_in`; the CPU features are the caller's.
                unsafe { B::block(block, b * B::VALUES, xs, &mut acc) };
            }
            for (o, [a0, a1]) in out.iter_mut().zip(acc) {
                let mut lanes = [0f32; 8];
                // SAFETY: `lanes` holds the 8 floats the store writes.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a0, a1)) };
                *o = lanes.iter().sum();
            }
        }
    }

    /// The little-endian f16 at `block[at..at + 2]` in all 8 lanes, by F16C's exact
    /// conversion (0 past the end: callers pass whole blocks).
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    fn half_lanes(block: &[u8], at: usize) -> __m256 {
        let bits = match block.get(at..at + 2) {
            Some(&[lo, hi]) => i32::from(u16::from_le_bytes([lo, hi])),
            _ => 0,
        };
        _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    /// `acc[i][c % 2] += x_i[at + 8c ..][..8] · w` for the 8 weights `w` of chunk `c`.
    ///
    /// # Safety
    /// AVX2 and FMA; every `x` has at least `at + 8c + 8` elements.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn fma_chunk<const N: usize>(
        w: __m256,
        at: usize,
        c: usize,
        xs: &[&[f32]; N],
        acc: &mut Acc<N>,
    ) {
        for ([a0, a1], x) in acc.iter_mut().zip(xs) {
            // SAFETY: the caller's length guarantee.
            let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(at + 8 * c)) };
            let a = if c.is_multiple_of(2) { a0 } else { a1 };
            *a = _mm256_fmadd_ps(xv, w, *a);
        }
    }

    impl InPlace for Q8_0 {
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn block<const N: usize>(
            block: &[u8],
            at: usize,
            xs: &[&[f32]; N],
            acc: &mut Acc<N>,
        ) {
            let d = half_lanes(block, 0);
            for c in 0..4 {
                // SAFETY: the block is 34 bytes, so bytes `2 + 8c .. 10 + 8c` (c < 4) lie
                // inside it.
                let q8 = unsafe { _mm_loadl_epi64(block.as_ptr().add(2 + 8 * c).cast()) };
                let w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
                // SAFETY: `at + 32` values per row (the caller's guarantee).
                unsafe { fma_chunk(w, at, c, xs, acc) };
            }
        }
    }

    impl InPlace for Q4K {
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn block<const N: usize>(
            block: &[u8],
            at: usize,
            xs: &[&[f32]; N],
            acc: &mut Acc<N>,
        ) {
            let mut ab = [(0f32, 0f32); MAX_GROUPS];
            k4_groups(block, &mut ab);
            let low_nibble = _mm256_set1_epi32(0xF);
            // Group g = 2j + h takes nibble h (0 low, 1 high) of bytes 16 + 32j .. 48 + 32j.
            for (g, &(a, b)) in ab.iter().take(8).enumerate() {
                let (a, b) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
                let bytes = 16 + 32 * (g / 2);
                for c in 0..4 {
                    // SAFETY: the block is 144 bytes and `bytes + 8c + 8 ≤ 16 + 96 + 32`.
                    let q8 = unsafe { _mm_loadl_epi64(block.as_ptr().add(bytes + 8 * c).cast()) };
                    let wide = _mm256_cvtepu8_epi32(q8);
                    let q = if g.is_multiple_of(2) {
                        _mm256_and_si256(wide, low_nibble)
                    } else {
                        _mm256_srli_epi32::<4>(wide)
                    };
                    let w = _mm256_sub_ps(_mm256_mul_ps(a, _mm256_cvtepi32_ps(q)), b);
                    // SAFETY: values `at + 32g + 8c ..+8` lie within the block's 256.
                    unsafe { fma_chunk(w, at + 32 * g, c, xs, acc) };
                }
            }
        }
    }
}
