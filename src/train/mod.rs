//! Training rules that live beside the optimizer: per-step hooks and the step helper.

pub mod adamw;
pub mod hooks;
pub mod lora_fa;
pub mod lora_plus;

pub use adamw::{GroupedAdamW, ParamGroup, ParamsAdamW};
pub use hooks::{train_step, StepHook};
pub use lora_fa::LoraFaProjection;
pub use lora_plus::{LoraPlus, GROUP_A, GROUP_B, GROUP_B_NO_DECAY, GROUP_EMBEDDING};
