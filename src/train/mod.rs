//! Training rules that live beside the optimizer: per-step hooks and the step helper.

pub mod adalora;
pub mod hooks;
pub mod lora_drop;

pub use adalora::{
    budget_schedule, orthogonality_penalty, Budget, RankAllocator, RankAllocatorConfig,
};
pub use hooks::{train_step, StepHook};
pub use lora_drop::{LoraDropConfig, SampleSize, Selection};
