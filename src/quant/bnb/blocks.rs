//! A bitsandbytes 4-bit weight as stored, and its dequantization, value for value as
//! bitsandbytes' `dequantize_4bit` computes it.

use candle_core::DType;
use half::{bf16, f16};

use super::params::Bnb4Params;

/// The block scales as a checkpoint stores them.
#[derive(Clone, Debug)]
pub(crate) enum StoredAbsmax {
    /// One f32 scale per block (`<weight>.absmax`).
    Plain(Vec<f32>),
    /// Double quantization: one 8-bit code per block (`<weight>.absmax`), an f32 scale per
    /// `nested_blocksize` codes (`nested_absmax`) and the code book (`nested_quant_map`,
    /// 256 values).
    Nested {
        codes: Vec<u8>,
        scales: Vec<f32>,
        code: Vec<f32>,
    },
}

/// A bitsandbytes 4-bit weight: two codes per byte (the first value in the high nibble),
/// over the flattened `(d_out, d_in)` weight in row-major order, and one f32 scale per
/// block of `blocksize` values (double quantization undone once, on construction).
#[derive(Clone, Debug)]
pub(crate) struct Bnb4Blocks {
    params: Bnb4Params,
    packed: Vec<u8>,
    absmax: Vec<f32>,
}

impl Bnb4Blocks {
    /// The weight of `packed` codes and `absmax` scales with settings `params`; the reason
    /// it is refused otherwise (sizes that do not fit the shape, a non-finite scale).
    ///
    /// Double quantization is undone as bitsandbytes' `dequantize_4bit` does, in f32:
    /// `code[c] · nested_absmax[b / nested_blocksize]`, then `+ nested_offset`.
    pub(crate) fn new(
        params: Bnb4Params,
        packed: Vec<u8>,
        absmax: StoredAbsmax,
    ) -> Result<Self, String> {
        let (n, blocks) = (params.len(), params.blocks());
        if packed.len() != n.div_ceil(2) {
            return Err(format!(
                "{} packed bytes for a {:?} weight, expected {} (two values a byte)",
                packed.len(),
                params.shape,
                n.div_ceil(2)
            ));
        }
        let absmax = match absmax {
            StoredAbsmax::Plain(scales) => scales,
            StoredAbsmax::Nested {
                codes,
                scales,
                code,
            } => {
                let Some(nested) = params.nested else {
                    return Err("8-bit block scales without the nested settings".to_string());
                };
                let nested_blocks = codes.len().div_ceil(nested.blocksize);
                if code.len() != 256 || scales.len() != nested_blocks {
                    return Err(format!(
                        "nested_quant_map has {} values (expected 256) and nested_absmax {} \
                         (expected {nested_blocks} for {} codes in blocks of {})",
                        code.len(),
                        scales.len(),
                        codes.len(),
                        nested.blocksize
                    ));
                }
                codes
                    .chunks(nested.blocksize)
                    .zip(&scales)
                    .flat_map(|(codes, &scale)| {
                        let code = &code;
                        codes.iter().map(move |&c| {
                            code.get(usize::from(c)).copied().unwrap_or(f32::NAN) * scale
                                + nested.offset
                        })
                    })
                    .collect()
            }
        };
        if absmax.len() != blocks {
            return Err(format!(
                "{} block scales for {n} values in blocks of {}, expected {blocks}",
                absmax.len(),
                params.blocksize
            ));
        }
        if let Some(i) = absmax.iter().position(|s| !s.is_finite()) {
            return Err(format!("block {i}'s scale is not finite"));
        }
        Ok(Self {
            params,
            packed,
            absmax,
        })
    }

    /// The settings.
    pub(crate) fn params(&self) -> &Bnb4Params {
        &self.params
    }

    /// Bytes held: the codes and the f32 block scales.
    pub(crate) fn storage_bytes(&self) -> usize {
        self.packed.len() + 4 * self.absmax.len()
    }

    /// Writes the values `start .. start + out.len()` of the flattened weight into `out`:
    /// `code[c] · absmax[block]` in f32, rounded to the stored dtype (and held in f32),
    /// as bitsandbytes dequantizes. `false` when the range is outside the weight.
    pub(crate) fn dequantize_into(&self, start: usize, out: &mut [f32]) -> bool {
        let Some(end) = start
            .checked_add(out.len())
            .filter(|&e| e <= self.params.len())
        else {
            return false;
        };
        let code = self.params.quant_type.code();
        let round = rounding(self.params.dtype);
        let bs = self.params.blocksize;
        let mut at = start;
        let mut rest = out;
        while at < end {
            let block = at / bs;
            let stop = ((block + 1) * bs).min(end);
            let scale = self.absmax.get(block).copied().unwrap_or(f32::NAN);
            // The block's 16 possible values, each computed and rounded as bitsandbytes does.
            let table: [f32; 16] = code.map(|c| round(c * scale));
            let (head, tail) = rest.split_at_mut(stop - at);
            for (i, v) in (at..stop).zip(head.iter_mut()) {
                let byte = self.packed.get(i / 2).copied().unwrap_or(0);
                let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                *v = table.get(usize::from(nibble)).copied().unwrap_or(f32::NAN);
            }
            rest = tail;
            at = stop;
        }
        true
    }
}

/// An f32 rounded to `dtype` and back (f32 itself unchanged).
fn rounding(dtype: DType) -> fn(f32) -> f32 {
    match dtype {
        DType::BF16 => |v| bf16::from_f32(v).to_f32(),
        DType::F16 => |v| f16::from_f32(v).to_f32(),
        _ => |v| v,
    }
}
