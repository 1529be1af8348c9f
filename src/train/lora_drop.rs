//! LoRA-drop's (Zhou et al. 2024, arXiv 2402.07721) training policy: the stage-1 sample,
//! the importance normalization, and which layers keep their own LoRA pair.
//!
//! The layers and the switch to shared pairs are in [`crate::variants::lora_drop`].

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// How much of the training data stage 1 uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SampleSize {
    /// A fraction in `(0, 1]` of the examples (rounded, at least one).
    Fraction(f64),
    /// A fixed number of examples (at least one, at most all).
    Count(usize),
}

/// Which layers keep their own pair.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Selection {
    /// Layers in descending importance until the cumulative importance reaches this value
    /// in `(0, 1]` (the layer that reaches it is kept).
    Threshold(f64),
    /// The `n` most important layers.
    TopN(usize),
}

/// LoRA-drop's settings. Defaults: 10% of the data, 100 stage-1 steps, threshold 0.9,
/// seed 0. The paper samples with stratification by label; this sample is uniform.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraDropConfig {
    /// Stage-1 sample.
    pub sample: SampleSize,
    /// Training steps on the sample before calibration.
    pub stage1_steps: usize,
    /// Layer selection.
    pub selection: Selection,
    /// Seed of the stage-1 sample (the shared pairs' init uses the `LoraConfig` given to
    /// [`crate::LoraDrop::share_unselected`]).
    pub seed: u64,
}

impl Default for LoraDropConfig {
    fn default() -> Self {
        Self {
            sample: SampleSize::Fraction(0.1),
            stage1_steps: 100,
            selection: Selection::Threshold(0.9),
            seed: 0,
        }
    }
}

fn invalid(field: &'static str, reason: String) -> Error {
    Error::InvalidConfig {
        layer: "lora_drop".into(),
        field,
        reason,
    }
}

/// A deterministic sample of `size` example indices out of `0..n` (seeded shuffle), sorted.
pub fn sample_indices(n: usize, size: SampleSize, seed: u64) -> Result<Vec<usize>> {
    if n == 0 {
        return Err(invalid("sample", "the training data is empty".into()));
    }
    let count = match size {
        SampleSize::Fraction(f) if f > 0.0 && f <= 1.0 => ((f * n as f64).round() as usize).max(1),
        SampleSize::Fraction(f) => {
            return Err(invalid(
                "sample",
                format!("fraction must be in (0, 1], got {f}"),
            ))
        }
        SampleSize::Count(c) if (1..=n).contains(&c) => c,
        SampleSize::Count(c) => {
            return Err(invalid(
                "sample",
                format!("count must be in 1..={n} (the data size), got {c}"),
            ))
        }
    };
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    idx.truncate(count);
    idx.sort_unstable();
    Ok(idx)
}

/// `I_i = g_i / Σ_j g_j`; all-zero (or empty) scores give a uniform importance.
pub fn normalize_importance(raw: &[f64]) -> Result<Vec<f64>> {
    if let Some((i, g)) = raw
        .iter()
        .enumerate()
        .find(|(_, g)| !(g.is_finite() && **g >= 0.0))
    {
        return Err(invalid(
            "importance",
            format!("layer #{i} has a non-finite or negative score {g}"),
        ));
    }
    let total: f64 = raw.iter().sum();
    if total <= 0.0 {
        let n = raw.len().max(1) as f64;
        return Ok(raw.iter().map(|_| 1.0 / n).collect());
    }
    Ok(raw.iter().map(|g| g / total).collect())
}

/// Which layers keep their own pair, from normalized importances (ties: lower index first).
pub fn select_layers(importance: &[f64], selection: Selection) -> Result<Vec<bool>> {
    let mut order: Vec<usize> = (0..importance.len()).collect();
    let at = |i: usize| importance.get(i).copied().unwrap_or(0.0);
    order.sort_by(|&x, &y| at(y).total_cmp(&at(x)).then(x.cmp(&y)));
    let mut keep = vec![false; importance.len()];
    match selection {
        Selection::Threshold(t) if t > 0.0 && t <= 1.0 => {
            let mut cum = 0.0;
            for i in order {
                if cum >= t {
                    break;
                }
                cum += at(i);
                if let Some(k) = keep.get_mut(i) {
                    *k = true;
                }
            }
        }
        Selection::Threshold(t) => {
            return Err(invalid("threshold", format!("must be in (0, 1], got {t}")))
        }
        Selection::TopN(n) => {
            for i in order.into_iter().take(n) {
                if let Some(k) = keep.get_mut(i) {
                    *k = true;
                }
            }
        }
    }
    Ok(keep)
}
