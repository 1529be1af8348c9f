//! AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): LoRA in SVD form,
//! `ΔW = s · B diag(E) A`, whose ranks are pruned during training by zeroing entries of `E`.
//!
//! [`AdaLoraLinear`] is the layer; the rank allocator, budget schedule and orthogonality
//! penalty that train it live in [`crate::train::adalora`].
//!
//! Shapes follow PEFT: `A` is `(r, d_in)`, `E` is `(r, 1)`, `B` is `(d_out, r)`. The
//! forward runs the shared fused product with `A_eff = E ⊙ A` (E broadcast along `d_in`),
//! built from candle ops so gradients reach both `E` and `A`. The scale is
//! `alpha / (init_r + 1e-5)` and keeps `init_r` after pruning, as PEFT's files assume.

use std::any::Any;

use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;
use serde_json::Value;

use crate::adapter::{AdaptedBase, Adapter, ConfigEntry, NamedVar, ParamRole, Variant};
use crate::error::{Error, Result};
use crate::frozen::FrozenLinear;
use crate::init::SeededRng;
use crate::kernels::LowRankTerm;
use crate::low_rank::{low_rank_forward, trainable_var, Factor, LowRankPair};
use crate::validate;
use crate::variants::build::{
    AdapterLayer, Dims, ImpliedShape, ModuleSettings, PeftLayer, PeftModule, TensorSource,
};

/// Standard deviation of PEFT's AdaLoRA init for `A` and `B`.
pub const ADALORA_INIT_STD: f64 = 0.02;

/// AdaLoRA layer hyper-parameters; defaults match PEFT's `AdaLoraConfig`
/// (`init_r` = 12, `lora_alpha` = 8, dropout 0), with seed 0.
///
/// The schedule fields of PEFT's config (`target_r`, `tinit`, …) belong to the rank
/// allocator: see [`crate::train::adalora::RankAllocatorConfig`].
#[derive(Clone, Debug, PartialEq)]
pub struct AdaLoraConfig {
    /// Initial rank of every layer (≥ 1).
    pub init_r: usize,
    /// `lora_alpha` (finite, > 0).
    pub alpha: f64,
    /// Dropout on the adapter input, in `[0, 1)`, only in training.
    pub dropout: f64,
    /// Seed of the init; mixed with the layer name so layers differ.
    pub seed: u64,
}

impl Default for AdaLoraConfig {
    fn default() -> Self {
        Self {
            init_r: 12,
            alpha: 8.0,
            dropout: 0.0,
            seed: 0,
        }
    }
}

impl AdaLoraConfig {
    /// A config with initial rank and alpha, other fields default.
    pub fn new(init_r: usize, alpha: f64) -> Self {
        Self {
            init_r,
            alpha,
            ..Self::default()
        }
    }

    /// The scale `alpha / (init_r + 1e-5)`.
    pub fn scale(&self) -> f64 {
        adalora_scale(self.alpha, self.init_r)
    }

    /// Checks rank, alpha and dropout, naming `layer` in the error.
    pub fn validate(&self, layer: &str) -> Result<()> {
        validate::rank(layer, self.init_r)?;
        validate::alpha(layer, self.alpha)?;
        validate::dropout(layer, self.dropout)
    }
}

/// PEFT's AdaLoRA scale, `alpha / (init_r + 1e-5)`: fixed by the initial rank, unchanged
/// by pruning or truncation.
pub fn adalora_scale(alpha: f64, init_r: usize) -> f64 {
    alpha / (init_r as f64 + 1e-5)
}

/// What an AdaLoRA layer is built from when loaded.
#[derive(Clone, Debug)]
pub struct AdaLoraWeights {
    /// `A`, `(r', d_in)`.
    pub a: Tensor,
    /// `E`, `(r', 1)`.
    pub e: Tensor,
    /// `B`, `(d_out, r')`.
    pub b: Tensor,
    /// Which of the `init_r` initial ranks the `r'` rows are (PEFT's `rank_pattern` entry
    /// for the layer: `init_r` entries, `r'` of them true); `None`: the first `r'`. It only
    /// matters for saving the pattern again.
    pub rank_pattern: Option<Vec<bool>>,
}

