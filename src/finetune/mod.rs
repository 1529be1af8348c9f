//! Fine-tuning a causal language model with any variant: data from JSONL through a
//! tokenizer ([`data`], [`batching`]), the causal-LM loss with prompt tokens masked out
//! ([`loss`]), gradient accumulation and clipping ([`grads`]), a warmup + cosine schedule
//! ([`schedule`]), periodic eval loss, PEFT adapter checkpoints and resume, and each
//! variant's training rule ([`recipe`]).

pub mod batching;
pub mod data;
pub mod grads;
pub mod loss;
pub mod recipe;
pub mod schedule;

pub use recipe::AdapterRecipe;
pub mod checkpoint;
pub mod config;
mod cross_entropy;
mod cursor;
mod delta_base;
mod rule;
pub mod trainer;

pub use batching::{Batch, BatchOptions, Packing};
pub use config::TrainConfig;
pub use data::{Dataset, Example};
pub use trainer::{EvalLog, StepLog, TrainEvent, TrainReport, Trainer};
