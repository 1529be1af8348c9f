//! DoRA (Liu et al. 2024, arXiv 2402.09353): weight-decomposed LoRA.
//!
//! `W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row`, with a trainable magnitude `m` (`d_out`) and the
//! row norm `n` treated as a constant in backprop (paper §4.3, as PEFT does), so a
//! PEFT-trained adapter gives the same outputs here. The forward never forms `BA` or `W'`:
//!
//! ```text
//! y = b + c ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ),   c = m / max(n, eps)
//! ```
//!
//! runs as one fused product with `c` as its row scale; `n` comes from the factored formula
//! in [`norm`]. Gradients reach `m` through `c`, and `A`, `B` through the
//! low-rank term only.
//!
//! **Zero rows.** PEFT divides by `n = 0` (inf/NaN outputs, PEFT issue #2049); here `n` is
//! floored at [`dora_eps`] so outputs stay finite.
//!
//! **Evaluation cache.** In evaluation mode the norms are computed once and reused while
//! `A` and `B` keep the values they were computed from. Optimizers and `Var::set` write in
//! place, so each call compares A and B by value against copies taken with the norms (an
//! `O(r·(d_in + d_out))` check, against the `O(d_out·d_in·r)` recompute it saves). `m / n`
//! itself is one `d_out` division per call, so `m` may change freely (and still gets a
//! gradient in evaluation mode). Training-mode forwards always recompute the norms and drop
//! the cache. [`DoraLinear::prepare_for_inference`] fills the cache ahead of the first call;
//! merging and unmerging clear it.
//!
//! **Precision.** Norms and `m / n` are computed in f32 (f64 for f64 layers). On the CPU,
//! f16/bf16 weights are upcast for the norm's `W Aᵀ` (candle's CPU matmul has no
//! half-precision kernel), which is a `d_out × d_in` f32 temporary; f32/f64 layers and
//! GPU devices have none. The factored sum loses relative accuracy where a row of
//! `W + s·BA` nearly cancels (`n_i ≪ ‖W_i‖`).

mod cache;
pub mod norm;

use std::sync::{Mutex, MutexGuard};

use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;

use crate::adapter::{count_non_finite, Adapter, NamedVar, ParamRole, Variant};
use crate::error::{Error, Result};
use crate::frozen::FrozenLinear;
use crate::kernels::{low_rank_only, LowRankTerm, Product};
use crate::low_rank::{trainable_var, LowRankPair};
use crate::validate;
use crate::variants::build::{Dims, ImpliedShape, PeftLayer, PeftModule, TensorSource};
use crate::variants::lora::{
    delegate_to_lora, load_pair, lora_config_layer, LoraConfig, LoraLinear,
};
use cache::NormCache;
use norm::{base_row_sq_norms, dora_eps, factored_row_norms, factored_row_norms_from, norm_dtype};

/// The config of a DoRA layer: LoRA's.
pub type DoraConfig = LoraConfig;

/// What a DoRA layer is built from when loaded: the low-rank pair and the magnitude.
#[derive(Clone, Debug)]
pub struct DoraWeights {
    /// `A` and `B`.
    pub pair: LowRankPair,
    /// The magnitude `m`, `(d_out,)`; becomes a trainable `Var` unless it already is one.
    pub magnitude: Tensor,
}

/// PEFT's name of the magnitude vector (saved without a `.weight` suffix).
pub const MAGNITUDE_NAME: &str = "lora_magnitude_vector";

/// A frozen linear layer with a DoRA adapter.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::{Adapter, DoraLinear, FrozenLinear, LoraConfig};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let base = FrozenLinear::new(Tensor::randn(0f32, 1., (32, 16), &dev)?, None)?;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let layer = DoraLinear::new(base.clone(), &LoraConfig::new(4, 8.0), vb.pp("v_proj"))?;
/// let x = Tensor::randn(0f32, 1., (3, 16), &dev)?;
/// // m starts at ‖W‖_row and B at zero: the adapted layer equals the base.
/// let diff = (layer.forward(&x)? - base.forward(&x)?)?.abs()?.max_all()?;
/// assert!(diff.to_scalar::<f32>()? < 1e-5);
/// assert_eq!(layer.num_trainable_params(), 4 * 16 + 32 * 4 + 32);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DoraLinear {
    lora: LoraLinear,
    magnitude: Var,
    /// `‖W_i‖²` of the current (unmerged) base weight, in the norm dtype.
    w_sq: Tensor,
    cache: Mutex<Option<NormCache>>,
    merged: Option<MergeState>,
}

