//! Training rules that live beside the optimizer: per-step hooks and the step helper, the
//! grouped optimizer (LoRA+), LoRA-FA's gradient projection, Delta-LoRA's weight update,
//! AdaLoRA's rank allocation and LoRA-drop's two stages. Every rule selects its layers from
//! `&[Shared<dyn Adapter>]` (e.g. a model's whole [`crate::model::AdaptedSet`]) by their
//! [`crate::Variant`].

pub mod adalora;
pub mod adamw;
pub mod delta_lora;
pub mod hooks;
pub mod lora_drop;
pub mod lora_fa;
pub mod lora_plus;

pub use adalora::{
    budget_schedule, orthogonality_penalty, Budget, RankAllocator, RankAllocatorConfig,
};
pub use adamw::{GroupedAdamW, ParamGroup, ParamsAdamW};
pub use delta_lora::{DeltaLoraHook, DeltaLoraUpdate};
pub use hooks::{train_step, StepHook};
pub use lora_drop::{
    LayerImportance, LoraDrop, LoraDropConfig, LoraDropReport, SampleSize, Selection, Stage1,
};
pub use lora_fa::LoraFaProjection;
pub use lora_plus::{LoraPlus, GROUP_A, GROUP_B, GROUP_B_NO_DECAY, GROUP_EMBEDDING};
