//! A bitsandbytes 4-bit weight as stored, and its dequantization, value for value as
//! bitsandbytes' `dequantize_4bit` computes it.

use candle_core::DType;
use half::f16;

use super::params::Bnb4Params;
use super::simd::{dot_blocks_avx2, expand_blocks_avx2, Lanes, Rounding};

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
        let (n, blocks) = (params.value_count(), params.blocks());
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
    /// as bitsandbytes dequantizes; whole blocks with `lanes` (the same values). `false`
    /// when the range is outside the weight.
    pub(crate) fn dequantize_into(&self, start: usize, out: &mut [f32], lanes: Lanes) -> bool {
        let Some(end) = start
            .checked_add(out.len())
            .filter(|&e| e <= self.params.value_count())
        else {
            return false;
        };
        let bs = self.params.blocksize;
        let simd = lanes == Lanes::Avx2 && bs.is_multiple_of(8);
        if !simd {
            self.expand_range(start, out);
            return true;
        }
        // A partial block before and after the whole ones.
        let first_whole = start.div_ceil(bs) * bs;
        let last_whole = (end / bs * bs).max(first_whole);
        let (head, rest) = out.split_at_mut((first_whole - start).min(out.len()));
        let (middle, tail) = rest.split_at_mut((last_whole - first_whole).min(rest.len()));
        self.expand_range(start, head);
        let code = self.params.quant_type.code();
        let round = rounding(self.params.dtype);
        let expanded = match self.whole_blocks(first_whole, last_whole) {
            Some((codes, scales)) => expand_blocks_avx2(codes, scales, code, bs, round, middle),
            None => false,
        };
        if !expanded {
            self.expand_range(first_whole, middle);
        }
        self.expand_range(last_whole.max(start), tail);
        true
    }

    /// `out[r] = Σ_k xs[r][k] · w_{start + k}` over the values `start ..` (as many as each
    /// input row has) in f32, when `lanes` is AVX2, the range is whole blocks and there are
    /// at most four rows (returns whether it did: the caller dequantizes and dots
    /// otherwise).
    pub(crate) fn dots(&self, start: usize, xs: &[&[f32]], out: &mut [f32], lanes: Lanes) -> bool {
        let bs = self.params.blocksize;
        let len = xs.first().map_or(0, |x| x.len());
        let applies = lanes == Lanes::Avx2 && start.is_multiple_of(bs) && len.is_multiple_of(bs);
        let Some((codes, scales)) = self.whole_blocks(start, start + len) else {
            return false;
        };
        let code = self.params.quant_type.code();
        let round = rounding(self.params.dtype);
        applies && dot_blocks_avx2(codes, scales, code, bs, round, xs, out)
    }

    /// The codes and scales of the whole blocks `start .. end` (both on block boundaries).
    fn whole_blocks(&self, start: usize, end: usize) -> Option<(&[u8], &[f32])> {
        let bs = self.params.blocksize;
        let codes = self.packed.get(start / 2..end / 2)?;
        let scales = self.absmax.get(start / bs..end / bs)?;
        Some((codes, scales))
    }

    /// [`Bnb4Blocks::dequantize_into`] a value at a time, for a range inside the weight.
    fn expand_range(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
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
    }

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

#[cfg(test)]
#[path = "blocks_tests.rs"]
mod tests;
