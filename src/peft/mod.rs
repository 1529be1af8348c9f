//! Hugging Face PEFT adapter files: `adapter_config.json` ([`config`]), loading and
//! attaching to a model ([`load`]; under a name beside other adapters with
//! [`NamedAdapters::load_peft`](crate::model::NamedAdapters::load_peft)), saving ([`save`]), merging into a base model file
//! ([`merge`](mod@merge)) and summarizing ([`inspect`](mod@inspect)).

pub mod base_residual;
pub mod config;
pub mod inspect;
pub mod load;
mod load_named;
pub mod lora_extensions;
pub mod merge;
mod merged_config;
mod module_names;
mod parameter_config;
pub mod save;
mod tied_head;
pub mod var_builder;
pub mod weights_file;

pub use crate::model::BiasMode;
pub use base_residual::BaseResidual;
pub use config::{PeftConfig, PeftType, MAX_RANK, SUPPORTED_PEFT_TYPES};
pub use inspect::{
    inspect, inspect_against, not_an_adapter, AdapterSummary, CheckpointMatch, Fit, ImpliedShape,
    ModuleMatch, ModuleSummary,
};
pub use load::PeftAdapter;
pub use merge::{
    merge_checkpoint, merge_files, MergeOptions, MergeProgress, MergeReport, OutputDType,
    ProgressFn,
};
pub use save::{save_adapter, write_atomic};
pub use var_builder::adapted_var_builder;
