//! The x86-64 instruction sets that lorakit's 8-lane `f32` kernels need, checked at run time
//! (`std` caches each answer after the first call): the quantized-weight decode kernels
//! (`kernels::cpu::quant::dot`) and the bitsandbytes block expansion (`quant::bnb`) both
//! convert halves with F16C beside their AVX2 + FMA arithmetic.

/// Whether this CPU runs AVX2, FMA and F16C (every x86-64 CPU seen with AVX2 has all
/// three); `false` off x86-64.
pub(crate) fn avx2_fma_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
