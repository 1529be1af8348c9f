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
//! [`DeltaLoraLinear`] is the layer: a [`LoraLinear`] whose `W` stays a constant (no `Var`,
//! no gradient, no optimizer state). The update is a training rule,
//! [`crate::train::DeltaLoraHook`], which rewrites `W` after each step.
//!
//! Paper settings: λ = 2, K = 500 for GPT-2 Medium (E2E); λ = 0.5 for the other models
//! (BART-Large, RoBERTa). Dropout is removed because it breaks the gradient identity the
//! update relies on: asking for dropout is an error.
//!
//! Saving: [`Adapter::tensors_to_save`] adds the updated base weight under
//! [`BASE_WEIGHT_KEY`] (`base_layer.weight`, PEFT's name for a tuner layer's wrapped weight;
//! PEFT itself has no Delta-LoRA), unmerged even if the layer is merged.
//! [`DeltaLoraLinear::restore_base_weight`] puts it back. Keep `W` in f32 or wider: a bf16
//! weight rounds away updates smaller than its precision.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::adapter::{Adapter, NamedVar, Variant};
use crate::error::{Error, Result};
use crate::frozen::FrozenLinear;
use crate::low_rank::LowRankPair;
use crate::variants::lora::{delegate_to_lora, lora_config_layer, LoraConfig, LoraLinear};

/// Key (relative to the layer) under which a Delta-LoRA layer saves its updated weight.
pub const BASE_WEIGHT_KEY: &str = "base_layer.weight";

/// The config of a Delta-LoRA layer: LoRA's, with `dropout` = 0. The update's λ and K are
/// the training rule's ([`crate::train::DeltaLoraUpdate`]).
pub type DeltaLoraConfig = LoraConfig;

/// A frozen linear layer with a Delta-LoRA adapter.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::{Adapter, DeltaLoraConfig, DeltaLoraLinear, FrozenLinear, Variant};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let base = FrozenLinear::new(Tensor::zeros((4, 6), DType::F32, &dev)?, None)?;
/// let layer = DeltaLoraLinear::new(base.clone(), &DeltaLoraConfig::new(2, 2.0), vb.pp("fc"))?;
/// assert_eq!(layer.kind(), Variant::DeltaLora);
/// let with_dropout = DeltaLoraConfig { dropout: 0.1, ..DeltaLoraConfig::new(2, 2.0) };
/// assert!(DeltaLoraLinear::new(base, &with_dropout, vb.pp("fc2")).is_err());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DeltaLoraLinear {
    lora: LoraLinear,
}

impl DeltaLoraLinear {
    /// Builds a Delta-LoRA layer: LoRA's init and scale, no dropout (`config.dropout > 0` is
    /// an error). The base must be a float one: Delta-LoRA updates `W`, so a quantized base
    /// is refused.
    pub fn new(base: FrozenLinear, config: &DeltaLoraConfig, vb: VarBuilder) -> Result<Self> {
        check_no_dropout(&vb.prefix(), config.dropout)?;
        check_float_base(&vb.prefix(), &base)?;
        config.check_wrapper(&vb.prefix(), &base, Variant::DeltaLora)?;
        Ok(Self {
            lora: LoraLinear::new(base, config, vb)?,
        })
    }

    /// Builds the layer `name` from an existing pair (e.g. loaded factors), as
    /// [`LoraLinear::from_weights`]. Errors if `config` has dropout.
    pub fn from_weights(
        name: impl Into<String>,
        base: FrozenLinear,
        config: &DeltaLoraConfig,
        pair: LowRankPair,
    ) -> Result<Self> {
        let name = name.into();
        check_no_dropout(&name, config.dropout)?;
        check_float_base(&name, &base)?;
        config.check_wrapper(&name, &base, Variant::DeltaLora)?;
        Ok(Self {
            lora: LoraLinear::from_weights(name, base, config, pair)?,
        })
    }

    /// The LoRA layer inside (pair, scale).
    pub fn lora(&self) -> &LoraLinear {
        &self.lora
    }

    /// Puts a saved weight (the tensor under [`BASE_WEIGHT_KEY`]) back into the layer. Same
    /// shape, dtype and device as the current weight; the layer must be unmerged.
    pub fn restore_base_weight(&mut self, weight: Tensor) -> Result<()> {
        self.core().ensure_unmerged()?;
        self.core_mut().replace_weight(weight)
    }

    /// The weight the layer saves: `W`, with ΔW taken out while merged.
    pub fn saved_base_weight(&self) -> Result<Tensor> {
        let w = self.base().weight();
        let unmerged = if self.is_merged() {
            let delta = self.delta_weight()?.to_dtype(w.dtype())?;
            (w - delta)?
        } else {
            w.clone()
        };
        // In the stored layout, as PEFT's `base_layer.weight` (Conv1D: `(in, out)`).
        if self.base().kind().stores_in_out() {
            Ok(unmerged.t()?.contiguous()?)
        } else {
            Ok(unmerged)
        }
    }
}

/// Delta-LoRA updates `W` after each step: a quantized base has no float `W` to update. To
/// train Delta-LoRA on a layer, keep that layer's base in float (do not quantize it).
fn check_float_base(layer: &str, base: &FrozenLinear) -> Result<()> {
    base.float_weight(layer, "Delta-LoRA (it updates W after each step)")
        .map(|_| ())
}

fn check_no_dropout(layer: &str, dropout: f64) -> Result<()> {
    if dropout != 0.0 {
        return Err(Error::layer_config(
            layer,
            "dropout",
            format!(
                "Delta-LoRA has no dropout (it breaks the weight update's gradient identity), \
                 got {dropout}"
            ),
        ));
    }
    Ok(())
}

impl Adapter for DeltaLoraLinear {
    delegate_to_lora!(lora);

    fn kind(&self) -> Variant {
        Variant::DeltaLora
    }

    fn forward_adapted(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.lora.forward_adapted(x, train)
    }

    fn own_vars(&self) -> Vec<NamedVar> {
        self.lora.own_vars()
    }

    fn own_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.lora.own_tensors()?;
        out.push((BASE_WEIGHT_KEY.to_string(), self.saved_base_weight()?));
        Ok(out)
    }
}

crate::impl_module_for_adapter!(DeltaLoraLinear);

lora_config_layer!(DeltaLoraLinear, Variant::DeltaLora);
