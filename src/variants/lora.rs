//! LoRA (Hu et al. 2021): `y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`.
//!
//! [`LoraLinear`] is also the layer behind LoRA+ (same layer, grouped learning rates), and
//! the inside of LoRA-FA's, Delta-LoRA's, LoRA-drop's and DoRA's layers, which wrap it and
//! add what differs (a frozen A, a weight update, a calibration probe, a row scale).
//! `LoraLinear` itself knows nothing of them.

use std::any::Any;

use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;

use crate::adapter::{AdaptedBase, Adapter, NamedVar, Variant};
use crate::error::Result;
use crate::frozen::FrozenLinear;
pub use crate::init::LoraInit;
use crate::init::SeededRng;
use crate::kernels::LowRankTerm;
use crate::low_rank::{low_rank_forward, trainable_var, Factor, LowRankPair};
use crate::validate;
use crate::variants::build::{
    Dims, ImpliedShape, ModuleSettings, PeftLayer, PeftModule, TensorSource,
};

/// LoRA hyper-parameters; defaults match PEFT's `LoraConfig` (r = 8, alpha = 8, dropout 0,
/// rsLoRA off, default init), with seed 0.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` (≥ 1).
    pub r: usize,
    /// `lora_alpha` (finite, > 0).
    pub alpha: f64,
    /// Dropout on the adapter input, in `[0, 1)`, applied only in training.
    pub dropout: f64,
    /// rsLoRA: scale `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Initialization of A and B.
    pub init: LoraInit,
    /// Seed of the init; mixed with the layer name so layers differ.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            init: LoraInit::Default,
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// A config with rank and alpha, other fields default.
    pub fn new(r: usize, alpha: f64) -> Self {
        Self {
            r,
            alpha,
            ..Self::default()
        }
    }

    /// The scale `s`: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        lora_scale(self.alpha, self.r, self.use_rslora)
    }

    /// This config with a module's rank and alpha (after PEFT's `rank_pattern` /
    /// `alpha_pattern`).
    pub fn for_module(&self, settings: ModuleSettings) -> Self {
        Self {
            r: settings.r,
            alpha: settings.alpha,
            ..self.clone()
        }
    }

    /// Checks rank, alpha and dropout, naming `layer` in the error.
    pub fn validate(&self, layer: &str) -> Result<()> {
        validate::rank(layer, self.r)?;
        validate::alpha(layer, self.alpha)?;
        validate::dropout(layer, self.dropout)
    }

    /// A freshly initialized `(A, B)` for a `d_in → d_out` layer, as plain tensors.
    pub fn init_pair(&self, layer: &str, base: &FrozenLinear) -> Result<(Tensor, Tensor)> {
        let (d_in, d_out, r) = (base.d_in(), base.d_out(), self.r);
        validate::alloc_size(layer, "r", "lora_A", &[r, d_in])?;
        validate::alloc_size(layer, "r", "lora_B", &[d_out, r])?;
        let (dtype, dev) = (base.dtype(), base.device());
        let mut rng = SeededRng::for_layer(self.seed, layer);
        let a = match self.init {
            LoraInit::Default | LoraInit::BothRandom => {
                rng.kaiming_uniform_linear(r, d_in, dtype, dev)?
            }
            LoraInit::Gaussian => rng.normal((r, d_in), 0.0, 1.0 / r as f64, dtype, dev)?,
        };
        let b = match self.init {
            LoraInit::BothRandom => rng.kaiming_uniform_linear(d_out, r, dtype, dev)?,
            _ => Tensor::zeros((d_out, r), dtype, dev)?,
        };
        Ok((a, b))
    }
}

