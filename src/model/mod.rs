//! Model-level API: PEFT's target rules ([`target`]), the plan that decides which linear
//! layers get which adapter and the drop-in [`linear`] constructor ([`plan`]), and the set
//! of adapted layers of a model ([`adapted_set`]).

pub mod adapted_set;
pub mod plan;
pub mod target;
pub mod trainable_base;

pub use adapted_set::{AdaptedSet, ModelVar, ParamCounts};
pub use plan::{
    conv1d, embedding, linear, linear_b, linear_no_bias, AdapterFactory, AdapterPlan, Embedding,
    Linear, MergedModule,
};
pub use target::{
    FullRegex, LayerFilter, ModuleSelector, ModuleSettings, Pattern, RankAlpha, TargetSpec,
};
pub use trainable_base::{BiasMode, TrainableBase};
