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
use crate::kernels::LowRankTerm;
pub(crate) use crate::low_rank::check_pair;
use crate::low_rank::{low_rank_forward, trainable_var, Factor, LowRankPair};
use crate::validate;
use crate::variants::build::TensorSource;
pub use crate::variants::lora_config::{lora_scale, LoraConfig, LORA_B_BIAS};

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
    /// `lora_B.bias`, `(d_out,)`, when the config has `lora_bias`.
    bias: Option<Var>,
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
        let bias = if config.lora_bias {
            let zeros = Tensor::zeros(base.d_out(), base.dtype(), base.device())?;
            Some(trainable_var(&vb, LORA_B_BIAS, &zeros)?)
        } else {
            None
        };
        let layer = Self::from_weights(name, base, config, pair)?;
        match bias {
            Some(b) => layer.with_lora_bias(b),
            None => Ok(layer),
        }
    }

    /// The layer with a trainable bias on B (PEFT's `lora_B.bias`, `(d_out,)`, in the base's
    /// dtype and device), added to the output as `s · bias`.
    pub fn with_lora_bias(mut self, bias: Var) -> Result<Self> {
        let (name, base) = (self.core.name(), self.core.base());
        validate::shape(name, LORA_B_BIAS, bias.as_tensor(), &[base.d_out()])?;
        validate::dtype_device(
            name,
            LORA_B_BIAS,
            bias.as_tensor(),
            base.dtype(),
            base.device(),
        )?;
        self.bias = Some(bias);
        Ok(self)
    }

    /// The bias on B (`lora_bias`), if any.
    pub fn lora_bias(&self) -> Option<&Var> {
        self.bias.as_ref()
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
        validate::not_embedding(&name, &base, "LoRA-family")?;
        Self::over_any_base(name, base, config, pair)
    }

    /// [`LoraLinear::from_weights`] over a base of any kind: the low-rank state of
    /// [`crate::LoraEmbedding`], which wraps a `LoraLinear` over its table.
    pub(crate) fn over_any_base(
        name: String,
        base: FrozenLinear,
        config: &LoraConfig,
        pair: LowRankPair,
    ) -> Result<Self> {
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
            bias: None,
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
        let y = low_rank_forward(self.core.base(), self.term(), self.dropout, x, train)?;
        match self.delta_bias()? {
            Some(db) => Ok(y.broadcast_add(&db.to_dtype(y.dtype())?)?),
            None => Ok(y),
        }
    }

    fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.pair.product()? * self.scale)?)
    }

    fn delta_bias(&self) -> Result<Option<Tensor>> {
        Ok(match &self.bias {
            Some(b) => Some((b.as_tensor() * self.scale)?),
            None => None,
        })
    }

    fn own_vars(&self) -> Vec<NamedVar> {
        let mut vars = self.pair.named_vars();
        if let Some(b) = &self.bias {
            vars.push(NamedVar {
                name: LORA_B_BIAS.to_string(),
                role: crate::adapter::ParamRole::LowRankB,
                var: b.clone(),
            });
        }
        vars
    }

    fn own_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut tensors = self.pair.tensors_to_save();
        if let Some(b) = &self.bias {
            tensors.push((LORA_B_BIAS.to_string(), b.as_tensor().clone()));
        }
        Ok(tensors)
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

/// [`crate::variants::build::AdapterLayer`] for a layer type configured by a
/// [`LoraConfig`] and built by its `new(base, &config, vb)`: every LoRA-family layer.
macro_rules! lora_config_layer {
    ($layer:ty, $variant:expr) => {
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

            const VARIANT: $crate::adapter::Variant = $variant;
        }
    };
}
pub(crate) use lora_config_layer;

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