/// What merging needs to undo itself exactly.
#[derive(Debug)]
struct MergeState {
    /// The row scale `m / max(n, eps)` the merge applied, in the norm dtype.
    row_scale: Tensor,
    /// The unmerged weight, kept only when some row scale is 0 (that row cannot be divided
    /// back out).
    original: Option<Tensor>,
}

impl DoraLinear {
    /// Builds a DoRA layer over `base`: A and B as [`LoraLinear::new`] makes them (named
    /// `lora_A`, `lora_B` under `vb`'s prefix), and `lora_magnitude_vector` initialized to
    /// `‖W + s·BA‖_row` (that is `‖W‖_row` with the default zero B), as PEFT does.
    pub fn new(base: FrozenLinear, config: &DoraConfig, vb: VarBuilder) -> Result<Self> {
        config.check_wrapper(&vb.prefix(), &base, Variant::Dora)?;
        let lora = LoraLinear::new(base, config, vb.clone())?;
        let w_sq = base_row_sq_norms(lora.base())?;
        let norms = norms_of(&lora, &w_sq)?;
        let m_init = norms.to_dtype(lora.base().dtype())?;
        let magnitude = trainable_var(&vb, MAGNITUDE_NAME, &m_init)?;
        Self::from_parts(lora, magnitude, w_sq)
    }

    /// Builds the layer `name` from existing tensors (a loaded PEFT adapter): the pair as
    /// [`LoraLinear::from_weights`] takes it, and the magnitude (`d_out`), which becomes a
    /// trainable `Var` unless it already is one. `config` gives the scale and dropout.
    pub fn from_weights(
        name: impl Into<String>,
        base: FrozenLinear,
        config: &DoraConfig,
        weights: DoraWeights,
    ) -> Result<Self> {
        let DoraWeights { pair, magnitude } = weights;
        let name = name.into();
        config.check_wrapper(&name, &base, Variant::Dora)?;
        let lora = LoraLinear::from_weights(name, base, config, pair)?;
        let (name, base) = (lora.name(), lora.base());
        validate::shape(name, MAGNITUDE_NAME, &magnitude, &[base.d_out()])?;
        validate::dtype_device(
            name,
            MAGNITUDE_NAME,
            &magnitude,
            base.dtype(),
            base.device(),
        )?;
        let magnitude = Var::from_tensor(&magnitude)?;
        let w_sq = base_row_sq_norms(base)?;
        Self::from_parts(lora, magnitude, w_sq)
    }

    fn from_parts(lora: LoraLinear, magnitude: Var, w_sq: Tensor) -> Result<Self> {
        Ok(Self {
            lora,
            magnitude,
            w_sq,
            cache: Mutex::new(None),
            merged: None,
        })
    }

    /// The underlying low-rank layer (pair, scale, dropout).
    pub fn lora(&self) -> &LoraLinear {
        &self.lora
    }

    /// The magnitude vector `m`, `(d_out,)`.
    pub fn magnitude(&self) -> &Var {
        &self.magnitude
    }

    /// The row norms `‖W + s·BA‖_row` (`d_out`, detached; f64 for f64 layers, else f32),
    /// computed by the factored formula — from the cache in evaluation (`train = false`).
    pub fn weight_norms(&self, train: bool) -> Result<Tensor> {
        if train {
            *self.lock_cache() = None;
            return norms_of(&self.lora, &self.w_sq);
        }
        let (a, b) = (self.lora.pair().a.tensor(), self.lora.pair().b.tensor());
        let mut cache = self.lock_cache();
        if let Some(hit) = cache.as_ref().map(|c| c.get(a, b)).transpose()?.flatten() {
            return Ok(hit.clone());
        }
        let norms = norms_of(&self.lora, &self.w_sq)?;
        *cache = Some(NormCache::new(a, b, norms.clone())?);
        Ok(norms)
    }

