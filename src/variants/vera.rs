//! VeRA (Kopiczko et al. 2023, arXiv 2310.11454): one frozen random pair shared by every
//! adapted layer of a model, and per-layer trainable scaling vectors.
//!
//! ```text
//! y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (drop(x) A_sᵀ)) B_sᵀ)
//! ```
//!
//! with `A_s = A[:, :d_in]` and `B_s = B[:d_out, :]` sliced from the shared pair
//! (`A`: `r × max d_in`, `B`: `max d_out × r`), no alpha scaling, as PEFT 0.21 computes it.
//! The forward is one [`ScaledLowRankLinear`]: a fused op whose backward gives `λ_d` and
//! `λ_b` their gradients from saved intermediates and never forms one for `A_s` or `B_s`
//! (three GEMMs, not four). With training-time dropout the branch runs on the dropped input
//! with `B_eff = diag(λ_b) B_s diag(λ_d)`.
//!
//! The pair lives once, in a [`VeraShared`] (an `Arc`), created for the largest adapted
//! layer ([`VeraShared::covering`]); each layer's [`VeraConfig`] holds a clone of that
//! handle. The pair is a model-level tensor ([`Adapter::model_tensors`]): saved once, as
//! `base_model.vera_A` / `base_model.vera_B`.

use std::any::Any;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

use crate::adapter::{AdaptedBase, Adapter, ConfigEntry, NamedVar, ParamRole, Variant};
use crate::error::{Error, Result};
use crate::frozen::FrozenLinear;
use crate::init::SeededRng;
use crate::kernels::{LowRankTerm, ScaledLowRankLinear};
use crate::low_rank::{factor_product, low_rank_forward, trainable_var};
use crate::validate;
use crate::variants::build::{
    AdapterLayer, Dims, ImpliedShape, ModuleSettings, PeftLayer, PeftModule, TensorSource,
};

/// PEFT's names of the per-layer vectors.
pub const LAMBDA_B_NAME: &str = "vera_lambda_b";
/// PEFT's names of the per-layer vectors.
pub const LAMBDA_D_NAME: &str = "vera_lambda_d";

/// VeRA layer hyper-parameters: the model's shared pair, and PEFT's defaults for the
/// rest (`d_initial` = 0.1, dropout 0). The pair's rank is PEFT's `r` (default 256) and its
/// seed `projection_prng_key`: see [`VeraShared::new`].
#[derive(Clone, Debug)]
pub struct VeraConfig {
    /// The frozen pair shared by every VeRA layer of the model.
    pub shared: VeraShared,
    /// Initial value of every `λ_d` entry.
    pub d_initial: f64,
    /// Dropout on the adapter input, in `[0, 1)`, applied only in training.
    pub dropout: f64,
}

impl VeraConfig {
    /// A config over `shared` with PEFT's defaults.
    pub fn new(shared: VeraShared) -> Self {
        Self {
            shared,
            d_initial: 0.1,
            dropout: 0.0,
        }
    }

