//! Float weights quantized to bitsandbytes 4-bit blocks, as bitsandbytes' `quantize_4bit`
//! (its reference implementation, which its CPU backend runs) quantizes them without
//! double quantization.

use candle_core::DType;

use super::blocks::{Bnb4Blocks, StoredAbsmax};
use super::params::{Bnb4Params, Bnb4Type};

/// The block size [`Bnb4Blocks::quantize`] uses: bitsandbytes' default
/// (`bnb_4bit_blocksize`, 64).
pub(crate) const BLOCKSIZE: usize = 64;

impl Bnb4Blocks {
    /// Quantizes `values` (the flattened `shape` weight, in `dtype`, read as f32) as
    /// bitsandbytes' `quantize_4bit` does without double quantization, in blocks of
    /// [`BLOCKSIZE`]: each block's scale is its largest magnitude, each value `v · (1 /
    /// scale)` (a last, partial block: `v / scale`) clamped to `[-1, 1]` takes the code of
    /// the interval between the code book's midpoints it falls in (a midpoint itself goes
    /// down, as `torch.bucketize`). The reason it is refused otherwise (a non-finite value,
    /// sizes that do not match).
    pub(crate) fn quantize(
        values: &[f32],
        shape: (usize, usize),
        quant_type: Bnb4Type,
        dtype: DType,
    ) -> Result<Self, String> {
        let params = Bnb4Params {
            quant_type,
            blocksize: BLOCKSIZE,
            dtype,
            shape,
            nested: None,
        };
        if values.len() != params.value_count() {
            return Err(format!("{} values for a {shape:?} weight", values.len()));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(format!("value {i} of the weight is not finite"));
        }
        let (order, bounds) = code_intervals(quant_type.code());
        let code_of = |scaled: f32| {
            let interval = bounds.iter().filter(|&&b| b < scaled).count();
            order.get(interval).copied().unwrap_or(0)
        };
        let mut codes = Vec::with_capacity(values.len() + 1);
        let mut absmax = Vec::with_capacity(params.blocks());
        for block in values.chunks(BLOCKSIZE) {
            let scale = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            absmax.push(scale);
            let scale = scale.max(1e-38);
            let inverse = 1.0 / scale;
            let whole = block.len() == BLOCKSIZE;
            codes.extend(block.iter().map(|&v| {
                let scaled = if whole { v * inverse } else { v / scale };
                code_of(scaled.clamp(-1.0, 1.0))
            }));
        }
        if codes.len() % 2 == 1 {
            codes.push(code_of(0.0)); // bitsandbytes pads with a zero
        }
        let packed = codes.chunks(2).map(|pair| match pair {
            [hi, lo] => (hi << 4) | lo,
            _ => 0,
        });
        Self::new(params, packed.collect(), StoredAbsmax::Plain(absmax))
    }
}

/// The code book's codes in the order of their values, and the 15 midpoints between
/// consecutive values (f32, as bitsandbytes computes them): a scaled value above `k` of
/// the midpoints takes code `order[k]`. Equal values keep their code order.
fn code_intervals(code: &[f32; 16]) -> ([u8; 16], [f32; 15]) {
    let mut order: [u8; 16] = std::array::from_fn(|i| i as u8);
    let value = |c: u8| code.get(usize::from(c)).copied().unwrap_or(0.0);
    order.sort_by(|&a, &b| value(a).total_cmp(&value(b)));
    let bounds = std::array::from_fn(|i| {
        let (lo, hi) = (order.get(i), order.get(i + 1));
        (lo.map_or(0.0, |&c| value(c)) + hi.map_or(0.0, |&c| value(c))) / 2.0
    });
    (order, bounds)
}
