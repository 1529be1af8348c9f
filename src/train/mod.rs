//! Training rules that live beside the optimizer: per-step hooks and the step helper, the
//! grouped optimizer (LoRA+), LoRA-FA's gradient projection, AdaLoRA's rank allocation and
//! LoRA-drop's layer selection.

pub mod adalora;
pub mod adamw;
pub mod hooks;
pub mod lora_drop;
pub mod lora_fa;
pub mod lora_plus;

pub use adalora::{
    budget_schedule, orthogonality_penalty, Budget, RankAllocator, RankAllocatorConfig,
};
pub use adamw::{GroupedAdamW, ParamGroup, ParamsAdamW};
pub use hooks::{train_step, StepHook};
pub use lora_drop::{LoraDropConfig, SampleSize, Selection};
pub use lora_fa::LoraFaProjection;
pub use lora_plus::{LoraPlus, GROUP_A, GROUP_B, GROUP_B_NO_DECAY, GROUP_EMBEDDING};
