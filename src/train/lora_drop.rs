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
/// seed 0. [`crate::LoraDrop::stage1`] draws a uniform sample;
/// [`crate::LoraDrop::stage1_stratified`] the paper's sample stratified by label.
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
    let count = sample_count(n, size)?;
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    idx.truncate(count);
    idx.sort_unstable();
    Ok(idx)
}

/// The paper's stratified sample: `size` example indices out of `0..labels.len()` such
/// that every label keeps its share of the data. Each label gets `count · n_label / n`
/// examples, rounded by largest remainder (ties to the smaller label) so the counts add up
/// to exactly the size [`sample_indices`] would draw; within a label the examples are a
/// seeded shuffle. Deterministic for a seed; sorted.
///
/// ```
/// use lorakit::train::lora_drop::{stratified_sample_indices, SampleSize};
/// // 8 examples of label 0, 2 of label 1: a 50% sample keeps 4 and 1.
/// let labels = [0, 0, 1, 0, 0, 0, 1, 0, 0, 0];
/// let sample = stratified_sample_indices(&labels, SampleSize::Fraction(0.5), 7)?;
/// assert_eq!(sample.len(), 5);
/// assert_eq!(sample.iter().filter(|&&i| labels[i] == 1).count(), 1);
/// # Ok::<(), lorakit::Error>(())
/// ```
pub fn stratified_sample_indices<L: Ord>(
    labels: &[L],
    size: SampleSize,
    seed: u64,
) -> Result<Vec<usize>> {
    let n = labels.len();
    let count = sample_count(n, size)?;
    let mut classes: std::collections::BTreeMap<&L, Vec<usize>> = Default::default();
    for (i, label) in labels.iter().enumerate() {
        classes.entry(label).or_default().push(i);
    }
    // Largest-remainder quotas: floor(count · n_c / n), then +1 for the largest remainders.
    let mut quotas: Vec<(usize, usize)> = classes
        .values()
        .map(|members| {
            let exact = count * members.len();
            (exact / n, exact % n)
        })
        .collect();
    let short = count - quotas.iter().map(|q| q.0).sum::<usize>();
    let mut by_remainder: Vec<usize> = (0..quotas.len()).collect();
    by_remainder.sort_by(|&a, &b| {
        let rem = |i: usize| quotas.get(i).map_or(0, |q| q.1);
        rem(b).cmp(&rem(a)).then(a.cmp(&b))
    });
    for i in by_remainder.into_iter().take(short) {
        if let Some(q) = quotas.get_mut(i) {
            q.0 += 1;
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sample = Vec::with_capacity(count);
    for (mut members, (quota, _)) in classes.into_values().zip(quotas) {
        members.shuffle(&mut rng);
        sample.extend(members.into_iter().take(quota));
    }
    sample.sort_unstable();
    Ok(sample)
}

/// How many of `n` examples `size` asks for (at least one), or an error naming the bad size.
fn sample_count(n: usize, size: SampleSize) -> Result<usize> {
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
    Ok(count)
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
