//! LoRA-drop (Zhou et al. 2024, arXiv 2402.07721): LoRA layers whose output importance,
//! measured after a short training stage on a data sample, decides which layers keep their
//! own pair; the others share one pair per shape.
//!
//! - [`LoraDropLinear`] is a [`LoraLinear`] (through its [`Shared`] handle) that can record
//!   `‖ΔW x‖²` of its inputs during calibration; models use it in place of the layer.
//! - [`LoraDrop`] holds every such layer: it runs stage 1 and the calibration, selects
//!   layers ([`crate::train::lora_drop`]) and switches the rest to shared pairs.
//!
//! A shared pair is one pair of `Var`s cloned into several layers (cloning a `Var` shares
//! its storage), so one optimizer update moves every layer of the group.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Module, Tensor, Var};
use candle_nn::VarBuilder;

use crate::adapter::Adapter;
use crate::error::Result;
use crate::kernels::low_rank_only;
use crate::low_rank::{trainable_var, Factor, LowRankPair};
use crate::shared::Shared;
use crate::train::lora_drop::{
    normalize_importance, sample_indices, select_layers, stratified_sample_indices, LoraDropConfig,
};
use crate::variants::lora::{LoraConfig, LoraLinear};

/// The calibration probe of one layer: `Σ ‖ΔW x‖²` while active.
#[derive(Debug, Default)]
struct Probe {
    active: AtomicBool,
    sum: Mutex<f64>,
}

/// A LoRA layer that records its adapter output's squared norm during calibration.
///
/// Cloning shares the layer and the probe.
#[derive(Clone, Debug)]
pub struct LoraDropLinear {
    layer: Shared<LoraLinear>,
    probe: Arc<Probe>,
}

impl LoraDropLinear {
    /// The wrapped layer.
    pub fn layer(&self) -> &Shared<LoraLinear> {
        &self.layer
    }

    /// Forward in the given mode; while calibrating, also adds `‖s · (x Aᵀ) Bᵀ‖²` (no
    /// dropout, no gradient) to the layer's score.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let layer = self.layer.read();
        let y = layer.forward_t(x, train)?;
        if self.probe.active.load(Ordering::Relaxed) {
            let low = low_rank_only(&x.detach(), &layer.term())?;
            let g = low
                .to_dtype(candle_core::DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
            *self.probe.sum.lock().unwrap_or_else(|e| e.into_inner()) += g;
        }
        Ok(y)
    }
}

impl Module for LoraDropLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let train = self.layer.read().core().is_training();
        self.forward_t(x, train).map_err(candle_core::Error::wrap)
    }
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

/// Every LoRA-drop layer of a model, and the two-stage procedure.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::{FrozenLinear, LoraConfig, LoraDrop, LoraInit, LoraLinear, Selection, Shared};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let mut cfg = LoraConfig::new(2, 2.0);
/// cfg.init = LoraInit::BothRandom;
/// let mut drop = LoraDrop::new();
/// let layers: Vec<_> = (0..3)
///     .map(|i| -> lorakit::Result<_> {
///         let base = FrozenLinear::new(Tensor::randn(0f32, 1., (4, 4), &dev)?, None)?;
///         let l = LoraLinear::new(base, &cfg, vb.pp(format!("l{i}")))?;
///         Ok(drop.wrap(Shared::new(l)))
///     })
///     .collect::<lorakit::Result<_>>()?;
/// let x = Tensor::randn(0f32, 1., (8, 4), &dev)?;
/// let imp = drop.calibrate(|| {
///     for l in &layers { l.forward(&x)?; }
///     Ok(())
/// })?;
/// let report = drop.share_unselected(&imp, Selection::TopN(1), &cfg, vb.pp("shared"))?;
/// assert_eq!(report.shared.len(), 2);
/// assert_eq!(report.params_after, 2 * (2 * 4 + 4 * 2));
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct LoraDrop {
    layers: Vec<LoraDropLinear>,
}

impl LoraDrop {
    /// No layers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a layer; returns the module the model should call.
    pub fn wrap(&mut self, layer: Shared<LoraLinear>) -> LoraDropLinear {
        let l = LoraDropLinear {
            layer,
            probe: Arc::new(Probe::default()),
        };
        self.layers.push(l.clone());
        l
    }

    /// The registered layers, in registration order.
    pub fn layers(&self) -> &[LoraDropLinear] {
        &self.layers
    }

