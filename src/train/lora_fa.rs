//! LoRA-FA's optimizer form (Zhang et al. 2023, arXiv 2308.03303; PEFT's
//! `LoraFAOptimizer`): before the optimizer step, B's gradient is projected
//!
//! ```text
//! g_B ← (1/s²) · g_B · (A Aᵀ + 1e-8 I)⁻¹
//! ```
//!
//! so that the update of B alone best approximates full fine-tuning's update of `W`.
//! PEFT uses a pseudo-inverse; the `r × r` matrix is symmetric positive definite, so here it
//! is inverted exactly, in f64 on the host, once per frozen `A` (cached by tensor id). The
//! product with `g_B` runs on the gradient's device, in its dtype (f32 for half precision).
//!
//! Pair the hook with any optimizer over B (e.g. [`GroupedAdamW`](crate::train::GroupedAdamW)
//! through [`train_step`](crate::train::train_step)). PEFT's `LoraFAOptimizer` is HF's AdamW
//! (ε = 1e-6, weight decay 0 by default, decay applied after the Adam update); candle's AdamW
//! defaults differ (ε = 1e-8, decay 0.01 applied before): set them to match PEFT's run.
//!
//! A and B are paired per layer (a [`LoraFaLinear`], whose A is [`Factor::Frozen`] and B
//! [`Factor::Trainable`]), never by parameter order.

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId};

use crate::adapter::{Adapter, Variant};
use crate::error::{Error, Result, Scope};
use crate::linalg::invert;
use crate::low_rank::Factor;
use crate::matmul::matmul;
use crate::shared::Shared;
use crate::train::hooks::{layer_as, select_kind, StepHook};
use crate::variants::lora_fa::LoraFaLinear;

/// How the projection names itself in errors.
const RULE: &str = "the LoRA-FA projection";

/// The ridge added to `A Aᵀ` before inversion (PEFT's `delta`).
pub const LORA_FA_RIDGE: f64 = 1e-8;

/// The gradient projection as a [`StepHook`] (it acts in `before_step`).
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use lorakit::low_rank::{Factor, LowRankPair};
/// use lorakit::train::{LoraFaProjection, StepHook};
/// use lorakit::{Adapter, FrozenLinear, LoraFaConfig, LoraFaLinear, Shared};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let base = FrozenLinear::new(Tensor::zeros((3, 4), DType::F32, &dev)?, None)?;
/// let a = Tensor::new(&[[1f32, 0., 0., 0.], [0., 2., 0., 0.]], &dev)?;
/// let b = Var::zeros((3, 2), DType::F32, &dev)?;
/// let pair = LowRankPair { a: Factor::Frozen(a), b: Factor::Trainable(b.clone()) };
/// let config = LoraFaConfig::new(2, 2.0); // s = alpha / r = 1
/// let layer = Shared::new(LoraFaLinear::from_weights("fc", base, &config, pair)?);
/// let mut hook = LoraFaProjection::new(&[layer.clone().erase()])?;
/// let y = layer.read().forward_t(&Tensor::ones((1, 4), DType::F32, &dev)?, true)?;
/// let mut grads = y.sum_all()?.backward()?;
/// hook.before_step(1, &mut grads)?;
/// // Each row of g_B is x Aᵀ = [1, 2]; A Aᵀ = diag(1, 4) (+1e-8), s = 1: rows become [1, 0.5].
/// let g = grads.get(&b).unwrap().to_vec2::<f32>()?;
/// assert!((g[0][0] - 1.0).abs() < 1e-6 && (g[0][1] - 0.5).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub struct LoraFaProjection {
    layers: Vec<Shared<dyn Adapter>>,
    /// `(A Aᵀ + δI)⁻¹` per frozen A and compute dtype, on A's device.
    inverses: HashMap<(TensorId, DType), Tensor>,
}

impl std::fmt::Debug for LoraFaProjection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = crate::shared::layer_names(&self.layers);
        f.debug_struct("LoraFaProjection")
            .field("layers", &names)
            .finish()
    }
}

impl LoraFaProjection {
    /// The projection for the LoRA-FA layers among `layers` (layers of other variants are
    /// skipped, so a model's whole [`crate::model::AdaptedSet`] can be passed). Errors if
    /// none is a LoRA-FA layer.
    pub fn new(layers: &[Shared<dyn Adapter>]) -> Result<Self> {
        Ok(Self {
            layers: select_kind(layers, Variant::LoraFa, RULE)?,
            inverses: HashMap::new(),
        })
    }