    /// Checks `d_initial` and dropout, naming `layer` in the error.
    pub fn validate(&self, layer: &str) -> Result<()> {
        validate::dropout(layer, self.dropout)?;
        if !self.d_initial.is_finite() {
            return Err(Error::layer_config(
                layer,
                "d_initial",
                format!("must be finite, got {}", self.d_initial),
            ));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct VeraPair {
    a: Tensor,
    b: Tensor,
}

/// The frozen pair shared by all VeRA layers of a model: `A` (`r × max d_in`) and `B`
/// (`max d_out × r`). Cloning shares it (one allocation, reference-counted).
#[derive(Clone, Debug)]
pub struct VeraShared(Arc<VeraPair>);

impl VeraShared {
    /// A pair of rank `r` for layers up to `max_d_in → max_d_out`, initialized as PEFT
    /// does: Kaiming-uniform with gain √2 (`U(±√(6 / fan_in))`, fan_in the number of
    /// columns), `A` then `B` from one stream seeded with `seed` (PEFT's
    /// `projection_prng_key`). Torch's stream is not reproduced: store the pair with the
    /// adapter.
    pub fn new(
        r: usize,
        max_d_in: usize,
        max_d_out: usize,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        validate::rank(PAIR, r)?;
        validate::alloc_size(PAIR, "r", "vera_A", &[r, max_d_in])?;
        validate::alloc_size(PAIR, "r", "vera_B", &[max_d_out, r])?;
        let mut rng = SeededRng::new(seed);
        let bound_a = (6.0 / max_d_in.max(1) as f64).sqrt();
        let a = rng.uniform((r, max_d_in), -bound_a, bound_a, dtype, device)?;
        let bound_b = (6.0 / r as f64).sqrt();
        let b = rng.uniform((max_d_out, r), -bound_b, bound_b, dtype, device)?;
        Self::from_tensors(a, b)
    }

    /// [`VeraShared::new`] sized for the largest of `shapes` (`(d_in, d_out)` of every layer
    /// to adapt).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use lorakit::{Adapter, FrozenLinear, VeraConfig, VeraLinear, VeraShared};
    /// # fn main() -> lorakit::Result<()> {
    /// let dev = Device::Cpu;
    /// let q = FrozenLinear::new(Tensor::randn(0f32, 1., (16, 32), &dev)?, None)?;
    /// let up = FrozenLinear::new(Tensor::randn(0f32, 1., (64, 16), &dev)?, None)?;
    /// let shapes = [(q.d_in(), q.d_out()), (up.d_in(), up.d_out())];
    /// let shared = VeraShared::covering(8, 0, shapes, DType::F32, &dev)?;
    /// let config = VeraConfig::new(shared);
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    /// let q = VeraLinear::new(q, &config, vb.pp("q"))?;
    /// let up = VeraLinear::new(up, &config, vb.pp("up"))?;
    /// assert!(q.shared().ptr_eq(up.shared()));
    /// assert_eq!(q.num_trainable_params() + up.num_trainable_params(), (16 + 8) + (64 + 8));
    /// # Ok(()) }
    /// ```
    pub fn covering(
        r: usize,
        seed: u64,
        shapes: impl IntoIterator<Item = (usize, usize)>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (max_d_in, max_d_out) = shapes
            .into_iter()
            .fold((0, 0), |(i, o), (d_in, d_out)| (i.max(d_in), o.max(d_out)));
        Self::new(r, max_d_in, max_d_out, seed, dtype, device)
    }

    /// Wraps loaded tensors (`base_model.vera_A`, `base_model.vera_B`). They are detached.
    pub fn from_tensors(a: Tensor, b: Tensor) -> Result<Self> {
        let (ad, bd) = (a.dims(), b.dims());
        let (&[r, _], &[_, r_b]) = (ad, bd) else {
            return Err(Error::ShapeMismatch {
                layer: PAIR.to_string(),
                what: "shared pair vera_A, vera_B".to_string(),
                expected: "[r, max_d_in] and [max_d_out, r]".to_string(),
                got: format!("{ad:?} and {bd:?}"),
            });
        };
        if r != r_b {
            return Err(Error::ShapeMismatch {
                layer: PAIR.to_string(),
                what: "shared pair vera_A, vera_B".to_string(),
                expected: "[r, max_d_in] and [max_d_out, r]".to_string(),
                got: format!("{ad:?} and {bd:?}"),
            });
        }
        validate::rank(PAIR, r)?;
        validate::dtype_device(PAIR, "vera_B", &b, a.dtype(), a.device())?;
        Ok(Self(Arc::new(VeraPair {
            a: a.detach(),
            b: b.detach(),
        })))
    }

    /// `A`, `(r, max d_in)`.
    pub fn a(&self) -> &Tensor {
        &self.0.a
    }

    /// `B`, `(max d_out, r)`.
    pub fn b(&self) -> &Tensor {
        &self.0.b
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        // The pair is 2-D by construction (`from_tensors`).
        self.0.a.dims().first().copied().unwrap_or(0)
    }

    /// The largest input size the pair serves.
    pub fn max_d_in(&self) -> usize {
        self.0.a.dims().get(1).copied().unwrap_or(0)
    }

    /// The largest output size the pair serves.
    pub fn max_d_out(&self) -> usize {
        self.0.b.dims().first().copied().unwrap_or(0)
    }

    /// Whether two handles hold one pair (the same `A` and `B` tensors).
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.a.id() == other.0.a.id() && self.0.b.id() == other.0.b.id())
    }

    /// The pair under PEFT's model-level names (`vera_A`, `vera_B`, saved with the
    /// `base_model.` prefix).
    pub fn tensors_to_save(&self) -> Vec<(String, Tensor)> {
        vec![
            (PAIR_A.into(), self.0.a.clone()),
            (PAIR_B.into(), self.0.b.clone()),
        ]
    }
}

/// A model-level tensor as PEFT sizes it in a saved adapter: VeRA's `vera_A` cut to the
/// adapted layers' largest input (`largest.0` columns) and `vera_B` to their largest
/// output (`largest.1` rows), as PEFT's `_find_dim` sizes the pair from the targeted layers
/// alone (a pair built to cover every linear layer of a model, or loaded larger, would not
/// load in PEFT: a size mismatch). Every layer reads only that part of the pair, so the
/// adapter computes the same. Other tensors are returned as they are.
pub(crate) fn fit_shared_pair(name: &str, t: Tensor, largest: (usize, usize)) -> Result<Tensor> {
    let (dim, len) = match name {
        PAIR_A => (1, largest.0),
        PAIR_B => (0, largest.1),
        _ => return Ok(t),
    };
    if len == 0 || t.dim(dim)? <= len {
        return Ok(t);
    }
    Ok(t.narrow(dim, 0, len)?.contiguous()?)
}

/// How the pair is named in errors.
const PAIR: &str = "VeRA shared pair";
/// PEFT's model-level name of `A`.
const PAIR_A: &str = "vera_A";
/// PEFT's model-level name of `B`.
const PAIR_B: &str = "vera_B";

/// What a VeRA layer is built from when loaded: its two vectors.
#[derive(Clone, Debug)]
pub struct VeraWeights {
    /// `λ_d`, `(r,)`.
    pub lambda_d: Tensor,
    /// `λ_b`, `(d_out,)`.
    pub lambda_b: Tensor,
}

/// A frozen linear layer with a VeRA adapter.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::{Adapter, FrozenLinear, VeraConfig, VeraLinear, VeraShared};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let base = FrozenLinear::new(Tensor::randn(0f32, 1., (32, 16), &dev)?, None)?;
/// let shared = VeraShared::covering(64, 0, [(16, 32)], DType::F32, &dev)?;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let layer = VeraLinear::new(base.clone(), &VeraConfig::new(shared), vb.pp("q_proj"))?;
/// let x = Tensor::randn(0f32, 1., (3, 16), &dev)?;
/// // λ_b starts at zero: the adapted layer equals the base.
/// let diff = (layer.forward(&x)? - base.forward(&x)?)?.abs()?.sum_all()?;
/// assert_eq!(diff.to_scalar::<f32>()?, 0.0);
/// assert_eq!(layer.num_trainable_params(), 32 + 64); // λ_b and λ_d only
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct VeraLinear {
    core: AdaptedBase,
    shared: VeraShared,
    lambda_d: Var,
    lambda_b: Var,
    dropout: f64,
}

impl VeraLinear {
    /// Builds a layer over `base` against `config.shared`, creating the vectors through
    /// `vb` (`vera_lambda_d` = `d_initial`, `vera_lambda_b` = 0, so the layer equals the
    /// base).
    pub fn new(base: FrozenLinear, config: &VeraConfig, vb: VarBuilder) -> Result<Self> {
        let name = vb.prefix();
        config.validate(&name)?;
        let (dtype, dev) = (base.dtype(), base.device());
        let d_init = (Tensor::ones(config.shared.rank(), dtype, dev)? * config.d_initial)?;
        let b_init = Tensor::zeros(base.d_out(), dtype, dev)?;
        let weights = VeraWeights {
            lambda_d: trainable_var(&vb, LAMBDA_D_NAME, &d_init)?
                .as_tensor()
                .clone(),
            lambda_b: trainable_var(&vb, LAMBDA_B_NAME, &b_init)?
                .as_tensor()
                .clone(),
        };
        Self::from_weights(name, base, config, weights)
    }

