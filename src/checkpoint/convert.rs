//! Float dtype conversion of raw little-endian tensor bytes, a chunk at a time.

use half::{bf16, f16};
use safetensors::tensor::Dtype;

/// Whether `dtype` is a float format this module converts (F64, F32, F16, BF16).
pub fn is_convertible_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// The stored dtype of a candle float dtype (`None` for integer dtypes).
pub fn stored_float(dtype: candle_core::DType) -> Option<Dtype> {
    match dtype {
        candle_core::DType::F64 => Some(Dtype::F64),
        candle_core::DType::F32 => Some(Dtype::F32),
        candle_core::DType::F16 => Some(Dtype::F16),
        candle_core::DType::BF16 => Some(Dtype::BF16),
        _ => None,
    }
}

/// The byte size of one element of a convertible float dtype.
fn width(dtype: Dtype) -> usize {
    dtype.bitsize() / 8
}

/// The first `N` bytes of `b` as an array (`b` holds exactly one element).
fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.iter_mut().zip(b).for_each(|(o, i)| *o = *i);
    out
}

/// Converts `bytes` (whole elements of dtype `from`) to dtype `to`, appending to `out`.
/// Rounds once to nearest even, as torch's `.to()` does: through f32 (exact for F32, F16
/// and BF16 sources), or straight from the f64 value for F64 sources.
/// Both dtypes must satisfy [`is_convertible_float`].
pub fn convert_into(from: Dtype, to: Dtype, bytes: &[u8], out: &mut Vec<u8>) {
    if from != Dtype::F64 {
        let mut values = Vec::new();
        decode_f32(from, bytes, &mut values);
        encode_f32(&values, to, out);
        return;
    }
    out.reserve(bytes.len() / width(from) * width(to));
    for v in bytes.chunks_exact(8).map(|b| f64::from_le_bytes(arr(b))) {
        match to {
            Dtype::F64 => out.extend_from_slice(&v.to_le_bytes()),
            Dtype::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&f16::from_f64(v).to_le_bytes()),
            _ => out.extend_from_slice(&bf16::from_f64(v).to_le_bytes()),
        }
    }
}

/// Appends the elements of `bytes` (dtype `from`, a convertible float) to `out` as f32
/// (exact from F16 and BF16; F64 rounded to nearest, as candle's `to_dtype` does).
pub fn decode_f32(from: Dtype, bytes: &[u8], out: &mut Vec<f32>) {
    out.reserve(bytes.len() / width(from));
    // One loop per dtype, so each compiles to a plain load-convert loop.
    match from {
        Dtype::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes(arr(b)))),
        Dtype::F64 => out.extend(
            bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(arr(b)) as f32),
        ),
        Dtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes(arr(b)).to_f32()),
        ),
        _ => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes(arr(b)).to_f32()),
        ),
    }
}

/// Appends `values` encoded as dtype `to` (a convertible float) to `out`, each rounded once
/// to nearest even, as candle's `to_dtype` does.
pub fn encode_f32(values: &[f32], to: Dtype, out: &mut Vec<u8>) {
    out.reserve(values.len() * width(to));
    match to {
        Dtype::F64 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&(v as f64).to_le_bytes())),
        Dtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
        _ => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_to_bf16_rounds_to_nearest_even_like_half() {
        let values = [1.0f32, -2.5, 1.0 + f32::EPSILON, 3.140625, 1e-30, f32::MAX];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        convert_into(Dtype::F32, Dtype::BF16, &bytes, &mut out);
        let got: Vec<bf16> = out
            .chunks(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]))
            .collect();
        let want: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn bf16_to_f32_is_exact() {
        let values = [
            bf16::from_f32(0.1),
            bf16::from_f32(-7.0),
            bf16::MIN_POSITIVE,
        ];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        convert_into(Dtype::BF16, Dtype::F32, &bytes, &mut out);
        let got: Vec<f32> = out
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, values.iter().map(|v| v.to_f32()).collect::<Vec<_>>());
    }
}
