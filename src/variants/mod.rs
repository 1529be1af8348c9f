//! The adapter layers, one module per variant, each with the same shape: a config struct,
//! `Layer::new(base, &config, vb)` for a fresh layer, `Layer::from_weights(name, base,
//! &config, weights)` for loaded or shared tensors, and the [`build`] traits that let
//! `model/` and `peft/` build any of them without knowing which.
//!
//! | variant | layer | config |
//! |---|---|---|
//! | LoRA, LoRA+ | [`LoraLinear`] | [`LoraConfig`] |
//! | LoRA, LoRA+ on an embedding | [`LoraEmbedding`] | [`LoraConfig`] |
//! | LoRA-FA | [`LoraFaLinear`] | [`LoraFaConfig`] (LoRA's) |
//! | LoRA-drop | [`LoraDropLinear`] | [`LoraDropLayerConfig`] (LoRA's) |
//! | Delta-LoRA | [`DeltaLoraLinear`] | [`DeltaLoraConfig`] (LoRA's, no dropout) |
//! | DoRA | [`DoraLinear`] | [`DoraConfig`] (LoRA's) |
//! | VeRA | [`VeraLinear`] | [`VeraConfig`] |
//! | AdaLoRA | [`AdaLoraLinear`] | [`AdaLoraConfig`] |
//!
//! Training rules (LoRA+ groups, LoRA-FA's projection, Delta-LoRA's update, AdaLoRA's
//! rank allocation, LoRA-drop's stages) are in [`crate::train`].

pub mod adalora;
pub mod build;
pub mod delta_lora;
pub mod dora;
pub mod lora;
pub mod lora_config;
pub mod lora_drop;
pub mod lora_embedding;
pub mod lora_fa;
mod lora_glue;
pub mod vera;

pub use adalora::{AdaLoraConfig, AdaLoraLinear, AdaLoraWeights};
pub use build::{AdapterLayer, ModuleSettings, PeftLayer, PeftModule, TensorSource};
pub use delta_lora::{DeltaLoraConfig, DeltaLoraLinear};
pub use dora::{DoraConfig, DoraLinear, DoraWeights};
pub use lora::{LoraConfig, LoraInit, LoraLinear};
pub use lora_drop::{LoraDropLayerConfig, LoraDropLinear};
pub use lora_embedding::LoraEmbedding;
pub use lora_fa::{LoraFaConfig, LoraFaLinear};
pub use vera::{VeraConfig, VeraLinear, VeraShared, VeraWeights};
