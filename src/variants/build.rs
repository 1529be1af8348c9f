//! How layers are built, one shape for every variant:
//!
//! - [`AdapterLayer`]: a layer type with its config, built fresh by
//!   `Layer::new(base, &config, vb)`; [`crate::model::AdapterPlan::of`] builds any such type
//!   for every targeted module of a model.
//! - [`PeftLayer`]: how a variant is built from a PEFT adapter config (fresh) and from an
//!   adapter file's tensors (loaded), under PEFT's names. Saving needs no glue: each layer's
//!   [`Adapter::tensors_to_save`], [`Adapter::model_tensors`] and
//!   [`Adapter::config_entries`] say what it writes.
//!
//! So `peft/` and `model/` stay generic: a new variant implements these traits in its own
//! module and adds one line to the table behind [`peft_glue`] (and a member to
//! [`Variant`]).

use std::marker::PhantomData;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde_json::{Map, Value};

use crate::adapter::{Adapter, Variant};
use crate::error::Result;
use crate::frozen::{BaseKind, FrozenLinear};
use crate::init::LoraInit;
use crate::shared::Shared;

/// The rank and alpha one module gets (after PEFT's `rank_pattern` / `alpha_pattern`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModuleSettings {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
}

/// A layer type with a config struct, built fresh the same way for every variant.
pub trait AdapterLayer: Adapter + Sized + 'static {
    /// The layer's hyper-parameters.
    type Config: Clone + Send + Sync + 'static;

    /// A fresh layer over `base`, its trainable variables created through `vb` (whose prefix
    /// names the layer). The same as the type's own `new`.
    fn build(base: FrozenLinear, config: &Self::Config, vb: VarBuilder) -> Result<Self>;

    /// `config` with one module's rank and alpha applied (variants without a per-module
    /// rank, such as VeRA, return it unchanged).
    fn config_for_module(config: &Self::Config, settings: ModuleSettings) -> Self::Config;

    /// A fresh adapter of this variant over an embedding table
    /// ([`crate::BaseKind::Embedding`]). Default: an error naming the variant (only LoRA and
    /// LoRA+ adapt embeddings).
    fn build_embedding(
        base: FrozenLinear,
        config: &Self::Config,
        vb: VarBuilder,
    ) -> Result<Shared<dyn Adapter>> {
        let _ = (base, config);
        Err(no_embedding_support(&vb.prefix(), Self::VARIANT))
    }

    /// The variant, for messages.
    const VARIANT: Variant;
}

/// The error for a variant that cannot adapt an embedding.
pub(crate) fn no_embedding_support(path: &str, variant: Variant) -> crate::Error {
    crate::Error::layer_config(
        path,
        "target_modules",
        format!(
            "`{path}` is an embedding; lorakit adapts embeddings with LoRA (and LoRA+) only, \
             not {variant}"
        ),
    )
}

/// One module's settings as a PEFT adapter config gives them.
#[derive(Clone, Copy, Debug)]
pub struct PeftModule<'a> {
    /// The module's path in the model (`model.layers.0.self_attn.q_proj`).
    pub path: &'a str,
    /// Rank and alpha after the config's patterns (AdaLoRA: `init_r`).
    pub settings: ModuleSettings,
    /// `use_rslora`.
    pub use_rslora: bool,
    /// The adapter-input dropout (`lora_dropout`, `vera_dropout`).
    pub dropout: f64,
    /// Every key of `adapter_config.json`, for settings only one variant reads.
    pub raw: &'a Map<String, Value>,
    /// For fresh layers: the init scheme (the config may not say).
    pub init: LoraInit,
    /// For fresh layers: the init seed.
    pub seed: u64,
    /// `lora_bias`: a trainable bias on B (LoRA only).
    pub lora_bias: bool,
}

/// The tensors of one module in an adapter file.
pub trait TensorSource {
    /// The module's tensor `<suffix>` (e.g. `lora_A.weight`), checked to have shape
    /// `expected`, in the base layer's dtype and on its device; marked as used.
    fn layer_tensor(&self, suffix: &str, expected: &[usize]) -> Result<Tensor>;
    /// The first dimension of the module's tensor `<suffix>` as stored (a rank the config
    /// does not give, such as AdaLoRA's truncated one).
    fn layer_rows(&self, suffix: &str) -> Result<usize>;
    /// A model-level tensor (`base_model.<name>`, e.g. VeRA's `vera_A`) in the base's dtype
    /// and device, the same tensor for every module that asks; `None` if the file has none.
    fn model_tensor(&self, name: &str) -> Result<Option<Tensor>>;
    /// The file, for error messages.
    fn file(&self) -> String;
}

