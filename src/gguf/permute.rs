//! The row permutation llama.cpp's converter applies to `q_proj` / `k_proj` for the `llama`
//! architecture, and its inverse.
//!
//! Hugging Face's Llama rotates each head's dimension `i` with `i + head_dim/2` (rotate
//! half); llama.cpp's `llama` graph rotates adjacent pairs `(2j, 2j+1)`. The converter
//! (`LlamaModel.permute` in `conversion/llama.py`, formerly `convert_hf_to_gguf.py`)
//! therefore reorders each head's output rows:
//!
//! ```text
//! weights.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(weights.shape)
//! ```
//!
//! with `n_head = num_attention_heads` for `q_proj` and `num_key_value_heads` for
//! `k_proj` (a LoRA's `lora_B` gets the same reordering, `lora_A` none:
//! `convert_lora_to_gguf.py`'s `LoraTorchTensor.permute`). Row `h·d + 2j + s` of the
//! result is row `h·d + s·d/2 + j` of the input (`d = rows / n_head`).

use std::borrow::Cow;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// For each output row of the converter's permutation, the input row it takes.
///
/// ```
/// use lorakit::gguf::permute::rope_permutation;
/// # fn main() -> lorakit::Result<()> {
/// // One head of 4 rows: HF pairs (0, 2) and (1, 3) become llama.cpp's (0, 1) and (2, 3).
/// assert_eq!(rope_permutation(4, 1, "q_proj")?, [0, 2, 1, 3]);
/// assert!(rope_permutation(6, 2, "k_proj").is_err()); // 3 rows a head: odd
/// # Ok(()) }
/// ```
pub fn rope_permutation(rows: usize, n_head: usize, what: &str) -> Result<Vec<usize>> {
    let head = match rows.checked_div(n_head) {
        Some(d) if d * n_head == rows && d % 2 == 0 => d,
        _ => {
            return Err(Error::ShapeMismatch {
                layer: what.to_string(),
                what: "rows per head of llama.cpp's RoPE permutation".to_string(),
                expected: format!("{n_head} heads of an even number of rows"),
                got: format!("{rows} rows"),
            })
        }
    };
    let half = head / 2;
    Ok((0..rows)
        .map(|o| {
            let (h, i) = (o / head, o % head);
            h * head + (i % 2) * half + i / 2
        })
        .collect())
}

/// The inverse of a permutation given as "output row takes input row".
pub fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (o, &i) in perm.iter().enumerate() {
        if let Some(slot) = inv.get_mut(i) {
            *slot = o;
        }
    }
    inv
}

/// `t`'s rows (dimension 0) reordered: row `o` of the result is row `perm[o]` of `t`.
pub fn gather_rows(t: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let idx: Vec<u32> = perm
        .iter()
        .map(|&i| u32::try_from(i).unwrap_or(u32::MAX))
        .collect();
    let idx = Tensor::new(idx.as_slice(), t.device())?;
    Ok(t.index_select(&idx, 0)?)
}

/// A quantized (or float) GGUF tensor's rows reordered the same way, by moving whole rows of
/// blocks: exact for every type (a block never spans two rows, GGUF's innermost dimension
/// being a multiple of the block size). `t`'s shape is in candle's order (rows first).
pub fn gather_qtensor_rows(
    t: &QTensor,
    perm: &[usize],
    name: &str,
    device: &Device,
) -> Result<QTensor> {
    let rows = t.shape().dims().first().copied().unwrap_or(1);
    let data = t.data()?;
    let row_bytes = data.len() / rows.max(1);
    if rows != perm.len() || row_bytes * rows != data.len() {
        return Err(Error::ShapeMismatch {
            layer: name.to_string(),
            what: "rows to permute".to_string(),
            expected: format!("{} rows", perm.len()),
            got: format!("shape {:?}, {} bytes", t.shape().dims(), data.len()),
        });
    }
    let mut out = Vec::with_capacity(data.len());
    for &i in perm {
        let row = data
            .get(i * row_bytes..(i + 1) * row_bytes)
            .ok_or_else(|| Error::ShapeMismatch {
                layer: name.to_string(),
                what: "row index".to_string(),
                expected: format!("< {rows}"),
                got: i.to_string(),
            })?;
        out.extend_from_slice(row);
    }
    let storage = QStorage::from_data(Cow::Owned(out), device, t.dtype())?;
    Ok(QTensor::new(storage, t.shape().clone())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// The converter's reshape / swapaxes / reshape, done with candle's ops.
    fn converter_permute(w: &Tensor, n_head: usize) -> Tensor {
        let (rows, cols) = w.dims2().unwrap();
        w.reshape((n_head, 2, rows / n_head / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap()
    }

    #[test]
    fn matches_the_converters_reshape_and_inverts() {
        let w = Tensor::arange(0f32, 24. * 3., &Device::Cpu)
            .unwrap()
            .reshape((24, 3))
            .unwrap();
        for n_head in [1, 2, 3, 6] {
            let perm = rope_permutation(24, n_head, "w").unwrap();
            let got = gather_rows(&w, &perm).unwrap();
            let want = converter_permute(&w, n_head);
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap()
            );
            let back = gather_rows(&got, &inverse(&perm)).unwrap();
            assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        }
    }

    #[test]
    fn quantized_rows_move_whole() {
        let w = Tensor::randn(0f32, 1., (8, 64), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let perm = rope_permutation(8, 2, "w").unwrap();
        let moved = gather_qtensor_rows(&q, &perm, "w", &Device::Cpu).unwrap();
        let want = gather_rows(&q.dequantize(&Device::Cpu).unwrap(), &perm).unwrap();
        let got = moved.dequantize(&Device::Cpu).unwrap();
        assert_eq!(
            got.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
    }
}