/// A frozen linear layer with an AdaLoRA adapter.
///
/// At init `E = 0`, so the layer equals its base; `A` and `B` start at `N(0, 0.02²)` and
/// all three train. The rank allocator prunes ranks by zeroing `E` entries
/// ([`AdaLoraLinear::apply_mask`]) and records which ranks are kept; saving
/// ([`Adapter::tensors_to_save`]) truncates to those ranks and
/// [`AdaLoraLinear::rank_pattern`] gives PEFT's per-layer `rank_pattern` entry.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::{Adapter, AdaLoraConfig, AdaLoraLinear, FrozenLinear};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let base = FrozenLinear::new(Tensor::randn(0f32, 1., (6, 5), &dev)?, None)?;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let mut layer = AdaLoraLinear::new(base.clone(), &AdaLoraConfig::new(4, 8.0), vb.pp("fc"))?;
/// let x = Tensor::randn(0f32, 1., (3, 5), &dev)?;
/// let diff = (layer.forward(&x)? - base.forward(&x)?)?.abs()?.sum_all()?;
/// assert_eq!(diff.to_scalar::<f32>()?, 0.0); // E = 0 at init
/// assert_eq!(layer.num_trainable_params(), 4 * 5 + 4 + 6 * 4);
/// layer.apply_mask(&[true, false, true, false])?;
/// assert_eq!(layer.rank_pattern(), vec![true, false, true, false]);
/// let saved = layer.tensors_to_save()?; // lora_A (2, 5), lora_B (6, 2), lora_E (2, 1)
/// assert_eq!(saved[0].1.dims(), &[2, 5]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AdaLoraLinear {
    core: AdaptedBase,
    a: Var,
    e: Var,
    b: Var,
    init_r: usize,
    alpha: f64,
    scale: f64,
    dropout: f64,
    /// Which current ranks (rows of `A`/`E`) the allocator keeps; length = current rank.
    kept: Vec<bool>,
    /// Which initial ranks the current rows are (length `init_r`, `rank()` entries true):
    /// all true for a fresh layer, the file's pattern for a loaded truncated one.
    origin: Vec<bool>,
}

impl AdaLoraLinear {
    /// Builds a layer over `base`, creating `lora_A`, `lora_E`, `lora_B` through `vb` (whose
    /// prefix also names the layer): `E = 0`, `A, B ~ N(0, 0.02²)` from a stream seeded by
    /// `config.seed` and the layer name.
    pub fn new(base: FrozenLinear, config: &AdaLoraConfig, vb: VarBuilder) -> Result<Self> {
        let name = vb.prefix();
        config.validate(&name)?;
        let (d_in, d_out, r) = (base.d_in(), base.d_out(), config.init_r);
        validate::alloc_size(&name, "init_r", "lora_A", &[r, d_in])?;
        validate::alloc_size(&name, "init_r", "lora_B", &[d_out, r])?;
        let (dtype, dev) = (base.dtype(), base.device());
        let mut rng = SeededRng::for_layer(config.seed, &name);
        let a = rng.normal((r, d_in), 0.0, ADALORA_INIT_STD, dtype, dev)?;
        let b = rng.normal((d_out, r), 0.0, ADALORA_INIT_STD, dtype, dev)?;
        let e = Tensor::zeros((r, 1), dtype, dev)?;
        let weights = AdaLoraWeights {
            a: trainable_var(&vb, "lora_A", &a)?.as_tensor().clone(),
            e: trainable_var(&vb, "lora_E", &e)?.as_tensor().clone(),
            b: trainable_var(&vb, "lora_B", &b)?.as_tensor().clone(),
            rank_pattern: None,
        };
        Self::from_weights(name, base, config, weights)
    }

