//! Delta-LoRA (Zi et al. 2023, arXiv 2309.02411): LoRA without dropout whose frozen weight
//! also follows the low-rank product. After each optimizer step `t > K`,
//!
//! ```text
//! W ← W + λ · s · (B' A' − B A)
//! ```
//!
//! where `(A, B)` are the factors before the step and `(A', B')` after it, so the effective
//! weight `W + s·BA` moves by `(1 + λ)·s·Δ(BA)` per step (and by `s·Δ(BA)` up to step `K`).
//!
//! The layer is a [`LoraLinear`] of kind [`AdapterKind::DeltaLora`] (built by
//! [`delta_lora_linear`] or [`into_delta_lora`]); `W` stays a constant (no `Var`, no
//! gradient, no optimizer state) that [`DeltaLoraHook`] rewrites after each step with one
//! rank-`2r` product `[λs·B', −λs·B] · [A'; A]` (`(d_out × 2r)(2r × d_in)`).
//!
//! The weight's storage may be shared with the caller's model (e.g. a `candle_nn::Linear`),
//! so the hook's first update of a layer builds a new weight tensor, private to the layer.
//! Later updates add the product into that tensor's storage in place (CPU, contiguous f32 or
//! f64: one GEMM, no `d_out × d_in` temporary); other devices and dtypes build a new tensor
//! each step. So a handle taken from `base().weight()` (or `tensors_to_save`) after the
//! first update sees later updates: `.copy()` it to keep a snapshot. If anything else
//! replaces the weight (e.g. [`restore_base_weight`]), the next update makes a private copy
//! again rather than writing into the caller's tensor.
//!
//! Paper settings: λ = 2, K = 500 for GPT-2 Medium (E2E);
//! λ = 0.5 for the other models (BART-Large, RoBERTa). Dropout is removed because it breaks
//! the gradient identity the update relies on: asking for dropout is an error.
//!
//! Saving: [`Adapter::tensors_to_save`] of a Delta-LoRA layer adds the updated base weight
//! under [`BASE_WEIGHT_KEY`] (`base_layer.weight`, PEFT's name for a tuner layer's wrapped
//! weight; PEFT itself has no Delta-LoRA), unmerged even if the layer is merged. Loading puts
//! it back with [`restore_base_weight`]. Keep `W` in f32 or wider: a bf16 weight rounds
//! away updates smaller than its precision.

use candle_core::{Tensor, TensorId, D};
use candle_nn::VarBuilder;

use crate::adapter::{Adapter, AdapterKind};
use crate::error::{Error, Result};
use crate::frozen::FrozenLinear;
use crate::kernels::{add_product_in_place, compute_dtype};
use crate::shared::Shared;
use crate::train::hooks::StepHook;
use crate::variants::lora::{LoraConfig, LoraLinear};

/// Key (relative to the layer) under which a Delta-LoRA layer saves its updated weight.
pub const BASE_WEIGHT_KEY: &str = "base_layer.weight";

/// Builds a Delta-LoRA layer: LoRA's init and scale, no dropout (`config.dropout > 0` is an
/// error).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::variants::delta_lora::delta_lora_linear;
/// use lorakit::{Adapter, AdapterKind, FrozenLinear, LoraConfig};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let base = FrozenLinear::new(Tensor::zeros((4, 6), DType::F32, &dev)?, None)?;
/// let layer = delta_lora_linear(base.clone(), &LoraConfig::new(2, 2.0), vb.pp("fc"))?;
/// assert_eq!(layer.kind(), AdapterKind::DeltaLora);
/// let with_dropout = LoraConfig { dropout: 0.1, ..LoraConfig::new(2, 2.0) };
/// assert!(delta_lora_linear(base, &with_dropout, vb.pp("fc2")).is_err());
/// # Ok(()) }
/// ```
pub fn delta_lora_linear(
    base: FrozenLinear,
    config: &LoraConfig,
    vb: VarBuilder,
) -> Result<LoraLinear> {
    check_no_dropout(&vb.prefix(), config.dropout)?;
    into_delta_lora(LoraLinear::new(base, config, vb)?)
}

/// Marks a LoRA layer (e.g. built with [`LoraLinear::from_pair`] from loaded factors) as
/// Delta-LoRA. Errors if it has dropout.
pub fn into_delta_lora(layer: LoraLinear) -> Result<LoraLinear> {
    check_no_dropout(layer.name(), layer.dropout())?;
    Ok(layer.with_kind(AdapterKind::DeltaLora))
}

