//! Transformer models built on the model-level API ([`crate::model::linear`],
//! [`crate::model::conv1d`], [`crate::model::embedding`]), so PEFT's target names and every
//! variant apply unchanged: [`gpt2`] (GPT-2 LM head), [`bert`] (BERT for sequence
//! classification) and [`llama`] (the Llama family).
//!
//! Partial (issue "Fine-tune real models in Rust"): full-sequence forwards checked against
//! transformers + PEFT; generation with a KV cache, the training loop and the CLI are not
//! here yet.

pub mod bert;
pub mod gpt2;
pub mod llama;
