//! Software prefetch: a load asked for ahead of time, for the kernels that stream a weight
//! from memory faster than the hardware prefetchers keep up with (the decode kernels,
//! [`super::gemv`], and the quantized ones, [`super::quant`]).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

/// Asks the CPU to bring the cache line holding `p` into its caches ahead of a load. A hint
/// only: `p` is never dereferenced and need not point into any allocation (an x86
/// prefetch does not fault, whatever the address); nothing on other architectures.
#[inline(always)]
pub(super) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of every x86_64 CPU, and a prefetch reads nothing the program
    // sees: it neither faults nor changes a result.
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