    /// Builds the layer `name` from loaded vectors; they become trainable `Var`s (shared
    /// if they already are). `config.d_initial` is not used.
    pub fn from_weights(
        name: impl Into<String>,
        base: FrozenLinear,
        config: &VeraConfig,
        weights: VeraWeights,
    ) -> Result<Self> {
        let name = name.into();
        validate::not_embedding(&name, &base, "VeRA")?;
        config.validate(&name)?;
        let (shared, dropout) = (&config.shared, config.dropout);
        let lambda_d = Var::from_tensor(&weights.lambda_d)?;
        let lambda_b = Var::from_tensor(&weights.lambda_b)?;
        if base.d_in() > shared.max_d_in() || base.d_out() > shared.max_d_out() {
            return Err(Error::ShapeMismatch {
                layer: name,
                what: "layer vs shared VeRA pair (layer larger than the pair)".to_string(),
                expected: format!(
                    "d_in ≤ {}, d_out ≤ {}",
                    shared.max_d_in(),
                    shared.max_d_out()
                ),
                got: format!("d_in = {}, d_out = {}", base.d_in(), base.d_out()),
            });
        }
        let (dtype, dev) = (base.dtype(), base.device());
        validate::dtype_device(&name, "shared pair", shared.a(), dtype, dev)?;
        validate::shape(&name, LAMBDA_D_NAME, lambda_d.as_tensor(), &[shared.rank()])?;
        validate::shape(&name, LAMBDA_B_NAME, lambda_b.as_tensor(), &[base.d_out()])?;
        validate::dtype_device(&name, LAMBDA_D_NAME, lambda_d.as_tensor(), dtype, dev)?;
        validate::dtype_device(&name, LAMBDA_B_NAME, lambda_b.as_tensor(), dtype, dev)?;
        Ok(Self {
            core: AdaptedBase::new(name, base),
            shared: shared.clone(),
            lambda_d,
            lambda_b,
            dropout,
        })
    }

