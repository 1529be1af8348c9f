//! Learning-rate schedules: linear warmup, then cosine, linear or constant, as
//! transformers' `get_scheduler` defines them.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What the learning rate does after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Decay {
    /// Half a cosine from 1 down to `min_ratio` (transformers' `cosine`, or
    /// `cosine_with_min_lr` with `min_lr_rate = min_ratio`).
    Cosine {
        /// The floor, as a fraction of the peak rate (0 for plain `cosine`).
        min_ratio: f64,
    },
    /// A straight line from 1 down to 0 at the last step (transformers' `linear`).
    Linear,
    /// Stays at 1 (transformers' `constant_with_warmup`).
    Constant,
}

/// The multiplier of the peak learning rate at each optimizer step: linear warmup over
/// `warmup_steps`, then `decay` until `total_steps`.
///
/// Steps count from 0 as transformers' schedulers do (the multiplier of the first update
/// is `factor(0)`, which is 0 with warmup), so a run gives the same rates as a
/// transformers `Trainer` run with `lr_scheduler_type` and `warmup_steps` set alike
/// (checked against `transformers.get_scheduler` in `tests/suite/finetune_train.rs`).
///
/// ```
/// use lorakit::finetune::schedule::{Decay, LrSchedule};
/// # fn main() -> lorakit::Result<()> {
/// let s = LrSchedule::new(10, 100, Decay::Cosine { min_ratio: 0.0 })?;
/// assert_eq!(s.factor(0), 0.0); // warmup starts at zero
/// assert_eq!(s.factor(5), 0.5);
/// assert_eq!(s.factor(10), 1.0); // the peak
/// assert!((s.factor(55) - 0.5).abs() < 1e-12); // half way down the cosine
/// assert!(LrSchedule::new(10, 5, Decay::Linear).is_err()); // warmup longer than the run
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    warmup_steps: usize,
    total_steps: usize,
    decay: Decay,
}

impl LrSchedule {
    /// A schedule over `total_steps` optimizer steps. Errors: `total_steps` 0, warmup
    /// longer than the run, or a cosine floor outside `[0, 1]`.
    pub fn new(warmup_steps: usize, total_steps: usize, decay: Decay) -> Result<Self> {
        let bad = |field: &'static str, reason: String| {
            Err(Error::settings("learning-rate schedule", field, reason))
        };
        if total_steps == 0 {
            return bad("total_steps", "must be at least 1".to_string());
        }
        if warmup_steps > total_steps {
            return bad(
                "warmup_steps",
                format!("{warmup_steps} is more than the run's {total_steps} steps"),
            );
        }
        if let Decay::Cosine { min_ratio } = decay {
            if !(0.0..=1.0).contains(&min_ratio) {
                return bad("min_ratio", format!("must be in [0, 1], got {min_ratio}"));
            }
        }
        Ok(Self {
            warmup_steps,
            total_steps,
            decay,
        })
    }

    /// The multiplier at 0-based optimizer step `step`.
    pub fn factor(&self, step: usize) -> f64 {
        let (step, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < warmup {
            return step / warmup.max(1.0);
        }
        let progress = (step - warmup) / (total - warmup).max(1.0);
        match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
            Decay::Cosine { min_ratio } => {
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                (cosine * (1.0 - min_ratio) + min_ratio).max(0.0)
            }
        }
    }

    /// Warmup steps.
    pub fn warmup_steps(&self) -> usize {
        self.warmup_steps
    }

    /// Total optimizer steps.
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// The decay after warmup.
    pub fn decay(&self) -> Decay {
        self.decay
    }
}
