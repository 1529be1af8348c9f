//! Delta-LoRA's training rule (Zi et al. 2023, arXiv 2309.02411): after each optimizer
//! step `t > K`, `W ← W + λ · s · (B' A' − B A)` on every [`DeltaLoraLinear`] layer.
//!
//! The hook rewrites `W` with one rank-`2r` product `[λs·B', −λs·B] · [A'; A]`
//! (`(d_out × 2r)(2r × d_in)`). The weight's storage may be shared with the caller's model
//! (e.g. a `candle_nn::Linear`), so the hook's first update of a layer builds a new weight
//! tensor, private to the layer. Later updates add the product into that tensor's storage
//! in place (CPU, contiguous f32 or f64: one GEMM, no `d_out × d_in` temporary); other
//! devices and dtypes build a new tensor each step. So a handle taken from
//! `base().weight()` (or `tensors_to_save`) after the first update sees later updates:
//! `.copy()` it to keep a snapshot. If anything else replaces the weight (e.g.
//! [`DeltaLoraLinear::restore_base_weight`]), the next update makes a private copy again
//! rather than writing into the caller's tensor.

use candle_core::{Tensor, TensorId, D};

use crate::adapter::{Adapter, Variant};
use crate::error::{Error, Result, Scope};
use crate::kernels::{add_product_in_place, compute_dtype};
use crate::shared::Shared;
use crate::train::hooks::{layer_as, layer_as_mut, select_kind, StepHook};
use crate::variants::delta_lora::DeltaLoraLinear;

/// How the hook names itself in errors.
const RULE: &str = "the Delta-LoRA hook";

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
/// use lorakit::train::{train_step, DeltaLoraHook, DeltaLoraUpdate};
/// use lorakit::{Adapter, DeltaLoraConfig, DeltaLoraLinear, FrozenLinear, LoraInit, Shared};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let base = FrozenLinear::new(Tensor::zeros((4, 6), DType::F32, &dev)?, None)?;
/// let config = DeltaLoraConfig { init: LoraInit::BothRandom, ..DeltaLoraConfig::new(2, 2.0) };
/// let layer = Shared::new(DeltaLoraLinear::new(base, &config, vb.pp("fc"))?);
/// let mut hook = DeltaLoraHook::new(&[layer.clone().erase()], DeltaLoraUpdate::new(0.5, 0))?;
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
    /// The hook for the Delta-LoRA layers among `layers` (layers of other variants are
    /// skipped, so a model's whole [`crate::model::AdaptedSet`] can be passed). Errors if
    /// none is a Delta-LoRA layer, or on a non-finite λ.
    pub fn new(layers: &[Shared<dyn Adapter>], update: DeltaLoraUpdate) -> Result<Self> {
        if !update.lambda.is_finite() {
            return Err(Error::settings(
                "Delta-LoRA update",
                "lambda",
                format!("must be finite, got {}", update.lambda),
            ));
        }
        let layers = select_kind(layers, Variant::DeltaLora, RULE)?;
        let previous = vec![None; layers.len()];
        let private_weights = vec![None; layers.len()];
        Ok(Self {
            layers,
            update,
            previous,
            private_weights,
        })
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
                let pair = layer_as::<DeltaLoraLinear>(&*guard, RULE)?.lora().pair();
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
            let (a_old, b_old) = slot.take().ok_or_else(|| {
                Error::usage(
                    Scope::Layer(name.clone()),
                    format!("Delta-LoRA after_step({step}) without before_step({step})"),
                )
            })?;
            guard
                .core()
                .ensure_unmerged()
                .map_err(|_| Error::MergedState {
                    layer: name.clone(),
                    operation: "the Delta-LoRA weight update".to_string(),
                })?;
            let layer = layer_as_mut::<DeltaLoraLinear>(&mut *guard, RULE)?;
            let w = layer.base().weight();
            let compute = compute_dtype(w.dtype(), w.device());
            let ls = lambda * layer.lora().scale();
            let pair = layer.lora().pair();
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
            let updated = (c(w)? + crate::matmul::matmul(&u, &v)?)?.to_dtype(w.dtype())?;
            layer.core_mut().replace_weight(updated)?;
            *private = Some(layer.base().weight().id());
        }
        Ok(())
    }
}