    /// The shared pair this layer slices.
    pub fn shared(&self) -> &VeraShared {
        &self.shared
    }

    /// `λ_d`, `(r,)`.
    pub fn lambda_d(&self) -> &Var {
        &self.lambda_d
    }

    /// `λ_b`, `(d_out,)`.
    pub fn lambda_b(&self) -> &Var {
        &self.lambda_b
    }

    /// `A_s = A[:, :d_in]` (contiguous; a copy only when `d_in < max d_in`).
    pub fn sliced_a(&self) -> Result<Tensor> {
        Ok(self
            .shared
            .a()
            .narrow(1, 0, self.core.base().d_in())?
            .contiguous()?)
    }

    /// `B_s = B[:d_out, :]` (a view).
    pub fn sliced_b(&self) -> Result<Tensor> {
        Ok(self.shared.b().narrow(0, 0, self.core.base().d_out())?)
    }

    /// `B_eff = diag(λ_b) B_s diag(λ_d)`, `(d_out, r)`: carries the gradient to both λ's.
    pub fn effective_b(&self) -> Result<Tensor> {
        let (a, b) = (self.shared.a().clone(), self.sliced_b()?);
        self.product(&a, &b).effective_b()
    }

    /// The layer's product over the frozen `a` and `b` (`A_s`, `B_s`).
    fn product<'a>(&'a self, a: &'a Tensor, b: &'a Tensor) -> ScaledLowRankLinear<'a> {
        let base = self.core.base();
        ScaledLowRankLinear {
            weight: base.weight(),
            bias: base.bias(),
            a,
            b,
            mid: self.lambda_d.as_tensor(),
            out: self.lambda_b.as_tensor(),
        }
    }
}

impl Adapter for VeraLinear {
    fn core(&self) -> &AdaptedBase {
        &self.core
    }

    fn core_mut(&mut self) -> &mut AdaptedBase {
        &mut self.core
    }

    fn kind(&self) -> Variant {
        Variant::Vera
    }

    /// Without dropout: one [`ScaledLowRankLinear`] (fused on the CPU; `A_s` and `B_s`
    /// are views of the shared pair, not copies). With training-time dropout: the base plus
    /// the branch on the dropped input, through `B_eff`.
    fn forward_adapted(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train && self.dropout > 0.0 {
            let (a, b) = (self.sliced_a()?, self.effective_b()?);
            let term = LowRankTerm {
                a: &a,
                b: &b,
                scale: 1.0,
            };
            return low_rank_forward(self.core.base(), term, self.dropout, x, train);
        }
        let d_in = self.core.base().d_in();
        let (a, b) = (self.shared.a().narrow(1, 0, d_in)?, self.sliced_b()?);
        self.product(&a, &b)
            .forward_over(self.core.base().weight_ref(), x)
    }

    /// `(λ_b ⊙ B_s)(λ_d ⊙ A_s)`, computed in f32 for half-precision layers on the CPU.
    fn delta_weight(&self) -> Result<Tensor> {
        let a = self.shared.a().narrow(1, 0, self.core.base().d_in())?;
        factor_product(&self.effective_b()?, &a, self.core.base().dtype())
    }

    fn own_vars(&self) -> Vec<NamedVar> {
        vec![
            NamedVar {
                name: LAMBDA_B_NAME.into(),
                role: ParamRole::Vector,
                var: self.lambda_b.clone(),
            },
            NamedVar {
                name: LAMBDA_D_NAME.into(),
                role: ParamRole::Vector,
                var: self.lambda_d.clone(),
            },
        ]
    }