/// PEFT's LoRA scale: `alpha / r`, or `alpha / √r` with rsLoRA.
pub fn lora_scale(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// A frozen linear layer with a LoRA adapter.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraLinear};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let base = FrozenLinear::new(Tensor::randn(0f32, 1., (32, 16), &dev)?, None)?;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let layer = LoraLinear::new(base.clone(), &LoraConfig::new(4, 8.0), vb.pp("q_proj"))?;
/// let x = Tensor::randn(0f32, 1., (3, 16), &dev)?;
/// // B starts at zero: the adapted layer equals the base.
/// let diff = (layer.forward(&x)? - base.forward(&x)?)?.abs()?.sum_all()?;
/// assert_eq!(diff.to_scalar::<f32>()?, 0.0);
/// assert_eq!(layer.num_trainable_params(), 4 * 16 + 32 * 4);
/// assert_eq!(varmap.all_vars().len(), 2); // only A and B train
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LoraLinear {
    core: AdaptedBase,
    pair: LowRankPair,
    scale: f64,
    dropout: f64,
}

impl LoraLinear {
    /// Builds a LoRA layer over `base`, creating A and B through `vb` (named `lora_A`,
    /// `lora_B` under `vb`'s prefix, which also names the layer in errors).
    pub fn new(base: FrozenLinear, config: &LoraConfig, vb: VarBuilder) -> Result<Self> {
        let name = vb.prefix();
        config.validate(&name)?;
        let (a, b) = config.init_pair(&name, &base)?;
        let pair = LowRankPair {
            a: Factor::Trainable(trainable_var(&vb, "lora_A", &a)?),
            b: Factor::Trainable(trainable_var(&vb, "lora_B", &b)?),
        };
        Self::from_weights(name, base, config, pair)
    }

    /// Builds the layer `name` from an existing pair (loaded, shared, or partly frozen): the
    /// factors stay as given (a [`Factor::Trainable`] trains, a [`Factor::Frozen`] does
    /// not); `config` gives the scale and dropout, and its `r` must be the pair's rank.
    /// Checks shapes, dtypes and devices against the base.
    pub fn from_weights(
        name: impl Into<String>,
        base: FrozenLinear,
        config: &LoraConfig,
        pair: LowRankPair,
    ) -> Result<Self> {
        let name = name.into();
        config.validate(&name)?;
        check_pair(&name, &base, &pair)?;
        if pair.rank() != config.r {
            return Err(crate::Error::layer_config(
                name,
                "r",
                format!(
                    "the config has r = {} but the pair has rank {}",
                    config.r,
                    pair.rank()
                ),
            ));
        }
        Ok(Self {
            core: AdaptedBase::new(name, base),
            pair,
            scale: config.scale(),
            dropout: config.dropout,
        })
    }

    /// The low-rank pair.
    pub fn pair(&self) -> &LowRankPair {
        &self.pair
    }

    /// Replaces the pair (LoRA-drop's sharing). Errors while merged or on a shape mismatch.
    pub fn set_pair(&mut self, pair: LowRankPair) -> Result<()> {
        if self.core.is_merged() {
            return Err(crate::Error::MergedState {
                layer: self.core.name().to_string(),
                operation: "replacing the low-rank pair".to_string(),
            });
        }
        check_pair(self.core.name(), self.core.base(), &pair)?;
        self.pair = pair;
        Ok(())
    }

    /// The scale `s`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.pair.rank()
    }

    /// Dropout probability on the adapter input.
    pub fn dropout(&self) -> f64 {
        self.dropout
    }

    /// The low-rank term in the fused op's terms.
    pub fn term(&self) -> LowRankTerm<'_> {
        LowRankTerm {
            a: self.pair.a.tensor(),
            b: self.pair.b.tensor(),
            scale: self.scale,
        }
    }
}

/// Checks that `pair` fits `base`: A `(r, d_in)`, B `(d_out, r)`, same dtype and device.
pub(crate) fn check_pair(name: &str, base: &FrozenLinear, pair: &LowRankPair) -> Result<()> {
    let (a, b) = (pair.a.tensor(), pair.b.tensor());
    let r = a.dims().first().copied().unwrap_or(0);
    validate::rank(name, r)?;
    validate::shape(name, "lora_A", a, &[r, base.d_in()])?;
    validate::shape(name, "lora_B", b, &[base.d_out(), r])?;
    validate::dtype_device(name, "lora_A", a, base.dtype(), base.device())?;
    validate::dtype_device(name, "lora_B", b, base.dtype(), base.device())
}

