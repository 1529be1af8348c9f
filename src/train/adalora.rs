//! AdaLoRA's training rules: the rank allocator (importance scores, cubic budget schedule,
//! masking of `E`), run as a [`StepHook`] after the optimizer step, and the orthogonality
//! penalty added to the loss.
//!
//! Follows PEFT 0.21 (`RankAllocator`, `AdaLoraModel.update_and_allocate`):
//! - sensitivity `I = |w · ∂L/∂w|` per element of `A`, `E`, `B`, read after the optimizer
//!   step (so `w` is the updated value, as in PEFT);
//!   `Ī ← β1 Ī + (1−β1) I`, `Ū ← β2 Ū + (1−β2) |I − Ī|` (with the new `Ī`), score `Ī · Ū`;
//! - triplet score of rank `i`: `s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)`;
//! - budget from [`budget_schedule`]; at a masking step the `k = b0 − b` lowest triplets
//!   over all layers get `E_i = 0`;
//! - scores update while `step < T − tfinal`; at `step = T − tfinal` the final mask (budget
//!   `bT`) is taken and the scores reset; after that the final mask is re-applied every
//!   step.
//!
//! One deliberate difference: PEFT masks every triplet whose score is `≤` the k-th smallest,
//! so ties at the threshold prune more than `k`. Here exactly `k` are pruned, ties broken
//! by (score, layer order, rank index); without ties the two agree. `k` is clamped to at
//! least 1 (PEFT's `kthvalue` would fail on 0).

mod state;

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::adapter::{Adapter, Variant};
use crate::error::{Error, Result};
use crate::matmul::matmul;
use crate::shared::Shared;
use crate::train::hooks::{layer_as, layer_as_mut, select_kind, StepHook};
use crate::variants::adalora::AdaLoraLinear;

/// The allocator's schedule and scoring hyper-parameters; defaults match PEFT's
/// `AdaLoraConfig` (`target_r` = 8, `tinit` = `tfinal` = 0, `deltaT` = 1,
/// `beta1` = `beta2` = 0.85, `orth_reg_weight` = 0.5). `total_step` has no default.
#[derive(Clone, Debug, PartialEq)]
pub struct RankAllocatorConfig {
    /// Target average rank per layer: the final budget is `target_r × layers`.
    pub target_r: usize,
    /// Warm-up steps without pruning.
    pub tinit: usize,
    /// Final steps with the final mask fixed.
    pub tfinal: usize,
    /// Steps between two budget allocations in the pruning phase (PEFT's `deltaT`).
    pub delta_t: usize,
    /// EMA factor of the sensitivity.
    pub beta1: f64,
    /// EMA factor of the uncertainty.
    pub beta2: f64,
    /// γ of the orthogonality penalty (see [`orthogonality_penalty`]).
    pub orth_reg_weight: f64,
    /// Total training steps `T`.
    pub total_step: usize,
}

impl RankAllocatorConfig {
    /// PEFT's defaults with the given total step count.
    pub fn new(total_step: usize) -> Self {
        Self {
            target_r: 8,
            tinit: 0,
            tfinal: 0,
            delta_t: 1,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
            total_step,
        }
    }

    /// Checks the values as PEFT does: `total_step > 0`, betas in `(0, 1)`, `deltaT ≥ 1`,
    /// `γ ≥ 0`, and a non-empty pruning phase (`tinit < total_step − tfinal`).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| {
            Err(Error::settings("AdaLoRA rank allocator", field, reason))
        };
        if self.total_step == 0 {
            return bad("total_step", "must be > 0, got 0".into());
        }
        for (field, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(b > 0.0 && b < 1.0) {
                return bad(field, format!("must be in (0, 1), got {b}"));
            }
        }
        if self.delta_t == 0 {
            return bad("deltaT", "must be ≥ 1, got 0".into());
        }
        if !(self.orth_reg_weight >= 0.0 && self.orth_reg_weight.is_finite()) {
            return bad(
                "orth_reg_weight",
                format!("must be finite and ≥ 0, got {}", self.orth_reg_weight),
            );
        }
        if self.tinit.saturating_add(self.tfinal) >= self.total_step {
            return bad(
                "tinit",
                format!(
                    "tinit ({}) must be < total_step ({}) − tfinal ({}): no pruning phase",
                    self.tinit, self.total_step, self.tfinal
                ),
            );
        }
        Ok(())
    }
}

/// The budget at one step and whether this step masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Total kept ranks over all layers.
    pub budget: usize,
    /// Whether the schedule masks at this step.
    pub mask: bool,
}

