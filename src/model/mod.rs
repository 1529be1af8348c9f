//! Model-level API: PEFT's target rules ([`target`]), the plan that decides which linear
//! layers get which adapter and the drop-in [`linear`] constructor ([`plan`]), and the set
//! of adapted layers of a model ([`adapted_set`]).

pub mod adapted_set;
pub mod plan;
pub mod target;

pub use adapted_set::{AdaptedSet, ModelVar, ParamCounts};
pub use plan::{linear, linear_b, linear_no_bias, AdapterFactory, AdapterPlan, Linear};
pub use target::{FullRegex, ModuleSelector, ModuleSettings, Pattern, RankAlpha, TargetSpec};
