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
pub mod error;
pub mod frozen;
pub mod init;
pub mod kernels;
pub mod low_rank;
pub mod model;
pub mod peft;
pub mod shared;
pub mod train;
mod validate;
pub mod variants;

pub use adapter::{AdaptedBase, Adapter, ConfigEntry, NamedVar, ParamRole, Variant};
pub use error::{Error, Result, Scope};
pub use frozen::FrozenLinear;
pub use shared::Shared;
pub use train::{
    train_step, DeltaLoraHook, DeltaLoraUpdate, GroupedAdamW, LoraDrop, LoraDropConfig,
    LoraFaProjection, LoraPlus, ParamGroup, RankAllocator, RankAllocatorConfig, StepHook,
};
pub use variants::{
    AdaLoraConfig, AdaLoraLinear, AdaLoraWeights, DeltaLoraConfig, DeltaLoraLinear, DoraConfig,
    DoraLinear, DoraWeights, LoraConfig, LoraDropLayerConfig, LoraDropLinear, LoraFaConfig,
    LoraFaLinear, LoraInit, LoraLinear, VeraConfig, VeraLinear, VeraShared, VeraWeights,
};

/// The README's code blocks, compiled and run as doctests so the README stays in sync.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
