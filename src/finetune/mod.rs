//! Fine-tuning a causal language model with any variant: data from JSONL through a
//! tokenizer ([`data`], [`batching`]), the causal-LM loss with prompt tokens masked out,
//! gradient accumulation and clipping, a warmup + cosine schedule, periodic eval loss,
//! PEFT adapter checkpoints and resume, and each variant's training rule.

pub mod batching;
pub mod data;
