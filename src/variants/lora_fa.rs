//! LoRA-FA (Zhang et al. 2023, arXiv 2308.03303): LoRA with `A` frozen at its random init.
//!
//! [`LoraFaLinear`] wraps a [`LoraLinear`] whose `A` is a [`Factor::Frozen`] constant (not a
//! `Var`: no optimizer state, and the fused kernel computes no gradient for it) and whose
//! `B` is zero-initialized and trained. Scale, dropout and init follow [`LoraConfig`]
//! exactly as for LoRA; files use PEFT's LoRA names (`lora_A.weight`, `lora_B.weight`). The
//! optional gradient projection of LoRA-FA v2 is a training rule:
//! [`crate::train::LoraFaProjection`].

use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;

use crate::adapter::{Adapter, NamedVar, Variant};
use crate::error::Result;
use crate::frozen::FrozenLinear;
use crate::low_rank::{trainable_var, Factor, LowRankPair};
use crate::variants::lora::{delegate_to_lora, lora_config_layer, LoraConfig, LoraLinear};

/// The config of a LoRA-FA layer: LoRA's.
pub type LoraFaConfig = LoraConfig;

/// A frozen linear layer with a LoRA-FA adapter (A frozen, B trained).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::{Adapter, FrozenLinear, LoraFaConfig, LoraFaLinear, Variant};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let base = FrozenLinear::new(Tensor::randn(0f32, 1., (32, 16), &dev)?, None)?;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let layer = LoraFaLinear::new(base, &LoraFaConfig::new(4, 8.0), vb.pp("q_proj"))?;
/// assert_eq!(layer.kind(), Variant::LoraFa);
/// assert_eq!(layer.num_trainable_params(), 32 * 4); // B only
/// assert_eq!(varmap.all_vars().len(), 1);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LoraFaLinear {
    lora: LoraLinear,
}

impl LoraFaLinear {
    /// Builds a LoRA-FA layer over `base`: `A` initialized by `config` and frozen, `B`
    /// created through `vb` as `lora_B` (the only variable registered).
    pub fn new(base: FrozenLinear, config: &LoraFaConfig, vb: VarBuilder) -> Result<Self> {
        let name = vb.prefix();
        config.validate(&name)?;
        config.check_wrapper(&name, &base, Variant::LoraFa)?;
        let (a, b) = config.init_pair(&name, &base)?;
        let pair = LowRankPair {
            a: Factor::Frozen(a),
            b: Factor::Trainable(trainable_var(&vb, "lora_B", &b)?),
        };
        let lora = LoraLinear::from_weights(name, base, config, pair)?;
        Ok(Self { lora })
    }

    /// Builds the layer `name` from existing factors (a loaded adapter): `A` is frozen
    /// (detached if it was a variable), `B` trains (a fresh `Var` unless it already is one).
    pub fn from_weights(
        name: impl Into<String>,
        base: FrozenLinear,
        config: &LoraFaConfig,
        pair: LowRankPair,
    ) -> Result<Self> {
        let name = name.into();
        config.check_wrapper(&name, &base, Variant::LoraFa)?;
        let b = match pair.b {
            Factor::Trainable(v) => v,
            Factor::Frozen(t) => Var::from_tensor(&t)?,
        };
        let pair = LowRankPair {
            a: Factor::Frozen(pair.a.tensor().detach()),
            b: Factor::Trainable(b),
        };
        let lora = LoraLinear::from_weights(name, base, config, pair)?;
        Ok(Self { lora })
    }

    /// The LoRA layer inside (pair, scale, dropout).
    pub fn lora(&self) -> &LoraLinear {
        &self.lora
    }
}

impl Adapter for LoraFaLinear {
    delegate_to_lora!(lora);

    fn kind(&self) -> Variant {
        Variant::LoraFa
    }

    fn forward_adapted(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.lora.forward_adapted(x, train)
    }

    fn own_vars(&self) -> Vec<NamedVar> {
        self.lora.own_vars()
    }

    fn own_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.lora.own_tensors()
    }
}

crate::impl_module_for_adapter!(LoraFaLinear);

lora_config_layer!(LoraFaLinear, Variant::LoraFa);
