//! [`TrainConfig`]: the training loop's settings.

use std::path::PathBuf;

use super::batching::{BatchOptions, Packing};
use super::schedule::{Decay, LrSchedule};
use crate::error::{Error, Result};

/// The training loop's settings. [`TrainConfig::new`] gives transformers `Trainer`-like
/// defaults: AdamW at 2e-4 without weight decay, 10% warmup then cosine to 0, gradient
/// clipping at norm 1, batches of 4 sequences of at most 256 tokens padded per batch.
///
/// ```
/// use lorakit::finetune::TrainConfig;
/// let mut config = TrainConfig::new(100);
/// config.grad_accum = 4; // an optimizer step every 4 batches
/// config.eval_every = Some(25);
/// assert!(config.validate().is_ok());
/// config.batch.seq_len = 1;
/// assert!(config.validate().is_err()); // a causal LM needs 2 tokens to predict one
/// ```
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Peak learning rate (LoRA+: A's rate; B's is `ratio ×` it).
    pub lr: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Batch size, sequence length, padding or packing, the padding id.
    pub batch: BatchOptions,
    /// Batches per optimizer step (gradient accumulation).
    pub grad_accum: usize,
    /// Optimizer steps to train (LoRA-drop's stage-1 steps come before and are not counted).
    pub max_steps: usize,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// The learning rate after warmup.
    pub decay: Decay,
    /// Clip the gradients' global norm to this (`None`: no clipping; the norm is still
    /// reported).
    pub max_grad_norm: Option<f64>,
    /// Evaluate every this many steps (and after the last), when an eval set is given.
    pub eval_every: Option<usize>,
    /// Save a checkpoint every this many steps (and after the last) under `output_dir`.
    pub save_every: Option<usize>,
    /// Where checkpoints go: `output_dir/checkpoint-<step>/`.
    pub output_dir: Option<PathBuf>,
    /// Seed of the data order (each epoch is shuffled by `(seed, epoch)`).
    pub seed: u64,
}

impl TrainConfig {
    /// The defaults (see the type's docs) for a run of `max_steps` optimizer steps.
    pub fn new(max_steps: usize) -> Self {
        Self {
            lr: 2e-4,
            weight_decay: 0.0,
            batch: BatchOptions {
                batch_size: 4,
                seq_len: 256,
                packing: Packing::Pad,
                pad_id: 0,
            },
            grad_accum: 1,
            max_steps,
            warmup_steps: max_steps / 10,
            decay: Decay::Cosine { min_ratio: 0.0 },
            max_grad_norm: Some(1.0),
            eval_every: None,
            save_every: None,
            output_dir: None,
            seed: 42,
        }
    }

    /// The learning-rate schedule these settings describe.
    pub fn schedule(&self) -> Result<LrSchedule> {
        LrSchedule::new(self.warmup_steps, self.max_steps, self.decay)
    }

    /// Checks every setting, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| {
            Err(Error::settings("training config", field, reason))
        };
        if !self.lr.is_finite() || self.lr < 0.0 {
            return bad("lr", format!("must be finite and >= 0, got {}", self.lr));
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return bad(
                "weight_decay",
                format!("must be finite and >= 0, got {}", self.weight_decay),
            );
        }
        if self.batch.batch_size == 0 {
            return bad("batch_size", "must be at least 1".to_string());
        }
        if self.batch.seq_len < 2 {
            return bad(
                "seq_len",
                format!(
                    "must be at least 2 (a token and the one it predicts), got {}",
                    self.batch.seq_len
                ),
            );
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1".to_string());
        }
        if let Some(n) = self.max_grad_norm {
            if !n.is_finite() || n <= 0.0 {
                return bad("max_grad_norm", format!("must be finite and > 0, got {n}"));
            }
        }
        for (field, every) in [
            ("eval_every", self.eval_every),
            ("save_every", self.save_every),
        ] {
            if every == Some(0) {
                return bad(field, "must be at least 1 (or None)".to_string());
            }
        }
        if self.save_every.is_some() && self.output_dir.is_none() {
            return bad(
                "save_every",
                "is set but output_dir is not: where would checkpoints go?".to_string(),
            );
        }
        self.schedule().map(|_| ())
    }
}