/// PEFT's cubic budget schedule from `init_budget` (`b0`) to `target_budget` (`bT`):
/// `b0` without masking while `step ≤ tinit`; `bT` with masking after `T − tfinal`;
/// in between `⌊(b0 − bT)(1 − (step − tinit)/(T − tfinal − tinit))³ + bT⌋`, masking
/// when `step % deltaT == 0`.
pub fn budget_schedule(
    config: &RankAllocatorConfig,
    init_budget: usize,
    target_budget: usize,
    step: usize,
) -> Budget {
    let (tinit, tfinal, total) = (config.tinit, config.tfinal, config.total_step);
    if step <= tinit {
        return Budget {
            budget: init_budget,
            mask: false,
        };
    }
    if step.saturating_add(tfinal) > total {
        return Budget {
            budget: target_budget,
            mask: true,
        };
    }
    let span = total.saturating_sub(tfinal + tinit).max(1) as f64;
    let mul = 1.0 - (step - tinit) as f64 / span;
    let b0 = init_budget as f64;
    let bt = target_budget as f64;
    let budget = ((b0 - bt) * mul.powf(3.0) + bt).max(0.0) as usize;
    Budget {
        budget,
        mask: step.is_multiple_of(config.delta_t.max(1)),
    }
}

/// Running sensitivity and uncertainty of one tensor (f32, the tensor's shape).
#[derive(Debug)]
struct Ema {
    ipt: Tensor,
    unc: Tensor,
}

impl Ema {
    fn zeros(like: &Tensor) -> Result<Self> {
        Ok(Self {
            ipt: Tensor::zeros(like.shape(), DType::F32, like.device())?,
            unc: Tensor::zeros(like.shape(), DType::F32, like.device())?,
        })
    }

    /// One update from `|w · g|` (zero when the tensor got no gradient). Computed on
    /// detached values: the variable carries autograd history, and averages that kept it
    /// would hold every earlier step's gradients alive.
    fn update(&mut self, var: &Var, grads: &GradStore, beta1: f64, beta2: f64) -> Result<()> {
        let w = var.as_tensor();
        let ipt = match grads.get(w) {
            Some(g) => {
                (w.detach().to_dtype(DType::F32)? * g.detach().to_dtype(DType::F32)?)?.abs()?
            }
            None => Tensor::zeros(w.shape(), DType::F32, w.device())?,
        };
        self.ipt = ((&self.ipt * beta1)? + (&ipt * (1.0 - beta1))?)?;
        self.unc = ((&self.unc * beta2)? + ((ipt - &self.ipt)?.abs()? * (1.0 - beta2))?)?;
        Ok(())
    }

    /// Element scores `Ī · Ū`.
    fn score(&self) -> Result<Tensor> {
        Ok((&self.ipt * &self.unc)?)
    }
}

/// Running statistics of one layer's `A`, `E`, `B`.
#[derive(Debug)]
struct LayerStats {
    a: Ema,
    e: Ema,
    b: Ema,
}

/// How the allocator names itself in errors.
const RULE: &str = "the AdaLoRA rank allocator";

/// AdaLoRA's rank allocator over all AdaLoRA layers of a model.
///
/// Run it after every optimizer step with the step's gradients, either as a [`StepHook`]
/// in [`crate::train::train_step`] or by calling [`RankAllocator::update_and_allocate`].
/// Steps count from 1.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{Optimizer, VarBuilder, VarMap};
/// use lorakit::train::{train_step, RankAllocator, RankAllocatorConfig};
/// use lorakit::{Adapter, AdaLoraConfig, AdaLoraLinear, FrozenLinear, Shared};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let base = FrozenLinear::new(Tensor::randn(0f32, 0.3, (8, 8), &dev)?, None)?;
/// let layer = Shared::new(AdaLoraLinear::new(base, &AdaLoraConfig::new(4, 4.0), vb.pp("fc"))?);
/// let mut config = RankAllocatorConfig::new(6);
/// config.target_r = 2;
/// let mut alloc = RankAllocator::new(&[layer.clone().erase()], config)?;
/// let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-2)?;
/// let (x, y) = (Tensor::randn(0f32, 1., (16, 8), &dev)?, Tensor::randn(0f32, 1., (16, 8), &dev)?);
/// for step in 1..=6 {
///     let out = layer.read().forward_t(&x, true)?;
///     let loss = ((out - &y)?.sqr()?.mean_all()? + alloc.orthogonality_penalty()?)?;
///     train_step(&loss, &mut opt, &mut [&mut alloc], step)?;
/// }
/// assert_eq!(layer.read().kept_rank(), 2);
/// assert_eq!(alloc.rank_pattern()["fc.lora_E"].len(), 4);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RankAllocator {
    config: RankAllocatorConfig,
    layers: Vec<Shared<dyn Adapter>>,
    stats: Vec<Option<LayerStats>>,
    init_budget: usize,
    target_budget: usize,
    budget: usize,
    final_mask_done: bool,
}