    /// Number of layers projected.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether no layer is projected.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Replaces each layer's B gradient in `grads` by its projection. Layers without a
    /// gradient this step are skipped; a B shared by several layers is projected once
    /// (their A must then be the same tensor).
    pub fn project(&mut self, grads: &mut GradStore) -> Result<()> {
        let mut done: HashMap<TensorId, TensorId> = HashMap::new();
        let mut live: HashSet<TensorId> = HashSet::new();
        for layer in &self.layers {
            let guard = layer.read();
            let (name, a, b_var, scale) = lora_fa_parts(&*guard)?;
            live.insert(a.id());
            let b = b_var.as_tensor();
            if let Some(a_id) = done.get(&b.id()) {
                if *a_id != a.id() {
                    return Err(Error::layer_config(
                        name.to_string(),
                        "lora_B",
                        "B is shared with a layer whose frozen A differs; the \
                                 LoRA-FA projection is ambiguous"
                            .to_string(),
                    ));
                }
                continue;
            }
            let Some(g) = grads.get(b) else { continue };
            if scale == 0.0 || !scale.is_finite() {
                return Err(Error::layer_config(
                    name.to_string(),
                    "scale",
                    format!("the LoRA-FA projection divides by s², got s = {scale}"),
                ));
            }
            let compute = match g.dtype() {
                DType::F64 => DType::F64,
                _ => DType::F32,
            };
            let inv = match self.inverses.get(&(a.id(), compute)) {
                Some(inv) => inv.clone(),
                None => {
                    let inv = ridge_inverse(name, a, compute)?;
                    self.inverses.insert((a.id(), compute), inv.clone());
                    inv
                }
            };
            let projected = (matmul(&g.to_dtype(compute)?, &inv)? * (1.0 / (scale * scale)))?
                .to_dtype(g.dtype())?;
            grads.insert(b, projected);
            done.insert(b.id(), a.id());
        }
        // Forget inverses of A tensors no layer holds any more (pairs replaced).
        self.inverses.retain(|(id, _), _| live.contains(id));
        Ok(())
    }
}

impl StepHook for LoraFaProjection {
    fn before_step(&mut self, _step: usize, grads: &mut GradStore) -> Result<()> {
        self.project(grads)
    }
}

/// A LoRA-FA layer's name, frozen A, trainable B and scale, or an error naming the layer.
fn lora_fa_parts(layer: &dyn Adapter) -> Result<(&str, &Tensor, &candle_core::Var, f64)> {
    let name = layer.name();
    let fa = layer_as::<LoraFaLinear>(layer, RULE)?;
    let (lora, pair) = (fa.lora(), fa.lora().pair());
    // LoraFaLinear keeps A frozen and B trainable; anything else is a broken invariant.
    let (Factor::Frozen(a), Factor::Trainable(b)) = (&pair.a, &pair.b) else {
        return Err(Error::usage(
            Scope::Layer(name.to_string()),
            "a LoRA-FA layer must have a frozen A and a trainable B",
        ));
    };
    Ok((name, a, b, lora.scale()))
}

/// `(A Aᵀ + δI)⁻¹` computed in f64 on the host, returned in `dtype` on A's device.
#[allow(clippy::indexing_slicing)] // `m` is r × r and `i, j < r`
fn ridge_inverse(layer: &str, a: &Tensor, dtype: DType) -> Result<Tensor> {
    let rows = crate::kernels::host_f64(a)?.to_vec2::<f64>()?;
    let r = rows.len();
    let mut m = vec![0f64; r * r];
    for (i, ai) in rows.iter().enumerate() {
        for (j, aj) in rows.iter().enumerate() {
            let dot: f64 = ai.iter().zip(aj).map(|(x, y)| x * y).sum();
            m[i * r + j] = dot + if i == j { LORA_FA_RIDGE } else { 0.0 };
        }
    }
    let inv = invert(&mut m, r).ok_or_else(|| {
        Error::layer_config(
            layer.to_string(),
            "lora_A",
            "A Aᵀ + 1e-8·I is singular or not finite".to_string(),
        )
    })?;
    Ok(Tensor::from_vec(inv, (r, r), a.device())?.to_dtype(dtype)?)
}
