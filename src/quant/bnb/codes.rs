//! The 4-bit code books of bitsandbytes (`bitsandbytes.functional.get_4bit_type`, 0.50),
//! as the f32 bit patterns its dequantize kernels index: a stored nibble `c` stands for
//! `CODE[c] · absmax` of its block.

/// The f32 bit patterns of `NF4`, the 16 quantiles of a normal distribution scaled to
/// `[-1, 1]` (QLoRA's "NormalFloat"), code 7 being zero.
const NF4_BITS: [u32; 16] = [
    0xbf80_0000,
    0xbf32_39b1,
    0xbf06_6b30,
    0xbeca_32a0,
    0xbe91_a24d,
    0xbe3d_353f,
    0xbdba_7871,
    0x0000_0000,
    0x3da2_faff,
    0x3e24_cae3,
    0x3e7c_04dd,
    0x3ead_033a,
    0x3ee1_a4b8,
    0x3f10_07ab,
    0x3f39_13b3,
    0x3f80_0000,
];

/// The f32 bit patterns of bitsandbytes' `FP4` (a sign bit, two exponent bits, one
/// mantissa bit, normalised so that the largest is 1): codes 8..15 are the negatives of
/// 0..7, code 8 being `+0.0` as bitsandbytes stores it.
const FP4_BITS: [u32; 16] = [
    0x0000_0000,
    0x3baa_aaab,
    0x3f2a_aaab,
    0x3f80_0000,
    0x3eaa_aaab,
    0x3f00_0000,
    0x3e2a_aaab,
    0x3e80_0000,
    0x0000_0000,
    0xbbaa_aaab,
    0xbf2a_aaab,
    0xbf80_0000,
    0xbeaa_aaab,
    0xbf00_0000,
    0xbe2a_aaab,
    0xbe80_0000,
];

/// The 16 values of a code book from their bit patterns.
#[allow(clippy::indexing_slicing)] // `i < 16` indexes arrays of 16 (const fn: no iterators)
const fn values(bits: [u32; 16]) -> [f32; 16] {
    let mut out = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = f32::from_bits(bits[i]);
        i += 1;
    }
    out
}

/// NF4's values.
pub(crate) const NF4: [f32; 16] = values(NF4_BITS);

/// FP4's values.
pub(crate) const FP4: [f32; 16] = values(FP4_BITS);
