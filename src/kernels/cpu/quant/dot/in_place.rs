//! AVX2 and AVX-512F kernels that read their blocks in place: Q8_0 (`w = d · q`), Q4_K and
//! Q5_K (`w = a_g · q − b_g` with 4- or 5-bit `q` and per-group `a_g = d · sc`, `b_g = dmin
//! · m`) and Q6_K (`w = a_g · (q − 32)`, 6-bit `q`). They read the block bytes where they
//! lie (no unpacked copy), convert the scales with F16C, and take the offsets out of each
//! group's sum: `Σ x w = Σ x (a_g q) − b_g · Σ x`, `Σ x` per group computed once per
//! product by the caller (`RowDots::input_sums`). Q4_K and Q5_K multiply-add the
//! integer-valued `q` with the inputs and scale each group's sum once by `a_g`; Q8_0 and
//! Q6_K form each vector of weights `a_g · q` once and multiply-add it with every input
//! row. Each weight costs a conversion and one multiply-add per input row (and Q8_0's and
//! Q6_K's one product, shared by the rows), for 8 weights at a time with AVX2 and 16 with
//! AVX-512F. The
//! result is the dequantized-weight product up to f32 rounding order (tested against the
//! f64 product, `tests.rs`); the order is fixed per row of `W`, so it does not depend on
//! the thread count. On other architectures, and on x86 CPUs without AVX2, FMA and F16C,
//! the portable kernel runs.

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{rows, InPlace};

#[cfg(not(target_arch = "x86_64"))]
pub(super) use portable::{rows, InPlace};

#[cfg(not(target_arch = "x86_64"))]
mod portable {
    use super::super::portable_rows;
    use super::super::unpack::{Block, Q4K, Q5K, Q6K, Q8_0};

    /// A block type with an in-place kernel (none on this architecture).
    pub(in super::super) trait InPlace: Block {
        /// Values per group of the input sums the kernel reads (it reads none here).
        const SUM_GROUP: Option<usize> = None;
    }

    impl InPlace for Q8_0 {}
    impl InPlace for Q4K {}
    impl InPlace for Q5K {}
    impl InPlace for Q6K {}

    /// The portable kernel (no AVX2 or AVX-512 on this architecture).
    pub(in super::super) fn rows<B: InPlace, const N: usize, const WIDE: bool>(
        rows: &[u8],
        xs: &[&[f32]],
        sums: &[&[f32]],
        out: &mut [f32],
    ) {
        portable_rows::<B, N>(rows, xs, sums, out);
    }
}