/// Puts a saved Delta-LoRA weight (the tensor under [`BASE_WEIGHT_KEY`]) back into the layer.
/// Same shape, dtype and device as the current weight; the layer must be unmerged.
pub fn restore_base_weight(layer: &mut LoraLinear, weight: Tensor) -> Result<()> {
    check_delta_lora(layer)?;
    layer.core().ensure_unmerged()?;
    layer.core_mut().replace_weight(weight)
}

/// The weight a Delta-LoRA layer saves: `W`, with ΔW taken out while merged.
pub(crate) fn saved_base_weight(layer: &LoraLinear) -> Result<Tensor> {
    let w = layer.base().weight();
    if layer.is_merged() {
        let delta = layer.delta_weight()?.to_dtype(w.dtype())?;
        return Ok((w - delta)?);
    }
    Ok(w.clone())
}

fn check_no_dropout(layer: &str, dropout: f64) -> Result<()> {
    if dropout != 0.0 {
        return Err(Error::InvalidConfig {
            layer: layer.to_string(),
            field: "dropout",
            reason: format!(
                "Delta-LoRA has no dropout (it breaks the weight update's gradient identity), \
                 got {dropout}"
            ),
        });
    }
    Ok(())
}

fn check_delta_lora(layer: &LoraLinear) -> Result<()> {
    if layer.kind() != AdapterKind::DeltaLora {
        return Err(Error::InvalidConfig {
            layer: layer.name().to_string(),
            field: "kind",
            reason: format!("expected a Delta-LoRA layer, got {:?}", layer.kind()),
        });
    }
    check_no_dropout(layer.name(), layer.dropout())
}

/// Delta-LoRA's schedule: the multiplier λ and the step K after which W starts to move.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeltaLoraUpdate {
    /// λ: the weight moves by `λ·s·Δ(BA)` per step (paper: 2 for GPT-2 M, 0.5 elsewhere).
    pub lambda: f64,
    /// K: W is updated after steps `t > K` (paper: 500 for GPT-2 M).
    pub start_step: usize,
}

impl DeltaLoraUpdate {
    /// The paper's GPT-2 Medium (E2E) setting: λ = 2, K = 500.
    pub const GPT2_MEDIUM: Self = Self {
        lambda: 2.0,
        start_step: 500,
    };

    /// A schedule with multiplier `lambda` starting after step `start_step`.
    pub fn new(lambda: f64, start_step: usize) -> Self {
        Self { lambda, start_step }
    }
}

/// The Delta-LoRA weight update as a [`StepHook`]: records `(A, B)` in `before_step` and
/// updates `W` in `after_step`, for steps `t > K`.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{Optimizer, VarBuilder, VarMap};
/// use lorakit::train::train_step;
/// use lorakit::variants::delta_lora::{delta_lora_linear, DeltaLoraHook, DeltaLoraUpdate};
/// use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraInit, Shared};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let base = FrozenLinear::new(Tensor::zeros((4, 6), DType::F32, &dev)?, None)?;
/// let config = LoraConfig { init: LoraInit::BothRandom, ..LoraConfig::new(2, 2.0) };
/// let layer = Shared::new(delta_lora_linear(base, &config, vb.pp("fc"))?);
/// let mut hook = DeltaLoraHook::new([layer.clone()], DeltaLoraUpdate::new(0.5, 0))?;
/// let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-2)?;
/// let x = Tensor::ones((3, 6), DType::F32, &dev)?;
/// let loss = layer.read().forward_t(&x, true)?.sqr()?.sum_all()?;
/// train_step(&loss, &mut opt, &mut [&mut hook], 1)?;
/// let w = layer.read().base().weight().abs()?.sum_all()?.to_scalar::<f32>()?;
/// assert!(w > 0.0); // W moved with the low-rank product
/// # Ok(()) }
/// ```
pub struct DeltaLoraHook {
    layers: Vec<Shared<dyn Adapter>>,
    update: DeltaLoraUpdate,
    /// Copies of `(A, B)` taken before the current step, per layer.
    previous: Vec<Option<(Tensor, Tensor)>>,
    /// Per layer, the id of the weight tensor this hook created (and so may update in
    /// place); a weight replaced by anyone else gets a fresh private copy first.
    private_weights: Vec<Option<TensorId>>,
}

impl std::fmt::Debug for DeltaLoraHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = crate::shared::layer_names(&self.layers);
        f.debug_struct("DeltaLoraHook")
            .field("layers", &names)
            .field("update", &self.update)
            .finish()
    }
}

impl DeltaLoraHook {
    /// The hook for Delta-LoRA layers; errors on a layer of another kind or a non-finite λ.
    pub fn new(
        layers: impl IntoIterator<Item = Shared<LoraLinear>>,
        update: DeltaLoraUpdate,
    ) -> Result<Self> {
        Self::from_adapters(layers.into_iter().map(Shared::erase).collect(), update)
    }

