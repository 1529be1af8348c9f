//! LoRA-drop's (Zhou et al. 2024, arXiv 2402.07721) training rule: the stage-1 sample,
//! training stage 1, the calibration of each layer's importance, which layers keep their
//! own LoRA pair, and the switch of the others to shared pairs ([`LoraDrop`]).
//!
//! The layer, with its calibration probe, is [`crate::LoraDropLinear`].

use std::collections::{BTreeMap, HashSet};

use candle_core::Var;
use candle_nn::VarBuilder;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::adapter::{Adapter, Variant};
use crate::error::{Error, Result};
use crate::low_rank::{trainable_var, Factor, LowRankPair};
use crate::shared::Shared;
use crate::train::hooks::{layer_as, layer_as_mut, select_kind};
use crate::variants::lora::{LoraConfig, LoraInit};
use crate::variants::lora_drop::LoraDropLinear;

/// How LoRA-drop names itself in errors.
const RULE: &str = "LoRA-drop";

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
/// seed 0, shared pairs with LoRA's default init and seed 0. [`LoraDrop::stage1`] draws a
/// uniform sample; [`LoraDrop::stage1_stratified`] the paper's sample stratified by label.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraDropConfig {
    /// Stage-1 sample.
    pub sample: SampleSize,
    /// Training steps on the sample before calibration.
    pub stage1_steps: usize,
    /// Layer selection.
    pub selection: Selection,
    /// Seed of the stage-1 sample.
    pub seed: u64,
    /// Init scheme of the shared pairs (stage 2 restarts the shared layers from it).
    pub shared_init: LoraInit,
    /// Seed of the shared pairs' init.
    pub shared_seed: u64,
}