    /// Builds the layer `name` from existing tensors, e.g. a truncated PEFT file: `a`
    /// `(r', d_in)`, `e` `(r', 1)`, `b` `(d_out, r')` with `r' ≤ init_r` (`r' = 0` is
    /// allowed: every rank was pruned). The scale is `alpha / (init_r + 1e-5)` as in PEFT.
    /// The tensors become trainable `Var`s (shared if they already are); `config.seed` is
    /// not used.
    pub fn from_weights(
        name: impl Into<String>,
        base: FrozenLinear,
        config: &AdaLoraConfig,
        weights: AdaLoraWeights,
    ) -> Result<Self> {
        let name = name.into();
        validate::not_embedding(&name, &base, "AdaLoRA")?;
        config.validate(&name)?;
        let init_r = config.init_r;
        let AdaLoraWeights {
            a,
            e,
            b,
            rank_pattern,
        } = weights;
        let (a, e, b) = (
            Var::from_tensor(&a)?,
            Var::from_tensor(&e)?,
            Var::from_tensor(&b)?,
        );
        let r = a.as_tensor().dims().first().copied().unwrap_or(0);
        if r > init_r {
            return Err(Error::layer_config(
                name,
                "init_r",
                format!("the tensors have rank {r}, more than init_r = {init_r}"),
            ));
        }
        for (what, t, dims) in [
            ("lora_A", a.as_tensor(), [r, base.d_in()]),
            ("lora_E", e.as_tensor(), [r, 1]),
            ("lora_B", b.as_tensor(), [base.d_out(), r]),
        ] {
            validate::shape(&name, what, t, &dims)?;
            validate::dtype_device(&name, what, t, base.dtype(), base.device())?;
        }
        let origin = (0..init_r).map(|i| i < r).collect();
        let mut layer = Self {
            core: AdaptedBase::new(name, base),
            a,
            e,
            b,
            init_r,
            alpha: config.alpha,
            scale: config.scale(),
            dropout: config.dropout,
            kept: vec![true; r],
            origin,
        };
        if let Some(pattern) = rank_pattern {
            layer.set_loaded_rank_pattern(&pattern)?;
        }
        Ok(layer)
    }

    /// Records which initial ranks a loaded, truncated layer holds: PEFT's `rank_pattern`
    /// entry for this layer (length `init_r`, as many `true` as the layer's rank).
    fn set_loaded_rank_pattern(&mut self, pattern: &[bool]) -> Result<()> {
        let kept = pattern.iter().filter(|&&k| k).count();
        if pattern.len() != self.init_r || kept != self.rank() {
            return Err(Error::layer_config(
                self.core.name().to_string(),
                "rank_pattern",
                format!(
                    "expected {} entries with {} true (init_r, rank), got {} with {kept} true",
                    self.init_r,
                    self.rank(),
                    pattern.len()
                ),
            ));
        }
        self.origin = pattern.to_vec();
        Ok(())
    }

    /// `A`, `(r, d_in)`: the right singular vectors.
    pub fn a(&self) -> &Var {
        &self.a
    }

    /// `E`, `(r, 1)`: the singular values.
    pub fn e(&self) -> &Var {
        &self.e
    }

    /// `B`, `(d_out, r)`: the left singular vectors.
    pub fn b(&self) -> &Var {
        &self.b
    }

    /// The current rank `r` (rows of `A`): `init_r` while training, the kept rank after
    /// loading a truncated file. Masked ranks still count here.
    pub fn rank(&self) -> usize {
        self.kept.len()
    }

    /// The initial rank, which fixes the scale.
    pub fn init_r(&self) -> usize {
        self.init_r
    }

    /// `lora_alpha`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The scale `alpha / (init_r + 1e-5)`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Dropout probability on the adapter input.
    pub fn dropout(&self) -> f64 {
        self.dropout
    }

    /// Number of ranks the last mask kept (all of them before any masking).
    pub fn kept_rank(&self) -> usize {
        self.kept.iter().filter(|&&k| k).count()
    }

    /// Which current ranks the last mask kept (length [`AdaLoraLinear::rank`]).
    pub fn kept(&self) -> &[bool] {
        &self.kept
    }

    /// PEFT's `rank_pattern` entry for this layer: one bool per initial rank, `true` where
    /// the rank is kept. Saved under the key `"<layer name>.lora_E"`.
    pub fn rank_pattern(&self) -> Vec<bool> {
        let mut rows = self.kept.iter();
        self.origin
            .iter()
            .map(|&present| present && rows.next().copied().unwrap_or(false))
            .collect()
    }

