//! [`LoraConfig`]: the hyper-parameters every LoRA-family layer shares (LoRA, LoRA+,
//! LoRA-FA, LoRA-drop, Delta-LoRA, DoRA, and LoRA on embeddings), and PEFT's scale.

use candle_core::{DType, Device, Tensor};

use crate::adapter::Variant;
use crate::error::Result;
use crate::frozen::FrozenLinear;
use crate::init::{LoraInit, SeededRng};
use crate::validate;
use crate::variants::build::{ModuleSettings, PeftModule};

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
    /// PEFT's `lora_bias`: B gets a trainable bias `(d_out,)` (saved as `lora_B.bias`,
    /// initialised to zero), added as `s · bias`; merging adds `s · bias` to the base bias,
    /// which must exist. LoRA (and LoRA+) layers only.
    pub lora_bias: bool,
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
            lora_bias: false,
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

    /// What a layer of `variant` that wraps a LoRA layer (LoRA-FA, LoRA-drop, Delta-LoRA,
    /// DoRA) checks first: a linear base (not an embedding) and no `lora_bias`.
    pub(crate) fn check_wrapper(
        &self,
        layer: &str,
        base: &FrozenLinear,
        variant: Variant,
    ) -> Result<()> {
        validate::not_embedding(layer, base, variant.name())?;
        self.refuse_lora_bias(layer, variant)
    }

    /// Errors if `lora_bias` is set: the layers of `variant` (every LoRA-family variant
    /// but LoRA and LoRA+) have no bias on B (PEFT refuses it with DoRA too).
    pub(crate) fn refuse_lora_bias(&self, layer: &str, variant: Variant) -> Result<()> {
        if self.lora_bias {
            return Err(crate::Error::layer_config(
                layer,
                "lora_bias",
                format!("lora_bias is supported on LoRA and LoRA+ layers only, not on {variant}"),
            ));
        }
        Ok(())
    }

    /// A freshly initialized `(A, B)` for a `d_in → d_out` layer, as plain tensors.
    pub fn init_pair(&self, layer: &str, base: &FrozenLinear) -> Result<(Tensor, Tensor)> {
        self.init_factors(
            layer,
            (base.d_in(), base.d_out()),
            base.dtype(),
            base.device(),
        )
    }

    /// [`LoraConfig::init_pair`] for a `d_in → d_out` weight of `dtype` on `dev` that is not
    /// (yet) a layer: an expert's slice of a stacked parameter.
    pub(crate) fn init_factors(
        &self,
        layer: &str,
        (d_in, d_out): (usize, usize),
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let r = self.r;
        validate::alloc_size(layer, "r", "lora_A", &[r, d_in])?;
        validate::alloc_size(layer, "r", "lora_B", &[d_out, r])?;
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

/// The name of B's bias (`lora_bias`) in PEFT's files and among the layer's variables.
pub const LORA_B_BIAS: &str = "lora_B.bias";

/// PEFT's LoRA scale: `alpha / r`, or `alpha / √r` with rsLoRA.
pub fn lora_scale(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

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
            lora_bias: m.lora_bias,
        }
    }
}