impl RankAllocator {
    /// An allocator over the AdaLoRA layers among `layers` (layers of other variants are
    /// skipped, so a model's whole [`crate::model::AdaptedSet`] can be passed; their order
    /// breaks score ties). Errors if none is an AdaLoRA layer. The initial budget is the sum
    /// of the layers' current ranks, the target `target_r × layers`, which must be smaller.
    pub fn new(layers: &[Shared<dyn Adapter>], config: RankAllocatorConfig) -> Result<Self> {
        config.validate()?;
        let layers = select_kind(layers, Variant::AdaLora, RULE)?;
        let init_budget = layers
            .iter()
            .map(|l| Ok(layer_as::<AdaLoraLinear>(&*l.read(), RULE)?.rank()))
            .sum::<Result<usize>>()?;
        let target_budget = config.target_r * layers.len();
        if target_budget >= init_budget {
            return Err(Error::settings(
                "AdaLoRA rank allocator",
                "target_r",
                format!(
                    "target budget {target_budget} (target_r {} × {} layers) must be below the \
                     initial budget {init_budget}",
                    config.target_r,
                    layers.len()
                ),
            ));
        }
        let stats = layers.iter().map(|_| None).collect();
        Ok(Self {
            config,
            layers,
            stats,
            init_budget,
            target_budget,
            budget: init_budget,
            final_mask_done: false,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RankAllocatorConfig {
        &self.config
    }

    /// The layers (each an [`AdaLoraLinear`]), in allocation order.
    pub fn layers(&self) -> &[Shared<dyn Adapter>] {
        &self.layers
    }

    /// `b0`: the sum of the layers' initial ranks.
    pub fn init_budget(&self) -> usize {
        self.init_budget
    }

    /// `bT = target_r × layers`.
    pub fn target_budget(&self) -> usize {
        self.target_budget
    }

    /// The budget of the last masking (`b0` before any).
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// [`budget_schedule`] with this allocator's budgets.
    pub fn schedule(&self, step: usize) -> Budget {
        budget_schedule(&self.config, self.init_budget, self.target_budget, step)
    }

    /// PEFT's `rank_pattern`: `"<layer name>.lora_E"` → one bool per initial rank.
    pub fn rank_pattern(&self) -> BTreeMap<String, Vec<bool>> {
        self.layers
            .iter()
            .filter_map(|l| {
                let l = l.read();
                let ada = l.as_any().downcast_ref::<AdaLoraLinear>()?;
                Some((format!("{}.lora_E", ada.name()), ada.rank_pattern()))
            })
            .collect()
    }

    /// `γ · ` [`orthogonality_penalty`] over this allocator's layers, with γ from the config.
    pub fn orthogonality_penalty(&self) -> Result<Tensor> {
        let pen = orthogonality_penalty(&self.layers)?;
        Ok((pen * self.config.orth_reg_weight)?)
    }

    /// The triplet score of every rank of every layer (layer order), from the current
    /// statistics (zeros before the first update). The scores of all layers on one device
    /// are read to the host together.
    pub fn triplet_scores(&self) -> Result<Vec<Vec<f64>>> {
        let scores = self
            .layers
            .iter()
            .zip(&self.stats)
            .map(|(layer, stats)| match stats {
                None => {
                    let guard = layer.read();
                    let l = layer_as::<AdaLoraLinear>(&*guard, RULE)?;
                    Ok(Tensor::zeros(l.rank(), DType::F32, l.e().device())?)
                }
                Some(s) => triplet_score(s),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(crate::kernels::host_f64_vectors(&scores)?)
    }

    /// One step of PEFT's `update_and_allocate`, after the optimizer step and with its
    /// gradients. Returns the budget when this step masked.
    pub fn update_and_allocate(&mut self, step: usize, grads: &GradStore) -> Result<Option<usize>> {
        let final_step = self.config.total_step - self.config.tfinal;
        if step < final_step {
            self.update_scores(grads)?;
            let b = self.schedule(step);
            if b.mask {
                self.mask_to_budget(b.budget)?;
                return Ok(Some(b.budget));
            }
            Ok(None)
        } else if step == final_step || !self.final_mask_done {
            self.mask_to_budget(self.target_budget)?;
            self.final_mask_done = true;
            self.stats.iter_mut().for_each(|s| *s = None);
            Ok(Some(self.target_budget))
        } else {
            for layer in &self.layers {
                let mut guard = layer.write();
                let l = layer_as_mut::<AdaLoraLinear>(&mut *guard, RULE)?;
                let kept = l.kept().to_vec();
                l.apply_mask(&kept)?;
            }
            Ok(Some(self.target_budget))
        }
    }

    fn update_scores(&mut self, grads: &GradStore) -> Result<()> {
        let (b1, b2) = (self.config.beta1, self.config.beta2);
        for (layer, stats) in self.layers.iter().zip(self.stats.iter_mut()) {
            let guard = layer.read();
            let l = layer_as::<AdaLoraLinear>(&*guard, RULE)?;
            let s = match stats {
                Some(s) => s,
                None => stats.insert(LayerStats {
                    a: Ema::zeros(l.a().as_tensor())?,
                    e: Ema::zeros(l.e().as_tensor())?,
                    b: Ema::zeros(l.b().as_tensor())?,
                }),
            };
            s.a.update(l.a(), grads, b1, b2)?;
            s.e.update(l.e(), grads, b1, b2)?;
            s.b.update(l.b(), grads, b1, b2)?;
        }
        Ok(())
    }

    /// Masks the `b0 − budget` (at least 1) lowest-scoring ranks over all layers.
    fn mask_to_budget(&mut self, budget: usize) -> Result<()> {
        let scores = self.triplet_scores()?;
        let mut all: Vec<(f64, usize, usize)> = scores
            .iter()
            .enumerate()
            .flat_map(|(li, s)| s.iter().enumerate().map(move |(ri, &v)| (v, li, ri)))
            .collect();
        all.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
        let k = self
            .init_budget
            .saturating_sub(budget)
            .max(1)
            .min(all.len());
        let mut keep: Vec<Vec<bool>> = scores.iter().map(|s| vec![true; s.len()]).collect();
        for &(_, li, ri) in all.iter().take(k) {
            if let Some(slot) = keep.get_mut(li).and_then(|v| v.get_mut(ri)) {
                *slot = false;
            }
        }
        for (layer, keep) in self.layers.iter().zip(&keep) {
            layer_as_mut::<AdaLoraLinear>(&mut *layer.write(), RULE)?.apply_mask(keep)?;
        }
        self.budget = budget;
        Ok(())
    }
}

/// `s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)` for each rank `i`, on the layer's device.
fn triplet_score(s: &LayerStats) -> Result<Tensor> {
    let e = s.e.score()?.flatten_all()?;
    let a = s.a.score()?.mean(1)?;
    let b = s.b.score()?.mean(0)?;
    Ok(((e + a)? + b)?)
}

impl StepHook for RankAllocator {
    fn after_step(&mut self, step: usize, grads: &GradStore) -> Result<()> {
        self.update_and_allocate(step, grads).map(|_| ())
    }
}

/// The orthogonality penalty (without γ): the mean over every `A` and `B` of the layers of
/// `‖A Aᵀ − I‖_F` and `‖Bᵀ B − I‖_F` (unsquared Frobenius norms, as PEFT). Differentiable;
/// add `γ ·` this to the loss. Computed in f32, returned in the layers' dtype. Layers of
/// other variants are skipped and layers of rank 0 contribute nothing; no terms give 0.
pub fn orthogonality_penalty(layers: &[Shared<dyn Adapter>]) -> Result<Tensor> {
    let mut terms = Vec::with_capacity(2 * layers.len());
    let (mut device, mut dtype) = (candle_core::Device::Cpu, DType::F32);
    for layer in layers {
        let guard = layer.read();
        let Some(l) = guard.as_any().downcast_ref::<AdaLoraLinear>() else {
            continue;
        };
        device = l.a().device().clone();
        dtype = l.a().dtype();
        if l.rank() == 0 {
            continue;
        }
        let a = l.a().as_tensor().to_dtype(DType::F32)?;
        let b = l.b().as_tensor().to_dtype(DType::F32)?;
        for cov in [matmul(&a, &a.t()?)?, matmul(&b.t()?, &b)?] {
            let eye = Tensor::eye(cov.dim(0)?, DType::F32, cov.device())?;
            terms.push((cov - eye)?.sqr()?.sum_all()?.sqrt()?);
        }
    }
    if terms.is_empty() {
        return Ok(Tensor::zeros((), dtype, &device)?);
    }
    let n = terms.len() as f64;
    Ok((Tensor::stack(&terms, 0)?.sum_all()? / n)?.to_dtype(dtype)?)
}
