//! Fine-tuning with any variant, in one loop ([`Trainer`]) for two tasks ([`task`]):
//!
//! - a causal language model: data from JSONL through a tokenizer ([`data`],
//!   [`batching`]), the causal-LM loss with prompt tokens masked out ([`loss`]);
//! - a sequence classifier (BERT's `SEQ_CLS`): labeled JSONL ([`labeled`]), transformers'
//!   loss for the problem type and the accuracy ([`classification`]);
//!
//! with gradient accumulation and clipping ([`grads`]), a warmup + cosine schedule
//! ([`schedule`]), periodic evaluation, PEFT adapter checkpoints and resume, and each
//! variant's training rule ([`recipe`]).

pub mod batching;
pub mod classification;
pub mod data;
pub mod grads;
mod jsonl;
pub mod labeled;
pub mod loss;
pub mod recipe;
pub mod schedule;
pub mod task;

pub use recipe::AdapterRecipe;
pub mod checkpoint;
pub mod config;
mod cursor;
mod delta_base;
mod rule;
pub mod trainer;

pub use batching::{Batch, BatchOptions, Packing};
pub use classification::SequenceClassification;
pub use config::TrainConfig;
pub use data::{Dataset, Example};
pub use labeled::{Label, LabeledDataset, LabeledExample};
pub use task::{LanguageModeling, Task, TaskData};
pub use trainer::{EvalLog, Evaluation, StepLog, TrainEvent, TrainReport, Trainer};
