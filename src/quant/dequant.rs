//! GGML blocks to f32: one row range of a quantized `(d_out, d_in)` weight at a time.
//!
//! GGML blocks run along the last dimension, so rows `j0 .. j0 + k` of a weight are the
//! contiguous byte range `j0 · row_bytes .. (j0 + k) · row_bytes`; each block type's
//! `GgmlType::to_float` (candle's own dequantizer) turns it into floats.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
};
use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

/// The blocks stored in `bytes`: a slice of `B` over the same memory.
fn as_blocks<B: GgmlType>(bytes: &[u8]) -> candle_core::Result<&[B]> {
    let size = std::mem::size_of::<B>();
    let aligned = (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<B>());
    if size == 0 || !bytes.len().is_multiple_of(size) || !aligned {
        candle_core::bail!(
            "quantized weight: {} bytes at {:p} are not whole, aligned {:?} blocks",
            bytes.len(),
            bytes.as_ptr(),
            B::DTYPE
        );
    }
    // SAFETY: GGML block types are `#[repr(C)]` plain data (integers, f16) for which every
    // bit pattern is valid; `bytes` is aligned for `B` and holds exactly `len / size` of
    // them (checked above), and the returned slice borrows `bytes`.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / size) })
}

/// `to_float` for block type `B`, with the lengths checked.
fn to_float_as<B: GgmlType>(bytes: &[u8], out: &mut [f32]) -> candle_core::Result<()> {
    let blocks = as_blocks::<B>(bytes)?;
    if blocks.len() * B::BLCK_SIZE != out.len() {
        candle_core::bail!(
            "quantized weight: {} {:?} blocks do not fill {} floats",
            blocks.len(),
            B::DTYPE,
            out.len()
        );
    }
    B::to_float(blocks, out);
    Ok(())
}

/// Dequantizes `bytes` (whole blocks of `dtype`) into `out`, whose length must be the number
/// of values they hold.
pub(crate) fn dequantize_into(
    dtype: GgmlDType,
    bytes: &[u8],
    out: &mut [f32],
) -> candle_core::Result<()> {
    match dtype {
        GgmlDType::F32 => to_float_as::<f32>(bytes, out),
        GgmlDType::F16 => to_float_as::<f16>(bytes, out),
        GgmlDType::BF16 => to_float_as::<bf16>(bytes, out),
        GgmlDType::Q4_0 => to_float_as::<BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => to_float_as::<BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => to_float_as::<BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => to_float_as::<BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => to_float_as::<BlockQ8_0>(bytes, out),
        GgmlDType::Q8_1 => to_float_as::<BlockQ8_1>(bytes, out),
        GgmlDType::Q2K => to_float_as::<BlockQ2K>(bytes, out),
        GgmlDType::Q3K => to_float_as::<BlockQ3K>(bytes, out),
        GgmlDType::Q4K => to_float_as::<BlockQ4K>(bytes, out),
        GgmlDType::Q5K => to_float_as::<BlockQ5K>(bytes, out),
        GgmlDType::Q6K => to_float_as::<BlockQ6K>(bytes, out),
        GgmlDType::Q8K => to_float_as::<BlockQ8K>(bytes, out),
    }
}
