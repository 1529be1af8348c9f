//! Training rules that live beside the optimizer: per-step hooks and the step helper.

pub mod hooks;

pub use hooks::{train_step, StepHook};
