//! Transformer models built on the model-level API ([`crate::model::linear`],
//! [`crate::model::conv1d`], [`crate::model::embedding`]), so PEFT's target names and every
//! variant apply unchanged: [`gpt2`] (GPT-2 LM head), [`bert`] (BERT for sequence
//! classification) and [`llama`] (the Llama family).
//!
//! Each model's logits are checked against transformers + PEFT on committed fixtures
//! (`tests/suite/models_*.rs`). candle-nn's fused kernels (softmax, LayerNorm, RMSNorm,
//! RoPE) have no backward in candle 0.11, so the models use them only where no gradient
//! flows (a merged or adapter-free forward) and differentiable ops otherwise: training
//! through any forward reaches every adapter.
//!
//! Partial (issue "Fine-tune real models in Rust"): full-sequence forwards, and greedy
//! decoding with a KV cache for the Llama family; sampling, generation for GPT-2, the
//! training loop, `finetune` and `lorakit generate` are not here yet.

pub mod bert;
mod causal_lm;
pub mod gpt2;
pub mod llama;
mod ops;

pub use causal_lm::CausalLm;
