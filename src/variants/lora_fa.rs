//! LoRA-FA (Zhang et al. 2023, arXiv 2308.03303): LoRA with `A` frozen at its random init.
//!
//! The layer is a [`LoraLinear`] whose `A` is a [`Factor::Frozen`] constant (not a `Var`:
//! no optimizer state, and the fused kernel computes no gradient for it) and whose `B` is
//! zero-initialized and trained. Scale, dropout and init follow [`LoraConfig`] exactly as
//! for LoRA. Its [`AdapterKind`] is [`AdapterKind::LoraFa`]. `tensors_to_save` keeps PEFT's
//! names for both factors (`lora_A.weight`, `lora_B.weight`).

use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;

use crate::adapter::AdapterKind;
use crate::error::Result;
use crate::frozen::FrozenLinear;
use crate::low_rank::{trainable_var, Factor, LowRankPair};
use crate::variants::lora::{LoraConfig, LoraLinear};

/// Builds a LoRA-FA layer over `base`: `A` initialized by `config` and frozen, `B`
/// created through `vb` as `lora_B` (the only variable registered).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::{lora_fa, Adapter, AdapterKind, FrozenLinear, LoraConfig};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let base = FrozenLinear::new(Tensor::randn(0f32, 1., (32, 16), &dev)?, None)?;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let layer = lora_fa::new(base, &LoraConfig::new(4, 8.0), vb.pp("q_proj"))?;
/// assert_eq!(layer.kind(), AdapterKind::LoraFa);
/// assert_eq!(layer.num_trainable_params(), 32 * 4); // B only
/// assert_eq!(varmap.all_vars().len(), 1);
/// # Ok(()) }
/// ```
pub fn new(base: FrozenLinear, config: &LoraConfig, vb: VarBuilder) -> Result<LoraLinear> {
    let name = vb.prefix();
    config.validate(&name)?;
    let (a, b) = config.init_pair(&name, &base)?;
    let pair = LowRankPair {
        a: Factor::Frozen(a),
        b: Factor::Trainable(trainable_var(&vb, "lora_B", &b)?),
    };
    from_pair_checked(name, base, pair, config.scale(), config.dropout)
}

/// Builds a LoRA-FA layer from existing tensors (a loaded adapter): `a` is frozen (detached
/// if it was a variable), `b` becomes a trainable `Var` (shared if it already is one).
pub fn from_tensors(
    name: impl Into<String>,
    base: FrozenLinear,
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
) -> Result<LoraLinear> {
    let pair = LowRankPair {
        a: Factor::Frozen(a.detach()),
        b: Factor::Trainable(Var::from_tensor(&b)?),
    };
    from_pair_checked(name, base, pair, scale, dropout)
}

fn from_pair_checked(
    name: impl Into<String>,
    base: FrozenLinear,
    pair: LowRankPair,
    scale: f64,
    dropout: f64,
) -> Result<LoraLinear> {
    Ok(LoraLinear::from_pair(name, base, pair, scale, dropout)?.with_kind(AdapterKind::LoraFa))
}
