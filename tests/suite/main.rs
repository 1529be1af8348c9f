//! lorakit's test suite, one binary: each module was once its own integration test
//! (`cargo test --test suite dora::` runs one). The counting-allocator tests have a binary
//! of their own, `tests/allocations/` (one global allocator per binary, and no other test
//! allocating while they count), and so does `tests/compare_variants.rs` (it includes the
//! flagship example's modules, which name each other from the crate root).

// clippy.toml keeps the library on `crate::matmul`; code outside it may call candle's own.
#![allow(clippy::disallowed_methods)]

mod bad_input_common;
mod common;
mod peft_common;
#[macro_use]
mod props_support;

mod adalora;
mod adapted_set;
mod api_shape;
mod atomic_save;
mod bad_input;
mod bad_input_train;
mod bnb_checkpoint;
mod candle_transformers_llama;
mod checkpoint_bad_input;
mod checkpoint_merge;
mod checkpoint_mxfp4;
mod checkpoint_pickle;
mod cli;
mod delta_lora;
mod delta_lora_in_place;
mod dora;
mod finetune_classify;
mod finetune_data;
mod finetune_gpt2;
mod finetune_train;
mod fused_kernel;
mod fused_ops;
mod fuzz_regressions;
mod generate;
mod gguf_export;
mod gguf_load;
mod grouped_adamw;
mod kernel_buffers;
mod lora;
mod lora_drop;
mod lora_drop_stratified;
mod lora_fa;
mod lora_fa_projection;
mod lora_plus;
mod merged_head;
mod models_bert;
mod models_bert_family;
mod models_bert_pooler;
mod models_decoder_cls;
mod models_dropout;
mod models_gemma3_multimodal;
mod models_gpt2;
mod models_gpt_oss;
mod models_llama;
mod models_moe;
mod models_moe_training;
mod named_adapters;
mod named_adapters_train;
mod numerics;
mod options_bad_input;
mod options_properties;
mod peft_base_residual;
mod peft_extensions;
mod peft_fixtures;
mod peft_options;
mod peft_pickle;
mod peft_roundtrip;
mod properties;
mod quant_base;
mod scaled_kernel;
mod target_match;
mod thread_determinism;
mod tied_head;
mod variants_peft;
mod vera;
