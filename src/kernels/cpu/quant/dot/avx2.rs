//! The AVX2 + FMA kernel: 16 weights at a time (two 8-lane vectors converted from the
//! unpacked `i8`s, scaled by `a` and shifted by `b` exactly as `to_float` does), each
//! multiply-added into two accumulators per input row. Q8_0 and Q4_K have kernels that
//! read their blocks in place instead (`in_place.rs`).

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{available, rows};

#[cfg(not(target_arch = "x86_64"))]
pub(super) use portable::{available, rows};

#[cfg(not(target_arch = "x86_64"))]
mod portable {
    use super::super::{portable_rows, unpack::Block};

    /// Never on this architecture.
    pub(in super::super) fn available() -> bool {
        false
    }

    /// Not reached ([`available`] is false): the portable kernel.
    pub(in super::super) fn rows<B: Block, const N: usize>(
        rows: &[u8],
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        portable_rows::<B, N>(rows, xs, out);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_cvtepi32_ps, _mm256_cvtepi8_epi32, _mm256_fmadd_ps,
        _mm256_loadu_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
        _mm256_sub_ps, _mm_loadl_epi64,
    };

    use super::super::unpack::{Block, Unpacked, MAX_VALUES};
    use super::super::{block_of, portable_rows, row_bytes_of};

    /// Whether this CPU runs AVX2 and FMA (cached by `std` after the first call).
    pub(in super::super) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// The AVX2 kernel for `N` input rows (the portable one on a CPU without AVX2 + FMA).
    pub(in super::super) fn rows<B: Block, const N: usize>(
        rows: &[u8],
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        let Ok(xs) = <&[&[f32]; N]>::try_from(xs) else {
            return;
        };
        if !available() {
            return portable_rows::<B, N>(rows, xs, out);
        }
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { rows_avx2::<B, N>(rows, xs, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn rows_avx2<B: Block, const N: usize>(rows: &[u8], xs: &[&[f32]; N], out: &mut [f32]) {
        let row_bytes = row_bytes_of::<B>(xs);
        let mut u = Unpacked::new();
        for (row, out) in rows
            .chunks_exact(row_bytes.max(1))
            .zip(out.chunks_exact_mut(N))
        {
            let mut acc = [[_mm256_setzero_ps(); 2]; N];
            for (b, block) in row.chunks_exact(B::BYTES).enumerate() {
                B::unpack(block, &mut u);
                let x = xs.map(|x| block_of(x, b, B::VALUES));
                block_avx2(&u, B::VALUES, B::GROUP, &x, &mut acc);
            }
            for (o, [a0, a1]) in out.iter_mut().zip(acc) {
                let mut lanes = [0f32; 8];
                // SAFETY: `lanes` holds the 8 floats the store writes.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a0, a1)) };
                *o = lanes.iter().sum();
            }
        }
    }

    /// `acc[i] += x_i · w` over one unpacked block of `values` weights in groups of
    /// `group` (both multiples of 16); nothing when the lengths do not hold.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn block_avx2<const N: usize>(
        u: &Unpacked,
        values: usize,
        group: usize,
        x: &[&[f32]; N],
        acc: &mut [[__m256; 2]; N],
    ) {
        let shapes_ok = values <= MAX_VALUES
            && group >= 16
            && group.is_multiple_of(16)
            && values.is_multiple_of(group)
            && values / group <= u.ab.len()
            && x.iter().all(|x| x.len() == values);
        if !shapes_ok {
            return;
        }
        let q = u.q.as_ptr();
        for (g, &(a, b)) in u.ab.iter().take(values / group).enumerate() {
            let (a, b) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
            for k in (g * group..(g + 1) * group).step_by(16) {
                // SAFETY: `k + 16 <= values <= MAX_VALUES = u.q.len()` (checked above), so
                // both 8-byte loads read inside `u.q`.
                let (q0, q1) = unsafe {
                    (
                        _mm_loadl_epi64(q.add(k).cast()),
                        _mm_loadl_epi64(q.add(k + 8).cast()),
                    )
                };
                let w0 = _mm256_sub_ps(
                    _mm256_mul_ps(a, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0))),
                    b,
                );
                let w1 = _mm256_sub_ps(
                    _mm256_mul_ps(a, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1))),
                    b,
                );
                for (acc, x) in acc.iter_mut().zip(x) {
                    // SAFETY: `x.len() == values >= k + 16` (checked above).
                    let (x0, x1) = unsafe {
                        (
                            _mm256_loadu_ps(x.as_ptr().add(k)),
                            _mm256_loadu_ps(x.as_ptr().add(k + 8)),
                        )
                    };
                    acc[0] = _mm256_fmadd_ps(x0, w0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(x1, w1, acc[1]);
                }
            }
        }
    }
}