    /// The row scale `c = m / max(n, eps)`, `(d_out,)` in the layer's dtype. Carries a
    /// gradient to `m` (and only to `m`).
    pub fn row_scale(&self, train: bool) -> Result<Tensor> {
        Ok(self
            .row_scale_norm_dtype(train)?
            .to_dtype(self.base().dtype())?)
    }

    fn row_scale_norm_dtype(&self, train: bool) -> Result<Tensor> {
        let dtype = self.base().dtype();
        let n = self.weight_norms(train)?.maximum(dora_eps(dtype))?;
        let m = self.magnitude.as_tensor().to_dtype(norm_dtype(dtype))?;
        Ok((m / n)?)
    }

    /// Computes and caches the row norms for evaluation now, so the first decoding call
    /// costs what later ones do. Optional: evaluation fills the cache on first use anyway.
    pub fn prepare_for_inference(&self) -> Result<()> {
        self.weight_norms(false).map(|_| ())
    }

    /// The training forward for a given dropout output `dropped` (same shape as `x`), by
    /// PEFT's formula `x Wᵀ + b + (c − 1) ⊙ (dropped Wᵀ) + c ⊙ s·(dropped Aᵀ) Bᵀ`.
    /// [`Adapter::forward_t`] uses it with a fresh dropout mask in training when dropout > 0;
    /// it is public for replaying a given mask.
    pub fn forward_with_dropped_input(&self, x: &Tensor, dropped: &Tensor) -> Result<Tensor> {
        let core = self.core();
        core.ensure_unmerged()?;
        core.check_input(x)?;
        core.check_input(dropped)?;
        validate::shape(core.name(), "dropped input", dropped, x.dims())?;
        let c = self.row_scale(true)?;
        self.dropout_forward(x, dropped, &c)
    }

    fn dropout_forward(&self, x: &Tensor, dropped: &Tensor, c: &Tensor) -> Result<Tensor> {
        let base = self.base();
        let frozen = Product {
            weight: base.weight_ref(),
            bias: base.bias(),
            low_rank: None,
            row_scale: None,
        };
        let c_minus_one = (c - 1.0)?;
        let dropped_base = Product {
            weight: base.weight_ref(),
            bias: None,
            low_rank: None,
            row_scale: Some(&c_minus_one),
        };
        let low = low_rank_only(dropped, &self.term())?.broadcast_mul(c)?;
        Ok(((frozen.forward(x)? + dropped_base.forward(dropped)?)? + low)?)
    }

    fn term(&self) -> LowRankTerm<'_> {
        self.lora.term()
    }

    fn lock_cache(&self) -> MutexGuard<'_, Option<NormCache>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Norms of `lora`'s adapted weight by the factored formula.
fn norms_of(lora: &LoraLinear, w_sq: &Tensor) -> Result<Tensor> {
    let pair = lora.pair();
    let base = lora.base();
    if !base.is_quantized() {
        return factored_row_norms(
            w_sq,
            base.weight(),
            pair.a.tensor(),
            pair.b.tensor(),
            lora.scale(),
        );
    }
    // `W Aᵀ` from the quantized blocks: the base product of the rows of `A`, transposed.
    let a = pair.a.tensor().detach();
    let compute = crate::kernels::compute_dtype(a.dtype(), a.device());
    let wa = Product {
        weight: base.weight_ref(),
        bias: None,
        low_rank: None,
        row_scale: None,
    }
    .forward(&a.to_dtype(compute)?)?
    .t()?;
    factored_row_norms_from(w_sq, &wa, pair.a.tensor(), pair.b.tensor(), lora.scale())
}

impl Adapter for DoraLinear {
    delegate_to_lora!(lora);

    fn kind(&self) -> Variant {
        Variant::Dora
    }

    fn forward_adapted(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = self.row_scale(train)?;
        let dropout = self.lora.dropout();
        if train && dropout > 0.0 {
            let dropped = crate::kernels::dropout::dropout(x, dropout)?;
            return self.dropout_forward(x, &dropped, &c);
        }
        let base = self.base();
        Product {
            weight: base.weight_ref(),
            bias: base.bias(),
            low_rank: Some(self.term()),
            row_scale: Some(&c),
        }
        .forward(x)
    }