    /// Runs `forward` (the model's forward passes over the calibration sample) with every
    /// probe recording, and returns each layer's `g_i` and normalized `I_i`.
    pub fn calibrate(&self, forward: impl FnOnce() -> Result<()>) -> Result<Vec<LayerImportance>> {
        for l in &self.layers {
            *l.probe.sum.lock().unwrap_or_else(|e| e.into_inner()) = 0.0;
            l.probe.active.store(true, Ordering::Relaxed);
        }
        let run = forward();
        for l in &self.layers {
            l.probe.active.store(false, Ordering::Relaxed);
        }
        run?;
        let raw: Vec<f64> = self
            .layers
            .iter()
            .map(|l| *l.probe.sum.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let norm = normalize_importance(&raw)?;
        Ok(self
            .layers
            .iter()
            .zip(raw.iter().zip(norm))
            .map(|(l, (&raw, importance))| LayerImportance {
                name: l.layer.read().name().to_string(),
                raw,
                importance,
            })
            .collect())
    }

    /// Stage 1: draws a uniform sample of `n_examples` from `config`, calls
    /// `train(step, sample)` for steps `1..=config.stage1_steps`, then calibrates with
    /// `forward(sample)`.
    pub fn stage1(
        &self,
        config: &LoraDropConfig,
        n_examples: usize,
        train: impl FnMut(usize, &[usize]) -> Result<()>,
        forward: impl FnOnce(&[usize]) -> Result<()>,
    ) -> Result<Vec<LayerImportance>> {
        let sample = sample_indices(n_examples, config.sample, config.seed)?;
        self.run_stage1(config, &sample, train, forward)
    }

    /// Stage 1 on the paper's sample, stratified by `labels` (one per training example;
    /// see [`stratified_sample_indices`]); otherwise as [`LoraDrop::stage1`].
    pub fn stage1_stratified<L: Ord>(
        &self,
        config: &LoraDropConfig,
        labels: &[L],
        train: impl FnMut(usize, &[usize]) -> Result<()>,
        forward: impl FnOnce(&[usize]) -> Result<()>,
    ) -> Result<Vec<LayerImportance>> {
        let sample = stratified_sample_indices(labels, config.sample, config.seed)?;
        self.run_stage1(config, &sample, train, forward)
    }

    fn run_stage1(
        &self,
        config: &LoraDropConfig,
        sample: &[usize],
        mut train: impl FnMut(usize, &[usize]) -> Result<()>,
        forward: impl FnOnce(&[usize]) -> Result<()>,
    ) -> Result<Vec<LayerImportance>> {
        for step in 1..=config.stage1_steps {
            train(step, sample)?;
        }
        self.calibrate(|| forward(sample))
    }

    /// Stage 2's switch: keeps the layers `selection` picks from `importance` (as returned
    /// by [`LoraDrop::calibrate`], in layer order) and moves every other layer onto one
    /// shared pair per `(d_in, d_out, r)`, freshly initialized by `init`'s scheme and seed
    /// (so those layers restart from ΔW = 0 with the default init) and created through `vb`
    /// as `<d_in>x<d_out>r<r>.lora_A` / `.lora_B`. Each layer keeps its own scale.
    ///
    /// Build the stage-2 optimizer from [`LoraDrop::trainable_vars`].
    pub fn share_unselected(
        &self,
        importance: &[LayerImportance],
        selection: crate::train::lora_drop::Selection,
        init: &LoraConfig,
        vb: VarBuilder,
    ) -> Result<LoraDropReport> {
        if importance.len() != self.layers.len() {
            return Err(crate::Error::InvalidConfig {
                layer: "lora_drop".into(),
                field: "importance",
                reason: format!(
                    "{} scores for {} layers",
                    importance.len(),
                    self.layers.len()
                ),
            });
        }
        let scores: Vec<f64> = importance.iter().map(|i| i.importance).collect();
        let keep = select_layers(&scores, selection)?;
        let params_before = self.num_trainable_params();
        let mut pairs: BTreeMap<(usize, usize, usize), LowRankPair> = BTreeMap::new();
        let (mut selected, mut shared) = (Vec::new(), Vec::new());
        for (l, &k) in self.layers.iter().zip(&keep) {
            let mut layer = l.layer.write();
            if k {
                selected.push(layer.name().to_string());
                continue;
            }
            let base = layer.base().clone();
            let key = (base.d_in(), base.d_out(), layer.rank());
            let pair = match pairs.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let group = format!("{}x{}r{}", key.0, key.1, key.2);
                    let cfg = LoraConfig {
                        r: key.2,
                        ..init.clone()
                    };
                    let (a, b) = cfg.init_pair(&format!("{}.{group}", vb.prefix()), &base)?;
                    let vb = vb.pp(group);
                    let p = LowRankPair {
                        a: Factor::Trainable(trainable_var(&vb, "lora_A", &a)?),
                        b: Factor::Trainable(trainable_var(&vb, "lora_B", &b)?),
                    };
                    pairs.insert(key, p.clone());
                    p
                }
            };
            layer.set_pair(pair)?;
            shared.push(layer.name().to_string());
        }
        Ok(LoraDropReport {
            selected,
            shared,
            shared_pairs: pairs.len(),
            params_before,
            params_after: self.num_trainable_params(),
        })
    }

    /// Every trainable variable of the layers, each shared one once.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for l in &self.layers {
            for v in l.layer.read().trainable_vars() {
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
}