    /// The hook for type-erased layers (a model's registry); each must be a Delta-LoRA
    /// [`LoraLinear`].
    pub fn from_adapters(
        layers: Vec<Shared<dyn Adapter>>,
        update: DeltaLoraUpdate,
    ) -> Result<Self> {
        if !update.lambda.is_finite() {
            return Err(Error::InvalidConfig {
                layer: "Delta-LoRA".to_string(),
                field: "lambda",
                reason: format!("must be finite, got {}", update.lambda),
            });
        }
        for layer in &layers {
            as_delta_lora(&*layer.read())?;
        }
        let previous = vec![None; layers.len()];
        let private_weights = vec![None; layers.len()];
        Ok(Self {
            layers,
            update,
            previous,
            private_weights,
        })
    }

    /// The hook for the Delta-LoRA layers among `layers` (others are skipped).
    pub fn select(layers: &[Shared<dyn Adapter>], update: DeltaLoraUpdate) -> Result<Self> {
        let picked = layers
            .iter()
            .filter(|l| l.read().kind() == AdapterKind::DeltaLora)
            .cloned()
            .collect();
        Self::from_adapters(picked, update)
    }

    /// The schedule.
    pub fn update(&self) -> DeltaLoraUpdate {
        self.update
    }

    fn active(&self, step: usize) -> bool {
        step > self.update.start_step && self.update.lambda != 0.0
    }
}

impl StepHook for DeltaLoraHook {
    fn before_step(
        &mut self,
        step: usize,
        _grads: &mut candle_core::backprop::GradStore,
    ) -> Result<()> {
        let active = self.active(step);
        for (layer, slot) in self.layers.iter().zip(self.previous.iter_mut()) {
            *slot = None;
            if active {
                let guard = layer.read();
                let lora = as_delta_lora(&*guard)?;
                let pair = lora.pair();
                // `Var::set` writes in place: keep copies, not handles.
                *slot = Some((pair.a.tensor().copy()?, pair.b.tensor().copy()?));
            }
        }
        Ok(())
    }

    fn after_step(&mut self, step: usize, _grads: &candle_core::backprop::GradStore) -> Result<()> {
        if !self.active(step) {
            return Ok(());
        }
        let lambda = self.update.lambda;
        let slots = self
            .previous
            .iter_mut()
            .zip(self.private_weights.iter_mut());
        for (layer, (slot, private)) in self.layers.iter().zip(slots) {
            let mut guard = layer.write();
            let name = guard.name().to_string();
            let (a_old, b_old) = slot.take().ok_or_else(|| Error::InvalidConfig {
                layer: name.clone(),
                field: "step",
                reason: format!("Delta-LoRA after_step({step}) without before_step({step})"),
            })?;
            guard
                .core()
                .ensure_unmerged()
                .map_err(|_| Error::MergedState {
                    layer: name.clone(),
                    operation: "the Delta-LoRA weight update".to_string(),
                })?;
            let lora = guard
                .as_any_mut()
                .downcast_mut::<LoraLinear>()
                .ok_or_else(|| not_delta_lora(&name))?;
            let w = lora.base().weight();
            let compute = compute_dtype(w.dtype(), w.device());
            let ls = lambda * lora.scale();
            let pair = lora.pair();
            let c = |t: &Tensor| t.to_dtype(compute);
            // [λs·B', −λs·B] (d_out × 2r) · [A'; A] (2r × d_in)
            let u = Tensor::cat(
                &[(c(pair.b.tensor())? * ls)?, (c(&b_old)? * -ls)?],
                D::Minus1,
            )?;
            let v = Tensor::cat(&[c(pair.a.tensor())?, c(&a_old)?], 0)?;
            if *private == Some(w.id()) && add_product_in_place(w, &u, &v)? {
                continue;
            }
            let updated = (c(w)? + u.matmul(&v)?)?.to_dtype(w.dtype())?;
            lora.core_mut().replace_weight(updated)?;
            *private = Some(lora.base().weight().id());
        }
        Ok(())
    }
}

fn not_delta_lora(name: &str) -> Error {
    Error::InvalidConfig {
        layer: name.to_string(),
        field: "layer",
        reason: "the Delta-LoRA hook needs a LoraLinear layer".to_string(),
    }
}

fn as_delta_lora(layer: &dyn Adapter) -> Result<&LoraLinear> {
    let lora = layer
        .as_any()
        .downcast_ref::<LoraLinear>()
        .ok_or_else(|| not_delta_lora(layer.name()))?;
    check_delta_lora(lora)?;
    Ok(lora)
}
