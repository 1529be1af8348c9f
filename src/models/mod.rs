//! Transformer models built on the model-level API ([`crate::model::linear`],
//! [`crate::model::conv1d`], [`crate::model::embedding`]), so PEFT's target names and every
//! variant apply unchanged: [`gpt2`] (GPT-2 with its LM head or a classification head),
//! [`bert`] (BERT, the RoBERTa family, DistilBERT and ELECTRA for sequence
//! classification) and [`llama`] (the Llama family, as causal
//! LMs or sequence classifiers).
//!
//! Each model's logits are checked against transformers + PEFT on committed fixtures
//! (`tests/suite/models_*.rs`). candle-nn's fused kernels (softmax, LayerNorm, RMSNorm,
//! RoPE) have no backward in candle 0.11, so the models use them only where no gradient
//! flows (a merged or adapter-free forward) and differentiable ops otherwise: training
//! through any forward reaches every adapter. [`fused`] makes the Llama family's
//! differentiable ops (fused with their own backward on f32 CPU tensors) public for models
//! of your own.
//!
//! Generation: [`auto::AutoCausalLm`] loads a model folder by its `model_type` (Llama
//! family or GPT-2); each decoder has a KV cache ([`KvCache`], `forward_cached`, checked
//! equal to the full forward) and `generate` by a [`generation::GenerationConfig`]: greedy
//! or sampled ([`sampling`]: temperature, top-k, top-p, seeded), with stop tokens, one
//! sequence at a time (no batched generation). Greedy tokens are checked against
//! transformers' `generate` with PEFT adapters, unmerged and merged
//! (`tests/suite/generate.rs`, `scripts/make_generate_fixtures.py`). The `lorakit
//! generate` command runs it from the command line. Several adapters on one model with one
//! active (PEFT's `set_adapter`): build it with [`crate::model::NamedAdapters::plan`].
//!
//! Training: [`crate::finetune`]'s `Trainer` fine-tunes the causal LMs
//! ([`CausalLm`]) and the sequence classifiers ([`SequenceClassifier`]): BERT's, and the
//! decoders' (`LlamaForSequenceClassification`, `Gpt2ForSequenceClassification`, whose
//! `score` head reads each row's last token that is not padding; shared parts in
//! [`classification`]). [`AutoSequenceClassifier`] loads any of them by `model_type`.

mod attention_blocks;
mod attention_op;
pub mod auto;
mod auto_classifier;
mod base_prefix;
mod batch_generation;
pub mod bert;
mod causal_lm;
mod causal_mask;
pub(crate) mod clamped_swiglu;
pub mod classification;
mod cpu_op;
mod cross_entropy;
mod decoder_classifier;
mod decoder_trunk;
pub mod fused;
mod gelu;
pub mod generation;
pub mod gpt2;
mod head_cross_entropy;
mod kv_buffer;
mod layer_norm;
pub mod llama;
pub(crate) mod lm_loss;
#[cfg(test)]
pub(crate) mod op_test;
mod ops;
mod padding;
mod rms_norm;
mod rope_op;
pub mod sampling;
mod sequence_classifier;
mod softmax;
mod swiglu;

pub use auto::AutoCausalLm;
pub use auto_classifier::{AutoSequenceClassifier, CLASSIFIER_MODEL_TYPES};
pub use causal_lm::CausalLm;
pub use generation::GenerationConfig;
pub use llama::KvCache;
pub use sequence_classifier::SequenceClassifier;
