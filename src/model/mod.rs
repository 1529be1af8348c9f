//! Model-level API: PEFT's target rules ([`target`]: `target_modules`, `exclude_modules`,
//! `layers_to_transform`, `modules_to_save`), the plan that decides which modules get which
//! adapter and the drop-in constructors [`linear`], [`conv1d`] (GPT-2) and [`embedding`]
//! ([`plan`]), fully trainable base modules ([`trainable_base`]: `modules_to_save` copies,
//! `bias = "all"` biases), the set of adapted layers of a model ([`adapted_set`]),
//! several named adapters on one model with one active ([`named`]), and
//! quantize-on-load of the frozen linears (QLoRA, [`quantize`]).

pub mod adapted_set;
pub mod named;
mod parameter_lora;
mod parameter_targets;
pub mod plan;
pub mod quantize;
mod slot;
mod stacked_lora;
pub mod target;
pub mod trainable_base;

pub use adapted_set::{AdaptedSet, ModelVar, ParamCounts};
pub use named::NamedAdapters;
pub use parameter_lora::ParameterLora;
pub use parameter_targets::ParameterTargets;
pub use plan::{
    conv1d, embedding, linear, linear_b, linear_no_bias, AdapterFactory, AdapterPlan, Embedding,
    Linear, MergedModule,
};
pub use quantize::{Quantize, QuantizedSource};
pub use stacked_lora::{StackedLora, StackedParameter};
pub use target::{
    FullRegex, LayerFilter, ModuleSelector, ModuleSettings, Pattern, RankAlpha, TargetSpec,
};
pub use trainable_base::{BiasMode, TrainableBase};
