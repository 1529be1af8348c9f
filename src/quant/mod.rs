//! A quantized frozen base (QLoRA-style training): the frozen weight `W` held as candle
//! GGML blocks or bitsandbytes 4-bit blocks ([`QuantizedWeight`], [`bnb`]) while the
//! adapter trains in full precision. bitsandbytes blocks are expanded eight codes at a time
//! with AVX2 (portable code elsewhere) and decoded by an AVX2 kernel that dots each row
//! straight from its codes; the rest of this page describes both kinds.
//!
//! A [`crate::FrozenLinear`] built by [`crate::FrozenLinear::quantize`] or
//! [`crate::FrozenLinear::from_quantized`] is a base every variant takes. On the CPU the
//! fused kernel ([`crate::kernels`]) computes the base product `x Wᵀ` and the input gradient
//! `g W` from row tiles of `W` dequantized into one small reused buffer (about 1 MiB, at least
//! 256 rows with AVX-512 and 128 with AVX2: `kernels::cpu::quant`), with
//! the low-rank term accumulated into the same output buffer; there is never a gradient for
//! `W` and never a float copy of the whole `W`. A forward of at most 4 rows (decoding)
//! streams `W` instead: in f32 over Q8_0, Q4_K, Q5_K and Q6_K, fused dequantize-and-dot
//! kernels (AVX-512F or AVX2 + FMA + F16C when the CPU has them, else portable) dot each
//! row of `W` with the input rows straight from its blocks (the quantized integers
//! multiply-added with the f32 inputs, each group's offset taken from the input's sums);
//! other types and dtypes dequantize one row at a time into a `d_in` buffer and dot it in
//! f64. The products are exact with respect to the dequantized weight up to summation
//! order (candle's `QMatMul` and llama.cpp quantize the activations, so they are not used).
//! Other devices dequantize the whole weight per call and take the composed path.
//!
//! | operation over a quantized base | what happens |
//! |---|---|
//! | forward, backward (every variant but Delta-LoRA) | tiled products, no float `W` |
//! | DoRA's weight norm | computed once, tile by tile, and cached |
//! | merge | dequantize, merge: the base becomes a float weight (what a merged checkpoint holds) |
//! | unmerge | subtracts from that float weight (the base stays float) |
//! | Delta-LoRA | refused: it updates `W`, which has no float copy |

pub mod bnb;
mod dequant;
mod weight;

pub use bnb::{Bnb4Params, Bnb4Type};
pub(crate) use weight::tile_rows;
pub use weight::{QuantFormat, QuantizedWeight, QUANTIZE_TYPES};
