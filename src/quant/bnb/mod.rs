//! bitsandbytes 4-bit weights (NF4, FP4; with or without double quantization), as
//! transformers saves a model loaded with `BitsAndBytesConfig(load_in_4bit=True)` (the
//! Hub's `…-bnb-4bit` checkpoints). For a module `P` the checkpoint holds:
//!
//! | tensor | what |
//! |---|---|
//! | `P.weight` | `u8` `[⌈n/2⌉, 1]`: two 4-bit codes a byte, the first in the high nibble, over the flattened `(d_out, d_in)` weight |
//! | `P.weight.absmax` | one scale per block of `blocksize` values: f32, or `u8` codes under double quantization |
//! | `P.weight.quant_map` | the 16 values of the code book |
//! | `P.weight.nested_absmax`, `.nested_quant_map` | double quantization's second level (f32 scales, 256 codes) |
//! | `P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) | JSON bytes: type, block size, dtype, shape, nested settings ([`Bnb4Params`]) |
//!
//! The dequantized weight is `code[c] · absmax[block]`, computed in f32 and rounded to the
//! quant state's dtype, as bitsandbytes' `dequantize_4bit` (and so transformers'
//! `model.dequantize()` and PEFT's merge) computes it. A [`crate::quant::QuantizedWeight`]
//! holds such a weight as stored (`Checkpoint::load_bnb4`); the CPU
//! kernels dequantize it a tile of rows at a time as they do GGML blocks.

mod blocks;
mod codes;
mod params;
mod quantize;
mod simd;

pub(crate) use blocks::{Bnb4Blocks, StoredAbsmax};
pub use params::{Bnb4Params, Bnb4Type, NestedParams};
pub(crate) use simd::Lanes;