/// How a variant's layer comes from a PEFT adapter config and file.
pub trait PeftLayer: Adapter + Sized + 'static {
    /// The suffixes of the tensors a module of this variant has in a file (`lora_A.weight`).
    const TENSOR_SUFFIXES: &'static [&'static str];

    /// Whether fresh layers can be built from a config alone; an error saying why not.
    fn peft_can_build_fresh() -> Result<()> {
        Ok(())
    }
    /// A fresh, trainable layer for the module `m` over `base`.
    fn peft_new(m: &PeftModule, base: FrozenLinear, vb: VarBuilder) -> Result<Self>;
    /// The layer for the module `m` from the file's tensors.
    fn peft_load(m: &PeftModule, base: FrozenLinear, source: &dyn TensorSource) -> Result<Self>;
    /// A fresh adapter over an embedding; default: an error (see
    /// [`AdapterLayer::build_embedding`]).
    fn peft_new_embedding(
        m: &PeftModule,
        base: FrozenLinear,
        vb: VarBuilder,
    ) -> Result<Shared<dyn Adapter>> {
        let _ = (base, vb);
        Err(no_embedding_support(m.path, Self::PEFT_VARIANT))
    }
    /// An embedding's adapter from the file's tensors; default: an error.
    fn peft_load_embedding(
        m: &PeftModule,
        base: FrozenLinear,
        source: &dyn TensorSource,
    ) -> Result<Shared<dyn Adapter>> {
        let _ = (base, source);
        Err(no_embedding_support(m.path, Self::PEFT_VARIANT))
    }
    /// The variant, for messages.
    const PEFT_VARIANT: Variant;
    /// The rank and scale a layer for `m` has ([`Adapter::rank_and_scale`] of a layer the
    /// config describes).
    fn peft_rank_and_scale(m: &PeftModule) -> (usize, f64);
    /// Checks a config about to be saved with layers of this variant (settings PEFT
    /// requires to load it).
    fn peft_check_save(_raw: &Map<String, Value>) -> Result<()> {
        Ok(())
    }

    /// The base weight shape a module's stored tensors imply: `layer_dims(suffix)` gives
    /// the shape of the module's tensor with that suffix, `model_dims(name)` of a
    /// model-level one (VeRA's pair). Used to check a checkpoint before a merge.
    fn peft_implied_shape(layer_dims: Dims, model_dims: Dims) -> ImpliedShape;
}

/// The base weight shape `(out, in)` an adapter module's stored tensors imply, from their
/// shapes alone (each variant says how: [`PeftLayer::peft_implied_shape`]). LoRA and DoRA's
/// `lora_A` is `(r, in)` and `lora_B` `(out, r)`; VeRA's `vera_lambda_b` is `(out)`, and its
/// shared `vera_A` `(r, max_in)` bounds `in`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImpliedShape {
    /// Output features, when the file tells.
    pub out_features: Option<usize>,
    /// Input features, when the file tells.
    pub in_features: Option<usize>,
    /// The most input features the file allows (VeRA's shared `vera_A`), when it bounds them.
    pub max_in_features: Option<usize>,
}

impl ImpliedShape {
    /// From a low-rank pair's shapes: `a` is `(r, in)`, `b` is `(out, r)`.
    pub fn from_pair(a: Option<Vec<usize>>, b: Option<Vec<usize>>) -> Self {
        let rows_cols = |d: Option<Vec<usize>>| match d.as_deref() {
            Some(&[rows, cols]) => Some((rows, cols)),
            _ => None,
        };
        Self {
            out_features: rows_cols(b).map(|(out, _)| out),
            in_features: rows_cols(a).map(|(_, inp)| inp),
            max_in_features: None,
        }
    }

    /// Whether a weight of `shape` (out, in) agrees with it.
    pub fn admits(&self, shape: &[usize]) -> bool {
        let [out, inp] = shape else {
            return false;
        };
        self.out_features.is_none_or(|o| o == *out)
            && self.in_features.is_none_or(|i| i == *inp)
            && self.max_in_features.is_none_or(|m| *inp <= m)
    }
}

impl std::fmt::Display for ImpliedShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let out = self
            .out_features
            .map_or_else(|| "?".to_string(), |o| o.to_string());
        let inp = match (self.in_features, self.max_in_features) {
            (Some(i), _) => i.to_string(),
            (None, Some(m)) => format!("<= {m}"),
            (None, None) => "?".to_string(),
        };
        write!(f, "[{out}, {inp}]")
    }
}