    /// Zeroes `E` where `keep` is false and records `keep` as the kept ranks (masked ranks
    /// keep training, as in PEFT; the allocator re-masks them). `keep` has one entry per
    /// current rank.
    ///
    /// Errors while merged (changing `E` then would make unmerging subtract another ΔW).
    pub fn apply_mask(&mut self, keep: &[bool]) -> Result<()> {
        if self.core.is_merged() {
            return Err(Error::MergedState {
                layer: self.core.name().to_string(),
                operation: "masking ranks".to_string(),
            });
        }
        if keep.len() != self.rank() {
            return Err(Error::ShapeMismatch {
                layer: self.core.name().to_string(),
                what: "rank mask".to_string(),
                expected: format!("{} entries", self.rank()),
                got: format!("{} entries", keep.len()),
            });
        }
        let e = self.e.as_tensor();
        let mask: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (keep.len(), 1), e.device())?.to_dtype(e.dtype())?;
        self.e.set(&(e * mask)?)?;
        self.kept = keep.to_vec();
        Ok(())
    }

    /// `A_eff = E ⊙ A` (E broadcast along `d_in`), tracked by autograd.
    pub fn a_eff(&self) -> Result<Tensor> {
        Ok(self.a.as_tensor().broadcast_mul(self.e.as_tensor())?)
    }

    /// The kept ranks only: `(A, E, B)` with shapes `(r', d_in)`, `(r', 1)`, `(d_out, r')`
    /// where `r'` = [`AdaLoraLinear::kept_rank`]. These, under PEFT's names, are what
    /// [`Adapter::tensors_to_save`] returns.
    pub fn truncated(&self) -> Result<(Tensor, Tensor, Tensor)> {
        let (a, e, b) = (self.a.as_tensor(), self.e.as_tensor(), self.b.as_tensor());
        if self.kept.iter().all(|&k| k) {
            return Ok((a.clone(), e.clone(), b.clone()));
        }
        let idx: Vec<u32> = (0u32..)
            .zip(&self.kept)
            .filter_map(|(i, &k)| k.then_some(i))
            .collect();
        if idx.is_empty() {
            let (dt, dev) = (a.dtype(), a.device());
            return Ok((
                Tensor::zeros((0, a.dim(1)?), dt, dev)?,
                Tensor::zeros((0, 1), dt, dev)?,
                Tensor::zeros((b.dim(0)?, 0), dt, dev)?,
            ));
        }
        let idx = Tensor::from_vec(idx.clone(), idx.len(), a.device())?;
        Ok((
            a.index_select(&idx, 0)?,
            e.index_select(&idx, 0)?,
            b.index_select(&idx, 1)?,
        ))
    }
}

impl Adapter for AdaLoraLinear {
    fn core(&self) -> &AdaptedBase {
        &self.core
    }

    fn core_mut(&mut self) -> &mut AdaptedBase {
        &mut self.core
    }

    fn kind(&self) -> Variant {
        Variant::AdaLora
    }

    fn forward_adapted(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let base = self.core.base();
        if self.rank() == 0 {
            return base.forward_checked(self.core.name(), x);
        }
        let a_eff = self.a_eff()?;
        let term = LowRankTerm {
            a: &a_eff,
            b: self.b.as_tensor(),
            scale: self.scale,
        };
        low_rank_forward(base, term, self.dropout, x, train)
    }

    fn delta_weight(&self) -> Result<Tensor> {
        let base = self.core.base();
        if self.rank() == 0 {
            return Ok(Tensor::zeros(
                (base.d_out(), base.d_in()),
                base.dtype(),
                base.device(),
            )?);
        }
        let pair = LowRankPair {
            a: Factor::Frozen(self.a_eff()?),
            b: Factor::Trainable(self.b.clone()),
        };
        Ok((pair.product()? * self.scale)?)
    }

    fn own_vars(&self) -> Vec<NamedVar> {
        let pair = LowRankPair {
            a: Factor::Trainable(self.a.clone()),
            b: Factor::Trainable(self.b.clone()),
        };
        let mut vars = pair.named_vars();
        vars.push(NamedVar {
            name: "lora_E".into(),
            role: ParamRole::Vector,
            var: self.e.clone(),
        });
        vars
    }