    fn own_vars(&self) -> Vec<NamedVar> {
        let mut vars = self.lora.own_vars();
        vars.push(NamedVar {
            name: MAGNITUDE_NAME.into(),
            role: ParamRole::Vector,
            var: self.magnitude.clone(),
        });
        vars
    }

    fn own_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.lora.own_tensors()?;
        out.push((MAGNITUDE_NAME.into(), self.magnitude.as_tensor().clone()));
        Ok(out)
    }

    /// `W ← c ⊙ (W + s·BA)` with `c = m / max(n, eps)` (the forward's row scale), computed
    /// in f32 (f64 for f64 layers). Keeps `c` so [`Adapter::unmerge`] divides out exactly
    /// what was applied. With `safe`, a non-finite result is an error and nothing changes.
    fn merge(&mut self, safe: bool) -> Result<()> {
        self.core().ensure_unmerged()?;
        let w = self.base().dequantized_weight()?;
        let nd = norm_dtype(w.dtype());
        let c = self.row_scale_norm_dtype(false)?.detach();
        let adapted = (w.to_dtype(nd)? + self.delta_weight()?.to_dtype(nd)?)?;
        let merged = adapted
            .broadcast_mul(&c.unsqueeze(1)?)?
            .to_dtype(w.dtype())?;
        if safe {
            let count = count_non_finite(&merged)?;
            if count > 0 {
                return Err(Error::NonFiniteMerge {
                    layer: self.name().to_string(),
                    count,
                });
            }
        }
        let original = (count_non_finite(&c.recip()?)? > 0).then(|| w.clone());
        self.core_mut().replace_weight(merged)?;
        self.core_mut().set_merged(true);
        self.merged = Some(MergeState {
            row_scale: c,
            original,
        });
        *self.lock_cache() = None;
        Ok(())
    }

    /// `W ← W' / c − s·BA` with the `c` kept at merge (rows with `c = 0` are restored from
    /// a copy taken at merge).
    fn unmerge(&mut self) -> Result<()> {
        self.core().ensure_merged()?;
        let state = self.merged.take().ok_or_else(|| Error::NotMerged {
            layer: self.name().to_string(),
        })?;
        let w = self.base().weight().clone();
        let restored = match state.original {
            Some(original) => original,
            None => {
                let nd = state.row_scale.dtype();
                let unscaled = w
                    .to_dtype(nd)?
                    .broadcast_div(&state.row_scale.unsqueeze(1)?)?;
                (unscaled - self.delta_weight()?.to_dtype(nd)?)?.to_dtype(w.dtype())?
            }
        };
        self.core_mut().replace_weight(restored)?;
        self.core_mut().set_merged(false);
        self.w_sq = base_row_sq_norms(self.base())?;
        *self.lock_cache() = None;
        Ok(())
    }
}

crate::impl_module_for_adapter!(DoraLinear);

lora_config_layer!(DoraLinear, Variant::Dora);

impl PeftLayer for DoraLinear {
    const PEFT_VARIANT: Variant = Variant::Dora;

    const TENSOR_SUFFIXES: &'static [&'static str] =
        &["lora_A.weight", "lora_B.weight", MAGNITUDE_NAME];

    fn peft_rank_and_scale(m: &PeftModule) -> (usize, f64) {
        LoraLinear::peft_rank_and_scale(m)
    }

    fn peft_implied_shape(layer_dims: Dims, model_dims: Dims) -> ImpliedShape {
        LoraLinear::peft_implied_shape(layer_dims, model_dims)
    }

    fn peft_new(m: &PeftModule, base: FrozenLinear, vb: VarBuilder) -> Result<Self> {
        Self::new(base, &DoraConfig::from_peft(m), vb)
    }

    fn peft_load(m: &PeftModule, base: FrozenLinear, source: &dyn TensorSource) -> Result<Self> {
        let config = DoraConfig::from_peft(m);
        let pair = load_pair(&config, &base, source)?;
        let magnitude = source.layer_tensor(MAGNITUDE_NAME, &[base.d_out()])?;
        Self::from_weights(m.path, base, &config, DoraWeights { pair, magnitude })
    }
}