/// A stored tensor's shape by name (`None` if the file lacks it).
pub type Dims<'a> = &'a dyn Fn(&str) -> Option<Vec<usize>>;

/// A [`PeftLayer`] behind a type-erased handle, for the file-format code.
pub trait PeftGlue: Sync {
    /// [`PeftLayer::TENSOR_SUFFIXES`].
    fn tensor_suffixes(&self) -> &'static [&'static str];
    /// [`PeftLayer::peft_can_build_fresh`].
    fn can_build_fresh(&self) -> Result<()>;
    /// [`PeftLayer::peft_rank_and_scale`].
    fn rank_and_scale(&self, m: &PeftModule) -> (usize, f64);
    /// [`PeftLayer::peft_check_save`].
    fn check_save(&self, raw: &Map<String, Value>) -> Result<()>;
    /// [`PeftLayer::peft_implied_shape`].
    fn implied_shape(&self, layer_dims: Dims, model_dims: Dims) -> ImpliedShape;
    /// [`PeftLayer::peft_new`], shared.
    fn fresh(
        &self,
        m: &PeftModule,
        base: FrozenLinear,
        vb: VarBuilder,
    ) -> Result<Shared<dyn Adapter>>;
    /// [`PeftLayer::peft_load`], shared.
    fn load(
        &self,
        m: &PeftModule,
        base: FrozenLinear,
        source: &dyn TensorSource,
    ) -> Result<Shared<dyn Adapter>>;
}

struct Glue<L>(PhantomData<fn() -> L>);

impl<L: PeftLayer> PeftGlue for Glue<L> {
    fn tensor_suffixes(&self) -> &'static [&'static str] {
        L::TENSOR_SUFFIXES
    }

    fn can_build_fresh(&self) -> Result<()> {
        L::peft_can_build_fresh()
    }

    fn rank_and_scale(&self, m: &PeftModule) -> (usize, f64) {
        L::peft_rank_and_scale(m)
    }

    fn implied_shape(&self, layer_dims: Dims, model_dims: Dims) -> ImpliedShape {
        L::peft_implied_shape(layer_dims, model_dims)
    }

    fn check_save(&self, raw: &Map<String, Value>) -> Result<()> {
        L::peft_check_save(raw)
    }

    fn fresh(
        &self,
        m: &PeftModule,
        base: FrozenLinear,
        vb: VarBuilder,
    ) -> Result<Shared<dyn Adapter>> {
        if base.kind() == BaseKind::Embedding {
            return L::peft_new_embedding(m, base, vb);
        }
        Ok(Shared::new(L::peft_new(m, base, vb)?).erase())
    }

    fn load(
        &self,
        m: &PeftModule,
        base: FrozenLinear,
        source: &dyn TensorSource,
    ) -> Result<Shared<dyn Adapter>> {
        if base.kind() == BaseKind::Embedding {
            return L::peft_load_embedding(m, base, source);
        }
        Ok(Shared::new(L::peft_load(m, base, source)?).erase())
    }
}

/// The variants a PEFT adapter file can hold, each with its glue. The other variants'
/// layers save as LoRA ([`Variant::saved_as`]).
const PEFT_VARIANTS: [(Variant, &dyn PeftGlue); 4] = {
    use crate::variants::{AdaLoraLinear, DoraLinear, LoraLinear, VeraLinear};
    [
        (Variant::Lora, &Glue::<LoraLinear>(PhantomData)),
        (Variant::Dora, &Glue::<DoraLinear>(PhantomData)),
        (Variant::Vera, &Glue::<VeraLinear>(PhantomData)),
        (Variant::AdaLora, &Glue::<AdaLoraLinear>(PhantomData)),
    ]
};

/// The PEFT glue of `variant`, or `None` for a variant PEFT has no format for.
pub fn peft_glue(variant: Variant) -> Option<&'static dyn PeftGlue> {
    PEFT_VARIANTS
        .iter()
        .find(|(v, _)| *v == variant)
        .map(|&(_, glue)| glue)
}

/// Every tensor suffix any variant's modules have in a PEFT file.
pub fn peft_tensor_suffixes() -> impl Iterator<Item = &'static str> {
    PEFT_VARIANTS
        .iter()
        .flat_map(|(_, glue)| glue.tensor_suffixes().iter().copied())
}