    /// The kept ranks under PEFT's names `lora_A`, `lora_B`, `lora_E` (no `.weight`).
    fn own_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let (a, e, b) = self.truncated()?;
        Ok(vec![
            ("lora_A".into(), a),
            ("lora_B".into(), b),
            ("lora_E".into(), e),
        ])
    }

    /// `init_r` and `alpha / (init_r + 1e-5)`: what the adapter config must give.
    fn rank_and_scale(&self) -> (usize, f64) {
        (self.init_r, self.scale)
    }

    /// The layer's `rank_pattern` entry (`"<path>.lora_E": [bool; init_r]`).
    fn config_entries(&self) -> Vec<ConfigEntry> {
        let mask = self.rank_pattern().into_iter().map(Value::Bool).collect();
        vec![ConfigEntry {
            field: "rank_pattern",
            key: Some(format!("{}.lora_E", self.core.name())),
            value: Value::Array(mask),
        }]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

crate::impl_module_for_adapter!(AdaLoraLinear);

impl AdapterLayer for AdaLoraLinear {
    type Config = AdaLoraConfig;

    fn build(base: FrozenLinear, config: &AdaLoraConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(base, config, vb)
    }

    /// The module's alpha; every AdaLoRA layer keeps the config's `init_r`.
    fn config_for_module(config: &AdaLoraConfig, settings: ModuleSettings) -> AdaLoraConfig {
        AdaLoraConfig {
            alpha: settings.alpha,
            ..config.clone()
        }
    }

    const VARIANT: Variant = Variant::AdaLora;
}

impl AdaLoraConfig {
    /// The AdaLoRA settings of one module of a PEFT adapter config.
    fn from_peft(m: &PeftModule) -> Self {
        Self {
            init_r: m.settings.r,
            alpha: m.settings.alpha,
            dropout: m.dropout,
            seed: m.seed,
        }
    }
}

impl PeftLayer for AdaLoraLinear {
    const PEFT_VARIANT: Variant = Variant::AdaLora;

    const TENSOR_SUFFIXES: &'static [&'static str] = &["lora_A", "lora_B", "lora_E"];

    fn peft_rank_and_scale(m: &PeftModule) -> (usize, f64) {
        let config = AdaLoraConfig::from_peft(m);
        (config.init_r, config.scale())
    }

    fn peft_implied_shape(layer_dims: Dims, _model_dims: Dims) -> ImpliedShape {
        ImpliedShape::from_pair(layer_dims("lora_A"), layer_dims("lora_B"))
    }

    /// PEFT refuses AdaLoRA configs without `total_step > 0`.
    fn peft_check_save(raw: &serde_json::Map<String, Value>) -> Result<()> {
        if raw.get("total_step").and_then(Value::as_u64).unwrap_or(0) == 0 {
            return Err(Error::settings(
                "adapter config",
                "total_step",
                "PEFT refuses AdaLoRA configs without total_step > 0; set it (the training \
                 length)",
            ));
        }
        Ok(())
    }

    fn peft_new(m: &PeftModule, base: FrozenLinear, vb: VarBuilder) -> Result<Self> {
        Self::new(base, &AdaLoraConfig::from_peft(m), vb)
    }

    /// The file holds the kept ranks only (`lora_A`, `lora_E`, `lora_B`, no `.weight`);
    /// `rank_pattern` says which of the `init_r` ranks they are. The scale keeps `init_r`,
    /// as in PEFT.
    ///
    /// A module with a `rank_pattern` entry on a base kept in half precision
    /// (`lorakit merge` of a bf16 checkpoint, which computes in f32) has its tensors
    /// rounded to that dtype, as PEFT rounds them: it resizes such a module to its kept
    /// ranks after casting the adapter to f32, so the file's values are copied into
    /// tensors of the base's dtype.
    fn peft_load(m: &PeftModule, base: FrozenLinear, source: &dyn TensorSource) -> Result<Self> {
        let r = source.layer_rows("lora_A")?;
        let rank_pattern = loaded_rank_pattern(m);
        let tensor = |what: &str, dims: &[usize]| -> Result<Tensor> {
            let t = source.layer_tensor(what, dims)?;
            if rank_pattern.is_some() {
                base.rounded_as_kept(&t)
            } else {
                Ok(t)
            }
        };
        let weights = AdaLoraWeights {
            a: tensor("lora_A", &[r, base.d_in()])?,
            e: tensor("lora_E", &[r, 1])?,
            b: tensor("lora_B", &[base.d_out(), r])?,
            rank_pattern,
        };
        Self::from_weights(m.path, base, &AdaLoraConfig::from_peft(m), weights)
    }
}

/// The config's `rank_pattern` entry of the module (`"<path>.lora_E"`), if it has one
/// (the config parser has checked its form).
fn loaded_rank_pattern(m: &PeftModule) -> Option<Vec<bool>> {
    let key = format!("{}.lora_E", m.path);
    m.raw
        .get("rank_pattern")?
        .get(&key)?
        .as_array()?
        .iter()
        .map(Value::as_bool)
        .collect()
}