impl Default for LoraDropConfig {
    fn default() -> Self {
        Self {
            sample: SampleSize::Fraction(0.1),
            stage1_steps: 100,
            selection: Selection::Threshold(0.9),
            seed: 0,
            shared_init: LoraInit::Default,
            shared_seed: 0,
        }
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

impl LoraDropConfig {
    /// Checks the sample size (a fraction in `(0, 1]` or a count of at least one) and the
    /// selection (a threshold in `(0, 1]`). A count's upper bound, the data size, is checked
    /// when stage 1 draws the sample.
    pub fn validate(&self) -> Result<()> {
        sample_count(usize::MAX, self.sample)?;
        select_layers(&[], self.selection)?;
        Ok(())
    }
}

/// How many of `n` examples `size` asks for (at least one), or an error naming the bad size.
fn sample_count(n: usize, size: SampleSize) -> Result<usize> {
    if n == 0 {
        return Err(Error::settings(
            RULE,
            "sample",
            "the training data is empty",
        ));
    }
    let count = match size {
        SampleSize::Fraction(f) if f > 0.0 && f <= 1.0 => ((f * n as f64).round() as usize).max(1),
        SampleSize::Fraction(f) => {
            return Err(Error::settings(
                RULE,
                "sample",
                format!("fraction must be in (0, 1], got {f}"),
            ))
        }
        SampleSize::Count(c) if (1..=n).contains(&c) => c,
        SampleSize::Count(c) => {
            return Err(Error::settings(
                RULE,
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
        return Err(Error::settings(
            RULE,
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
            return Err(Error::settings(
                RULE,
                "threshold",
                format!("must be in (0, 1], got {t}"),
            ))
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

/// One layer's calibration result.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerImportance {
    /// The layer's name.
    pub name: String,
    /// `g_i = Σ_x ‖ΔW_i x_i‖²` over the calibration sample.
    pub raw: f64,
    /// `I_i = g_i / Σ_j g_j`.
    pub importance: f64,
}

/// What stage 1 did: the sample it trained and calibrated on, and each layer's importance.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage1 {
    /// The example indices of the stage-1 sample, sorted.
    pub sample: Vec<usize>,
    /// Each layer's importance, in layer order.
    pub importance: Vec<LayerImportance>,
}

/// What the switch to shared pairs did.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraDropReport {
    /// Layers that keep their own pair.
    pub selected: Vec<String>,
    /// Layers now on a shared pair.
    pub shared: Vec<String>,
    /// Number of shared pairs created (one per `(d_in, d_out, r)` of shared layers).
    pub shared_pairs: usize,
    /// Trainable scalars before (every layer's own pair).
    pub params_before: usize,
    /// Trainable scalars after (selected pairs plus each shared pair once).
    pub params_after: usize,
}

impl LoraDropReport {
    /// `1 − after / before`: the fraction of trainable parameters removed.
    pub fn reduction(&self) -> f64 {
        if self.params_before == 0 {
            return 0.0;
        }
        1.0 - self.params_after as f64 / self.params_before as f64
    }
}

/// LoRA-drop's two-stage procedure over a model's [`LoraDropLinear`] layers.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::train::{LoraDrop, LoraDropConfig, Selection};
/// use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraDropLinear, LoraInit, Shared};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let cfg = LoraConfig { init: LoraInit::BothRandom, ..LoraConfig::new(2, 2.0) };
/// let layers: Vec<Shared<dyn Adapter>> = (0..3)
///     .map(|i| -> lorakit::Result<_> {
///         let base = FrozenLinear::new(Tensor::randn(0f32, 1., (4, 4), &dev)?, None)?;
///         Ok(Shared::new(LoraDropLinear::new(base, &cfg, vb.pp(format!("l{i}")))?).erase())
///     })
///     .collect::<lorakit::Result<_>>()?;
/// let config = LoraDropConfig { selection: Selection::TopN(1), ..LoraDropConfig::default() };
/// let drop = LoraDrop::new(&layers, config)?;
/// let x = Tensor::randn(0f32, 1., (8, 4), &dev)?;
/// let stage1 = drop.stage1(
///     100,
///     |_step, _sample| Ok(()), // train on the sample here
///     |_sample| { for l in &layers { l.forward(&x)?; } Ok(()) },
/// )?;
/// assert_eq!(stage1.sample.len(), 10);
/// let report = drop.share_unselected(&stage1.importance, vb.pp("shared"))?;
/// assert_eq!(report.shared.len(), 2);
/// assert_eq!(report.params_after, 2 * (2 * 4 + 4 * 2));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LoraDrop {
    config: LoraDropConfig,
    layers: Vec<Shared<dyn Adapter>>,
}

impl LoraDrop {
    /// The procedure for the LoRA-drop layers among `layers` (layers of other variants are
    /// skipped, so a model's whole [`crate::model::AdaptedSet`] can be passed). Errors if
    /// none is a LoRA-drop layer, or on settings [`LoraDropConfig::validate`] refuses.
    pub fn new(layers: &[Shared<dyn Adapter>], config: LoraDropConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            layers: select_kind(layers, Variant::LoraDrop, RULE)?,
        })
    }

    /// The settings.
    pub fn config(&self) -> &LoraDropConfig {
        &self.config
    }

    /// The LoRA-drop layers, in order.
    pub fn layers(&self) -> &[Shared<dyn Adapter>] {
        &self.layers
    }

    /// Runs `forward` (the model's forward passes over the calibration sample) with every
    /// layer recording, and returns each layer's `g_i` and normalized `I_i`.
    pub fn calibrate(&self, forward: impl FnOnce() -> Result<()>) -> Result<Vec<LayerImportance>> {
        self.for_each_layer(|l| {
            l.start_recording();
            Ok(())
        })?;
        let run = forward();
        let mut raw = Vec::with_capacity(self.layers.len());
        self.for_each_layer(|l| {
            raw.push(l.stop_recording()?);
            Ok(())
        })?;
        run?;
        let norm = normalize_importance(&raw)?;
        Ok(self
            .layers
            .iter()
            .zip(raw.iter().zip(norm))
            .map(|(l, (&raw, importance))| LayerImportance {
                name: l.read().name().to_string(),
                raw,
                importance,
            })
            .collect())
    }

    /// Stage 1: draws a uniform sample of the configured size out of `n_examples`, calls
    /// `train(step, sample)` for steps `1..=stage1_steps`, then calibrates with
    /// `forward(sample)`.
    pub fn stage1(
        &self,
        n_examples: usize,
        train: impl FnMut(usize, &[usize]) -> Result<()>,
        forward: impl FnOnce(&[usize]) -> Result<()>,
    ) -> Result<Stage1> {
        let c = &self.config;
        let sample = sample_indices(n_examples, c.sample, c.seed)?;
        self.run_stage1(sample, train, forward)
    }

    /// Stage 1 on the paper's sample, stratified by `labels` (one per training example;
    /// see [`stratified_sample_indices`]); otherwise as [`LoraDrop::stage1`].
    pub fn stage1_stratified<L: Ord>(
        &self,
        labels: &[L],
        train: impl FnMut(usize, &[usize]) -> Result<()>,
        forward: impl FnOnce(&[usize]) -> Result<()>,
    ) -> Result<Stage1> {
        let c = &self.config;
        let sample = stratified_sample_indices(labels, c.sample, c.seed)?;
        self.run_stage1(sample, train, forward)
    }

    fn run_stage1(
        &self,
        sample: Vec<usize>,
        mut train: impl FnMut(usize, &[usize]) -> Result<()>,
        forward: impl FnOnce(&[usize]) -> Result<()>,
    ) -> Result<Stage1> {
        for step in 1..=self.config.stage1_steps {
            train(step, &sample)?;
        }
        let importance = self.calibrate(|| forward(&sample))?;
        Ok(Stage1 { sample, importance })
    }

    /// Stage 2's switch: keeps the layers the configured selection picks from `importance`
    /// (as returned by [`LoraDrop::calibrate`] or in [`Stage1`], in layer order) and moves
    /// every other layer onto one shared pair per `(d_in, d_out, r)`, freshly initialized
    /// by the configured `shared_init` and `shared_seed` (so those layers restart from
    /// ΔW = 0 with the default init) and created through `vb` as
    /// `<d_in>x<d_out>r<r>.lora_A` / `.lora_B`. Each layer keeps its own scale.
    ///
    /// Build the stage-2 optimizer from [`LoraDrop::trainable_vars`].
    pub fn share_unselected(
        &self,
        importance: &[LayerImportance],
        vb: VarBuilder,
    ) -> Result<LoraDropReport> {
        if importance.len() != self.layers.len() {
            return Err(Error::settings(
                RULE,
                "importance",
                format!(
                    "{} scores for {} layers",
                    importance.len(),
                    self.layers.len()
                ),
            ));
        }
        let scores: Vec<f64> = importance.iter().map(|i| i.importance).collect();
        let keep = select_layers(&scores, self.config.selection)?;
        let params_before = self.num_trainable_params();
        let mut pairs: BTreeMap<(usize, usize, usize), LowRankPair> = BTreeMap::new();
        let (mut selected, mut shared) = (Vec::new(), Vec::new());
        for (l, &k) in self.layers.iter().zip(&keep) {
            let mut guard = l.write();
            let name = guard.name().to_string();
            if k {
                selected.push(name);
                continue;
            }
            let layer = layer_as_mut::<LoraDropLinear>(&mut *guard, RULE)?;
            let base = layer.base().clone();
            let key = (base.d_in(), base.d_out(), layer.lora().rank());
            let pair = match pairs.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let p = self.shared_pair(key, &base, &vb)?;
                    pairs.insert(key, p.clone());
                    p
                }
            };
            layer.set_pair(pair)?;
            shared.push(name);
        }
        Ok(LoraDropReport {
            selected,
            shared,
            shared_pairs: pairs.len(),
            params_before,
            params_after: self.num_trainable_params(),
        })
    }

    /// A fresh pair for the layers of shape `(d_in, d_out, r)`.
    fn shared_pair(
        &self,
        (d_in, d_out, r): (usize, usize, usize),
        base: &crate::FrozenLinear,
        vb: &VarBuilder,
    ) -> Result<LowRankPair> {
        let group = format!("{d_in}x{d_out}r{r}");
        let cfg = LoraConfig {
            r,
            init: self.config.shared_init,
            seed: self.config.shared_seed,
            ..LoraConfig::default()
        };
        let (a, b) = cfg.init_pair(&format!("{}.{group}", vb.prefix()), base)?;
        let vb = vb.pp(group);
        Ok(LowRankPair {
            a: Factor::Trainable(trainable_var(&vb, "lora_A", &a)?),
            b: Factor::Trainable(trainable_var(&vb, "lora_B", &b)?),
        })
    }

    /// Every trainable variable of the layers, each shared one once.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for l in &self.layers {
            for v in l.read().trainable_vars() {
                if seen.insert(v.var.as_tensor().id()) {
                    out.push(v.var);
                }
            }
        }
        out
    }

    /// Trainable scalars over all layers, each shared variable counted once.
    pub fn num_trainable_params(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|v| v.as_tensor().elem_count())
            .sum()
    }

    fn for_each_layer(&self, mut f: impl FnMut(&LoraDropLinear) -> Result<()>) -> Result<()> {
        for l in &self.layers {
            f(layer_as::<LoraDropLinear>(&*l.read(), RULE)?)?;
        }
        Ok(())
    }
}
