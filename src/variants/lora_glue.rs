//! How LoRA layers are built from a plan and from PEFT files ([`AdapterLayer`],
//! [`PeftLayer`] for [`LoraLinear`]): linear layers get a [`LoraLinear`], embeddings a
//! [`LoraEmbedding`]. Kept apart from both layer files, which it joins.

use candle_core::Var;
use candle_nn::VarBuilder;

use crate::adapter::{Adapter, Variant};
use crate::error::Result;
use crate::frozen::FrozenLinear;
use crate::shared::Shared;
use crate::variants::build::{
    AdapterLayer, Dims, ImpliedShape, ModuleSettings, PeftLayer, PeftModule, TensorSource,
};
use crate::variants::lora::{load_pair, LoraConfig, LoraLinear, LORA_B_BIAS};
use crate::variants::lora_embedding::{
    load_embedding_pair, LoraEmbedding, EMBEDDING_A, EMBEDDING_B,
};

impl AdapterLayer for LoraLinear {
    type Config = LoraConfig;

    fn build(base: FrozenLinear, config: &LoraConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(base, config, vb)
    }

    fn config_for_module(config: &LoraConfig, settings: ModuleSettings) -> LoraConfig {
        config.for_module(settings)
    }

    fn build_embedding(
        base: FrozenLinear,
        config: &LoraConfig,
        vb: VarBuilder,
    ) -> Result<Shared<dyn Adapter>> {
        Ok(Shared::new(LoraEmbedding::new(base, config, vb)?).erase())
    }

    const VARIANT: Variant = Variant::Lora;
}

impl PeftLayer for LoraLinear {
    const TENSOR_SUFFIXES: &'static [&'static str] = &[
        "lora_A.weight",
        "lora_B.weight",
        LORA_B_BIAS,
        EMBEDDING_A,
        EMBEDDING_B,
    ];
    const PEFT_VARIANT: Variant = Variant::Lora;

    fn peft_new_embedding(
        m: &PeftModule,
        base: FrozenLinear,
        vb: VarBuilder,
    ) -> Result<Shared<dyn Adapter>> {
        Ok(Shared::new(LoraEmbedding::new(base, &LoraConfig::from_peft(m), vb)?).erase())
    }

    fn peft_load_embedding(
        m: &PeftModule,
        base: FrozenLinear,
        source: &dyn TensorSource,
    ) -> Result<Shared<dyn Adapter>> {
        let config = LoraConfig::from_peft(m);
        let pair = load_embedding_pair(&config, &base, source)?;
        Ok(Shared::new(LoraEmbedding::from_weights(m.path, base, &config, pair)?).erase())
    }

    fn peft_rank_and_scale(m: &PeftModule) -> (usize, f64) {
        let config = LoraConfig::from_peft(m);
        (config.r, config.scale())
    }

    fn peft_implied_shape(layer_dims: Dims, _model_dims: Dims) -> ImpliedShape {
        match layer_dims(EMBEDDING_A) {
            Some(a) => ImpliedShape::from_pair(Some(a), layer_dims(EMBEDDING_B)),
            None => {
                ImpliedShape::from_pair(layer_dims("lora_A.weight"), layer_dims("lora_B.weight"))
            }
        }
    }

    fn peft_new(m: &PeftModule, base: FrozenLinear, vb: VarBuilder) -> Result<Self> {
        Self::new(base, &LoraConfig::from_peft(m), vb)
    }

    fn peft_load(m: &PeftModule, base: FrozenLinear, source: &dyn TensorSource) -> Result<Self> {
        let config = LoraConfig::from_peft(m);
        let pair = load_pair(&config, &base, source)?;
        let d_out = base.d_out();
        let layer = Self::from_weights(m.path, base, &config, pair)?;
        if !config.lora_bias {
            return Ok(layer);
        }
        let bias = source.layer_tensor(LORA_B_BIAS, &[d_out])?;
        layer.with_lora_bias(Var::from_tensor(&bias)?)
    }
}
