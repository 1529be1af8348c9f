//! A bitsandbytes 4-bit weight as stored, and its dequantization, value for value as
//! bitsandbytes' `dequantize_4bit` computes it.

use candle_core::DType;
use half::f16;

use super::params::{Bnb4Params, Bnb4Type};

/// The block size [`Bnb4Blocks::quantize`] uses: bitsandbytes' default
/// (`bnb_4bit_blocksize`, 64).
pub(crate) const BLOCKSIZE: usize = 64;

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
        if values.len() != params.len() {
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
            let table: [f32; 16] = match round {
                Rounding::Bf16 => code.map(|c| round_to_bf16(c * scale)),
                Rounding::F16 => code.map(|c| f16::from_f32(c * scale).to_f32()),
                Rounding::None => code.map(|c| c * scale),
            };
            let (head, tail) = rest.split_at_mut(stop - at);
            self.expand(at, head, &table);
            rest = tail;
            at = stop;
        }
        true
    }
}

impl Bnb4Blocks {
    /// Writes `table[code]` for the codes of values `at .. at + out.len()` into `out`, two
    /// a byte (the first in the high nibble).
    fn expand(&self, at: usize, out: &mut [f32], table: &[f32; 16]) {
        let value = |nibble: u8| {
            table
                .get(usize::from(nibble & 0x0f))
                .copied()
                .unwrap_or(0.0)
        };
        let byte = |i: usize| self.packed.get(i / 2).copied().unwrap_or(0);
        let (mut i, mut out) = (at, out);
        if i % 2 == 1 {
            // A range that starts on a low nibble.
            let Some((first, rest)) = out.split_first_mut() else {
                return;
            };
            *first = value(byte(i));
            (i, out) = (i + 1, rest);
        }
        let bytes = self.packed.get(i / 2..).unwrap_or_default();
        let last_byte = byte(i + out.len().saturating_sub(1));
        let mut pairs = out.chunks_exact_mut(2);
        for (pair, &b) in (&mut pairs).zip(bytes) {
            if let [hi, lo] = pair {
                (*hi, *lo) = (value(b >> 4), value(b));
            }
        }
        if let [last] = pairs.into_remainder() {
            *last = value(last_byte >> 4);
        }
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

/// How values in `dtype` are rounded (f32: not at all).
fn rounding(dtype: DType) -> Rounding {
    match dtype {
        DType::BF16 => Rounding::Bf16,
        DType::F16 => Rounding::F16,
        _ => Rounding::None,
    }
}

/// `v` rounded to the nearest bf16, ties to even, as an f32 (as `half::bf16::from_f32`
/// for a finite `v`, which is all a finite block scale gives; a carry out of the largest
/// finite bf16 gives infinity as it does).
fn round_to_bf16(v: f32) -> f32 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
    f32::from_bits(rounded)
}

/// How dequantized values are rounded (the quant state's dtype).
#[derive(Clone, Copy)]
enum Rounding {
    Bf16,
    F16,
    None,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::checkpoint::Checkpoint;

    /// The fixture folder `tests/fixtures/bnb/<case>/<file>`.
    fn fixture(case: &str, file: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/bnb")
            .join(case)
            .join(file)
    }

    /// The float weights bitsandbytes quantized into each fixture checkpoint give the codes
    /// it stored (and, without double quantization, its block scales) bit for bit.
    #[test]
    fn quantizing_gives_the_codes_and_scales_bitsandbytes_stored() {
        for (case, quant_type) in [("nf4_dq", Bnb4Type::Nf4), ("fp4_f16", Bnb4Type::Fp4)] {
            let ckpt = Checkpoint::open(fixture(case, "model")).unwrap();
            let originals: HashMap<String, Tensor> = candle_core::safetensors::load(
                fixture(case, "originals.safetensors"),
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(originals.len(), 2);
            for (name, w) in &originals {
                let values: Vec<f32> = w
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let shape = w.dims2().unwrap();
                let mine = Bnb4Blocks::quantize(&values, shape, quant_type, w.dtype()).unwrap();
                let stored = ckpt.load_bnb4(name).unwrap();
                let stored = stored.bnb4_blocks().unwrap();
                assert_eq!(mine.packed, stored.packed, "{case} {name}: codes");
                assert_eq!(mine.params.dtype, stored.params.dtype);
                if stored.params.nested.is_none() {
                    let bits =
                        |b: &Bnb4Blocks| b.absmax.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&mine), bits(stored), "{case} {name}: scales");
                }
            }
        }
    }

    /// The bf16 rounding equals `half`'s on finite values: every exponent, the mantissas
    /// at and around the halfway points, and the largest values (which carry to infinity).
    #[test]
    fn bf16_rounding_is_halfs() {
        let mut checked = 0;
        for exponent in 0..255u32 {
            for low in [
                0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x1_7fff, 0x1_8000, 0x7f_ffff,
            ] {
                for sign in [0u32, 1 << 31] {
                    let v = f32::from_bits(sign | (exponent << 23) | low);
                    let want = half::bf16::from_f32(v).to_f32();
                    assert_eq!(round_to_bf16(v).to_bits(), want.to_bits(), "{v:e}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 255 * 9 * 2);
    }

    /// A block of code values times a scale quantizes to exactly those values; a last,
    /// partial block and an odd count are padded as bitsandbytes pads; non-finite values
    /// and wrong sizes are refused.
    #[test]
    fn code_values_round_trip_and_bad_input_is_refused() {
        for quant_type in [Bnb4Type::Nf4, Bnb4Type::Fp4] {
            let code = quant_type.code();
            // 3 rows of 45: two whole blocks and one of 7.
            let values: Vec<f32> = (0..135).map(|i| code[(i * 7) % 16] * 0.75).collect();
            let blocks = Bnb4Blocks::quantize(&values, (3, 45), quant_type, DType::F32).unwrap();
            assert_eq!((blocks.packed.len(), blocks.absmax.len()), (68, 3));
            let mut out = vec![0f32; 135];
            assert!(blocks.dequantize_into(0, &mut out));
            assert_eq!(out, values, "{quant_type:?}");
            // Rows of 45 start on odd values too.
            for (r, want) in values.chunks(45).enumerate() {
                let mut row = vec![0f32; 45];
                assert!(blocks.dequantize_into(r * 45, &mut row));
                assert_eq!(row, want, "{quant_type:?} row {r}");
            }
            assert!(!blocks.dequantize_into(100, &mut out));
            let nan = [f32::NAN; 4];
            let err = Bnb4Blocks::quantize(&nan, (2, 2), quant_type, DType::F32).unwrap_err();
            assert!(err.contains("not finite"), "{err}");
            assert!(Bnb4Blocks::quantize(&values, (2, 2), quant_type, DType::F32).is_err());
        }
    }
}