    /// `vera_lambda_b`, `vera_lambda_d`; the shared pair is a model-level tensor
    /// ([`Adapter::model_tensors`]), saved once per model.
    fn own_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            (LAMBDA_B_NAME.into(), self.lambda_b.as_tensor().clone()),
            (LAMBDA_D_NAME.into(), self.lambda_d.as_tensor().clone()),
        ])
    }

    fn rank_and_scale(&self) -> (usize, f64) {
        (self.shared.rank(), 1.0)
    }

    fn model_tensors(&self) -> Vec<(String, Tensor)> {
        self.shared.tensors_to_save()
    }

    /// `save_projection: true`: lorakit always stores the pair (PEFT's torch stream cannot
    /// be reproduced).
    fn config_entries(&self) -> Vec<ConfigEntry> {
        vec![ConfigEntry {
            field: "save_projection",
            key: None,
            value: serde_json::Value::Bool(true),
        }]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

crate::impl_module_for_adapter!(VeraLinear);

impl AdapterLayer for VeraLinear {
    type Config = VeraConfig;

    fn build(base: FrozenLinear, config: &VeraConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(base, config, vb)
    }

    /// VeRA's rank is its shared pair's; per-module ranks do not apply.
    fn config_for_module(config: &VeraConfig, _settings: ModuleSettings) -> VeraConfig {
        config.clone()
    }

    const VARIANT: Variant = Variant::Vera;
}

impl PeftLayer for VeraLinear {
    const PEFT_VARIANT: Variant = Variant::Vera;

    const TENSOR_SUFFIXES: &'static [&'static str] = &[LAMBDA_B_NAME, LAMBDA_D_NAME];

    /// `vera_lambda_b` is `(out)`; the shared `vera_A` `(r, max_in)` bounds `in`.
    fn peft_implied_shape(layer_dims: Dims, model_dims: Dims) -> ImpliedShape {
        ImpliedShape {
            out_features: match layer_dims(LAMBDA_B_NAME).as_deref() {
                Some(&[out]) => Some(out),
                _ => None,
            },
            in_features: None,
            max_in_features: match model_dims("vera_A").as_deref() {
                Some(&[_, max_in]) => Some(max_in),
                _ => None,
            },
        }
    }

    /// Refused: the shared pair must be sized for every layer before the first is built.
    /// Create it with [`VeraShared::covering`] and build the model with
    /// [`crate::model::AdapterPlan::vera`].
    fn peft_can_build_fresh() -> Result<()> {
        Err(no_fresh_layers())
    }

    fn peft_new(_m: &PeftModule, _base: FrozenLinear, _vb: VarBuilder) -> Result<Self> {
        Err(no_fresh_layers())
    }

    /// The pair's rank is the config's `r`; VeRA has no scale.
    fn peft_rank_and_scale(m: &PeftModule) -> (usize, f64) {
        (m.settings.r, 1.0)
    }

    /// The model's pair (`base_model.vera_A`, `base_model.vera_B`, read once) and the
    /// layer's `vera_lambda_d` (`r`) and `vera_lambda_b` (`d_out`).
    fn peft_load(m: &PeftModule, base: FrozenLinear, source: &dyn TensorSource) -> Result<Self> {
        let (Some(a), Some(b)) = (source.model_tensor(PAIR_A)?, source.model_tensor(PAIR_B)?)
        else {
            return Err(Error::Unsupported {
                what: "VeRA adapter without its shared projections",
                got: format!(
                    "no `base_model.{PAIR_A}` / `base_model.{PAIR_B}` in {} (saved with \
                     save_projection = false)",
                    source.file()
                ),
                supported: "adapters saved with save_projection = true".to_string(),
            });
        };
        let shared = VeraShared::from_tensors(a, b)?;
        if base.d_in() > shared.max_d_in() || base.d_out() > shared.max_d_out() {
            return Err(Error::ShapeMismatch {
                layer: m.path.to_string(),
                what: format!(
                    "`base_model.{PAIR_A}` / `base_model.{PAIR_B}` (base weight `{}.weight` is \
                     {:?})",
                    m.path,
                    base.weight().dims()
                ),
                expected: format!(
                    "a pair covering d_in = {}, d_out = {}",
                    base.d_in(),
                    base.d_out()
                ),
                got: format!("{:?} and {:?}", shared.a().dims(), shared.b().dims()),
            });
        }
        let weights = VeraWeights {
            lambda_d: source.layer_tensor(LAMBDA_D_NAME, &[shared.rank()])?,
            lambda_b: source.layer_tensor(LAMBDA_B_NAME, &[base.d_out()])?,
        };
        let config = VeraConfig {
            dropout: m.dropout,
            ..VeraConfig::new(shared)
        };
        Self::from_weights(m.path, base, &config, weights)
    }
}

/// Why a VeRA config alone cannot build fresh layers.
fn no_fresh_layers() -> Error {
    Error::Unsupported {
        what: "fresh adapter type",
        got: "VERA".to_string(),
        supported: "LORA (with rsLoRA, DoRA), ADALORA; build VeRA layers with AdapterPlan::vera \
                    over a VeraShared::covering pair and save them with save_adapter"
            .to_string(),
    }
}
