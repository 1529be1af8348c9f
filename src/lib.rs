//! # lorakit
//!
//! LoRA-variant adapter layers for [candle](https://github.com/huggingface/candle): each
//! wraps a frozen linear layer, trains through candle's autograd, merges into and unmerges
//! from the base weight, and reads and writes Hugging Face PEFT adapter files.
//!
//! Every variant computes, at forward time,
//! `y = row_scale ⊙ (x Wᵀ + s · (x A_effᵀ) B_effᵀ) + b` (see [`kernels`]); variants differ in
//! how they build `A_eff`, `B_eff` and the row scale, and in their training rule.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Optimizer, VarBuilder, VarMap};
//! use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraLinear};
//! # fn main() -> lorakit::Result<()> {
//! let dev = Device::Cpu;
//! let base = FrozenLinear::new(Tensor::randn(0f32, 0.1, (8, 8), &dev)?, None)?;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let layer = LoraLinear::new(base, &LoraConfig::new(2, 4.0), vb.pp("proj"))?;
//! let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-2)?;
//! let (x, target) = (Tensor::randn(0f32, 1., (16, 8), &dev)?, Tensor::randn(0f32, 1., (16, 8), &dev)?);
//! for _ in 0..5 {
//!     let loss = (layer.forward_t(&x, true)? - &target)?.sqr()?.mean_all()?;
//!     opt.backward_step(&loss)?;
//! }
//! # Ok(()) }
//! ```
//!
//! # One shape for every variant
//!
//! Every layer is built by `Layer::new(base, &config, vb)` (fresh) or
//! `Layer::from_weights(name, base, &config, weights)` (loaded or shared tensors), is an
//! [`Adapter`], and reports its [`Variant`]. Every training rule in [`train`] takes a
//! model's layers as `&[Shared<dyn Adapter>]` and works on those of its variant. A model
//! built with [`model::linear`] takes any variant through [`model::AdapterPlan::of`].
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use lorakit::train::{DeltaLoraUpdate, RankAllocatorConfig};
//! use lorakit::*;
//! # fn main() -> lorakit::Result<()> {
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let base = || FrozenLinear::new(Tensor::randn(0f32, 0.1, (8, 8), &dev)?, None);
//! let pair = VeraShared::covering(16, 0, [(8, 8)], DType::F32, &dev)?;
//! let layers: Vec<Shared<dyn Adapter>> = vec![
//!     Shared::new(LoraLinear::new(base()?, &LoraConfig::new(4, 8.0), vb.pp("lora"))?).erase(),
//!     Shared::new(LoraFaLinear::new(base()?, &LoraFaConfig::new(4, 8.0), vb.pp("fa"))?).erase(),
//!     Shared::new(LoraDropLinear::new(base()?, &LoraConfig::new(4, 8.0), vb.pp("drop"))?).erase(),
//!     Shared::new(DeltaLoraLinear::new(base()?, &DeltaLoraConfig::new(4, 8.0), vb.pp("delta"))?).erase(),
//!     Shared::new(DoraLinear::new(base()?, &DoraConfig::new(4, 8.0), vb.pp("dora"))?).erase(),
//!     Shared::new(AdaLoraLinear::new(base()?, &AdaLoraConfig::new(4, 8.0), vb.pp("ada"))?).erase(),
//!     Shared::new(VeraLinear::new(base()?, &VeraConfig::new(pair), vb.pp("vera"))?).erase(),
//! ];
//! // LoRA+ is LoRA's layer with grouped learning rates.
//! let _lora_plus = LoraPlus::new(1e-3).build_from_shared(&layers)?;
//! let _fa = LoraFaProjection::new(&layers)?;
//! let _drop = LoraDrop::new(&layers, LoraDropConfig::default())?;
//! let _delta = DeltaLoraHook::new(&layers, DeltaLoraUpdate::new(0.5, 100))?;
//! let ada_config = RankAllocatorConfig { target_r: 2, ..RankAllocatorConfig::new(1000) };
//! let _ada = RankAllocator::new(&layers, ada_config)?;
//! let kinds: Vec<Variant> = layers.iter().map(|l| l.read().kind()).collect();
//! assert_eq!(kinds.len(), 7); // every variant but LoRA+, which trains LoRA layers
//! # Ok(()) }
//! ```

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod adapter;
pub mod checkpoint;
mod cpu_features;
pub mod error;
pub mod finetune;
pub mod frozen;
pub mod gguf;
pub mod init;
pub mod kernels;
mod linalg;
pub mod low_rank;
mod matmul;
pub mod memory;
pub mod model;
pub mod models;
pub mod peft;
pub mod quant;
pub mod shared;
pub mod staging;
pub mod threads;
pub mod tokenizer;
pub mod train;
mod validate;
pub mod variants;

pub use adapter::{AdaptedBase, Adapter, ConfigEntry, NamedVar, ParamRole, Variant};
pub use error::{Error, Result, Scope};
pub use frozen::{BaseKind, FrozenLinear};
pub use shared::Shared;
pub use train::{
    orthogonality_penalty, train_step, DeltaLoraHook, DeltaLoraUpdate, GroupedAdamW,
    LayerImportance, LoraDrop, LoraDropConfig, LoraDropReport, LoraFaProjection, LoraPlus,
    ParamGroup, RankAllocator, RankAllocatorConfig, SampleSize, Selection, Stage1, StepHook,
};
pub use variants::{
    AdaLoraConfig, AdaLoraLinear, AdaLoraWeights, DeltaLoraConfig, DeltaLoraLinear, DoraConfig,
    DoraLinear, DoraWeights, LoraConfig, LoraDropLayerConfig, LoraDropLinear, LoraEmbedding,
    LoraFaConfig, LoraFaLinear, LoraInit, LoraLinear, VeraConfig, VeraLinear, VeraShared,
    VeraWeights,
};

/// The README's code blocks, compiled and run as doctests so the README stays in sync.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