/// The [`Adapter`] methods a layer that wraps a [`LoraLinear`] (in the field named by the
/// argument) takes from it unchanged: state, ΔW, rank and scale, downcasting.
macro_rules! delegate_to_lora {
    ($field:ident) => {
        fn core(&self) -> &$crate::adapter::AdaptedBase {
            $crate::adapter::Adapter::core(&self.$field)
        }

        fn core_mut(&mut self) -> &mut $crate::adapter::AdaptedBase {
            $crate::adapter::Adapter::core_mut(&mut self.$field)
        }

        fn delta_weight(&self) -> $crate::error::Result<candle_core::Tensor> {
            $crate::adapter::Adapter::delta_weight(&self.$field)
        }

        fn rank_and_scale(&self) -> (usize, f64) {
            $crate::adapter::Adapter::rank_and_scale(&self.$field)
        }

        fn as_any(&self) -> &dyn std::any::Any {
            self
        }

        fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
            self
        }
    };
}
pub(crate) use delegate_to_lora;

impl Adapter for LoraLinear {
    fn core(&self) -> &AdaptedBase {
        &self.core
    }

    fn core_mut(&mut self) -> &mut AdaptedBase {
        &mut self.core
    }

    fn kind(&self) -> Variant {
        Variant::Lora
    }

    fn forward_adapted(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        low_rank_forward(self.core.base(), self.term(), self.dropout, x, train)
    }

    fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.pair.product()? * self.scale)?)
    }

    fn trainable_vars(&self) -> Vec<NamedVar> {
        self.pair.named_vars()
    }

    fn tensors_to_save(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.pair.tensors_to_save())
    }

    fn rank_and_scale(&self) -> (usize, f64) {
        (self.rank(), self.scale)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

crate::impl_module_for_adapter!(LoraLinear);

/// [`AdapterLayer`] for a layer type configured by a [`LoraConfig`] and built by its
/// `new(base, &config, vb)`: every LoRA-family layer.
macro_rules! lora_config_layer {
    ($layer:ty) => {
        impl $crate::variants::build::AdapterLayer for $layer {
            type Config = $crate::variants::lora::LoraConfig;

            fn build(
                base: $crate::frozen::FrozenLinear,
                config: &Self::Config,
                vb: candle_nn::VarBuilder,
            ) -> $crate::error::Result<Self> {
                Self::new(base, config, vb)
            }

            fn config_for_module(
                config: &Self::Config,
                settings: $crate::variants::build::ModuleSettings,
            ) -> Self::Config {
                config.for_module(settings)
            }
        }
    };
}
pub(crate) use lora_config_layer;

lora_config_layer!(LoraLinear);

impl LoraConfig {
    /// The LoRA settings of one module of a PEFT adapter config.
    pub(crate) fn from_peft(m: &PeftModule) -> Self {
        Self {
            r: m.settings.r,
            alpha: m.settings.alpha,
            dropout: m.dropout,
            use_rslora: m.use_rslora,
            init: m.init,
            seed: m.seed,
        }
    }
}

/// The trainable pair `lora_A.weight` `(r, d_in)`, `lora_B.weight` `(d_out, r)` of a module
/// in an adapter file.
pub(crate) fn load_pair(
    config: &LoraConfig,
    base: &FrozenLinear,
    source: &dyn TensorSource,
) -> Result<LowRankPair> {
    let a = source.layer_tensor("lora_A.weight", &[config.r, base.d_in()])?;
    let b = source.layer_tensor("lora_B.weight", &[base.d_out(), config.r])?;
    Ok(LowRankPair {
        a: Factor::Trainable(Var::from_tensor(&a)?),
        b: Factor::Trainable(Var::from_tensor(&b)?),
    })
}

impl PeftLayer for LoraLinear {
    const TENSOR_SUFFIXES: &'static [&'static str] = &["lora_A.weight", "lora_B.weight"];

    fn peft_rank_and_scale(m: &PeftModule) -> (usize, f64) {
        let config = LoraConfig::from_peft(m);
        (config.r, config.scale())
    }

    fn peft_implied_shape(layer_dims: Dims, _model_dims: Dims) -> ImpliedShape {
        ImpliedShape::from_pair(layer_dims("lora_A.weight"), layer_dims("lora_B.weight"))
    }

    fn peft_new(m: &PeftModule, base: FrozenLinear, vb: VarBuilder) -> Result<Self> {
        Self::new(base, &LoraConfig::from_peft(m), vb)
    }

    fn peft_load(m: &PeftModule, base: FrozenLinear, source: &dyn TensorSource) -> Result<Self> {
        let config = LoraConfig::from_peft(m);
        let pair = load_pair(&config, &base, source)?;
        Self::from_weights(m.path, base, &config, pair)
    }
}
