//! [`Quantize`]: which frozen linears of a model are quantized on load, to what type, and
//! where already-quantized weights come from ([`QuantizedSource`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::checkpoint::{Checkpoint, CheckpointBackend};
use crate::error::{Error, Result};
use crate::frozen::{BaseKind, FrozenLinear};
use crate::model::AdapterPlan;
use crate::quant::{QuantFormat, QuantizedWeight};

/// Already-quantized weights by module path (`model.layers.0.self_attn.q_proj`), e.g. a
/// GGUF file's tensors under their Hugging Face names: a module the source has is built
/// from its blocks instead of from the float checkpoint.
pub trait QuantizedSource: Send + Sync {
    /// The weight `(d_out, d_in)` stored for the module at `path`, if any.
    fn weight(&self, path: &str) -> Result<Option<QuantizedWeight>>;
}

/// A shared source is a source.
impl<S: QuantizedSource + ?Sized> QuantizedSource for Arc<S> {
    fn weight(&self, path: &str) -> Result<Option<QuantizedWeight>> {
        self.as_ref().weight(path)
    }
}

/// A map from module path to weight is a source.
impl QuantizedSource for HashMap<String, QuantizedWeight> {
    fn weight(&self, path: &str) -> Result<Option<QuantizedWeight>> {
        Ok(self.get(path).cloned())
    }
}

/// A checkpoint is a source of the weights it stores as bitsandbytes 4-bit blocks (a
/// `…-bnb-4bit` model's): the module `path`'s `path.weight`, kept as its blocks
/// ([`Checkpoint::load_bnb4`]). Models loaded with `from_pretrained` on the CPU take them
/// so; see [`Quantize::with_checkpoint_blocks`].
///
/// ```
/// use lorakit::checkpoint::Checkpoint;
/// use lorakit::model::QuantizedSource;
/// # fn main() -> lorakit::Result<()> {
/// let ckpt = Checkpoint::open("tests/fixtures/bnb/nf4_dq/model")?;
/// assert!(ckpt.weight("model.layers.0.self_attn.q_proj")?.is_some());
/// assert!(ckpt.weight("lm_head")?.is_none()); // stored in bf16
/// # Ok(()) }
/// ```
impl QuantizedSource for Checkpoint {
    fn weight(&self, path: &str) -> Result<Option<QuantizedWeight>> {
        let name = format!("{path}.weight");
        match self.is_bnb4(&name) {
            true => self.load_bnb4(&name).map(Some),
            false => Ok(None),
        }
    }
}

/// The `VarBuilder` over the checkpoint folder `dir` in `dtype` on `device`, and the plan a
/// model built from it uses: `plan` itself, or on the CPU, when the checkpoint stores
/// bitsandbytes 4-bit blocks, `plan` taking those modules as blocks
/// ([`Quantize::with_checkpoint_blocks`]). Clones of a plan share its adapted set, so the
/// caller's `plan.finish()` sees the layers.
pub(crate) fn checkpoint_and_plan(
    dir: &Path,
    dtype: DType,
    device: &Device,
    plan: &AdapterPlan,
) -> Result<(VarBuilder<'static>, AdapterPlan)> {
    let ckpt = Arc::new(Checkpoint::open(dir)?);
    let plan = match Quantize::with_checkpoint_blocks(plan.quantize(), &ckpt, device) {
        Some(q) => plan.clone().with_quantize(q),
        None => plan.clone(),
    };
    let vb = CheckpointBackend::new(ckpt, None).into_var_builder(dtype, device);
    Ok((vb, plan))
}

/// Quantize-on-load settings, given to a model through
/// [`crate::model::AdapterPlan::with_quantize`]: every linear (and GPT-2 `Conv1D`) module the
/// model builds through [`crate::model::linear`] / [`crate::model::conv1d`], adapted or
/// frozen, gets its weight quantized to a GGML type or a bitsandbytes 4-bit code book
/// ([`QuantFormat`]) as it is loaded, except modules whose last
/// path component is in the skip list (by default `lm_head`, which QLoRA setups keep in
/// float as bitsandbytes does). Embeddings and norms are never quantized. A module the
/// optional [`QuantizedSource`] has is taken from it as stored.
///
/// [`Quantize::stored_only`] quantizes nothing itself: the modules its source has come
/// from it as stored, every other stays float (how a GGUF model loads by default).
///
/// ```
/// use candle_core::quantized::GgmlDType;
/// use lorakit::model::Quantize;
/// let q = Quantize::new(GgmlDType::Q4K);
/// assert!(q.applies_to("model.layers.0.self_attn.q_proj"));
/// assert!(!q.applies_to("lm_head"));
/// let q = q.skipping(["o_proj"]);
/// assert!(!q.applies_to("model.layers.0.self_attn.o_proj") && q.applies_to("lm_head"));
/// ```
#[derive(Clone)]
pub struct Quantize {
    /// `None`: float weights stay float ([`Quantize::stored_only`]).
    dtype: Option<QuantFormat>,
    skip: Vec<String>,
    source: Option<Arc<dyn QuantizedSource>>,
}

impl std::fmt::Debug for Quantize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quantize")
            .field("dtype", &self.dtype)
            .field("skip", &self.skip)
            .field("source", &self.source.is_some())
            .finish()
    }
}

impl Quantize {
    /// Quantize to `to` — a GGML type (see [`crate::quant::QUANTIZE_TYPES`]) or a
    /// bitsandbytes 4-bit code book ([`crate::quant::Bnb4Type`]: NF4 is what
    /// `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` makes, without
    /// its optional double quantization) —, skipping `lm_head` and
    /// the routers of mixtures of experts (`gate`; gpt-oss's `router`), which choose the
    /// experts: transformers 5 holds them as parameters, which quantization configs leave
    /// in float (gpt-oss's MXFP4 one lists them).
    ///
    /// ```
    /// use candle_core::quantized::GgmlDType;
    /// use lorakit::model::Quantize;
    /// let q = Quantize::new(GgmlDType::Q8_0);
    /// assert!(q.applies_to("model.layers.0.mlp.experts.0.down_proj"));
    /// assert!(q.applies_to("model.layers.0.mlp.gate_proj"));
    /// assert!(!q.applies_to("model.layers.0.mlp.router") && !q.applies_to("model.layers.0.mlp.gate"));
    /// assert!(!q.applies_to("lm_head"));
    /// let nf4 = Quantize::new(lorakit::quant::Bnb4Type::Nf4);
    /// assert_eq!(nf4.dtype().map(|f| f.to_string()), Some("bitsandbytes nf4".to_string()));
    /// ```
    pub fn new(to: impl Into<QuantFormat>) -> Self {
        Self {
            dtype: Some(to.into()),
            skip: ["lm_head", "gate", "router"].map(String::from).to_vec(),
            source: None,
        }
    }

    /// Takes the modules `source` has from it, already quantized (any module, `lm_head`
    /// included: the skip list is empty), and quantizes no float weight.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use lorakit::model::Quantize;
    /// use lorakit::quant::QuantizedWeight;
    /// let q = Quantize::stored_only(HashMap::<String, QuantizedWeight>::new());
    /// assert!(q.dtype().is_none() && q.applies_to("lm_head"));
    /// ```
    pub fn stored_only(source: impl QuantizedSource + 'static) -> Self {
        Self {
            dtype: None,
            skip: Vec::new(),
            source: Some(Arc::new(source)),
        }
    }

    /// Replaces the skip list: modules whose last path component is one of `names` stay
    /// in float.
    pub fn skipping(mut self, names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.skip = names.into_iter().map(Into::into).collect();
        self
    }

    /// Takes the modules `source` has from it, already quantized.
    pub fn with_source(mut self, source: impl QuantizedSource + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// The settings a model loaded from `ckpt` on `device` uses, given the plan's own
    /// (`given`): when the checkpoint stores weights as bitsandbytes 4-bit blocks and the
    /// device is the CPU, those modules take their blocks from it (with `given`'s skip list
    /// and quantize-on-load type for the others, or [`Quantize::stored_only`]); otherwise
    /// `given` unchanged (on other devices the model gets those weights dequantized, as
    /// float).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use candle_core::Device;
    /// use lorakit::checkpoint::Checkpoint;
    /// use lorakit::model::Quantize;
    /// # fn main() -> lorakit::Result<()> {
    /// let ckpt = Arc::new(Checkpoint::open("tests/fixtures/bnb/nf4_dq/model")?);
    /// let q = Quantize::with_checkpoint_blocks(None, &ckpt, &Device::Cpu).unwrap();
    /// assert!(q.dtype().is_none() && q.applies_to("lm_head")); // blocks from the file only
    /// let float = Arc::new(Checkpoint::open("tests/fixtures/checkpoints/llama_f32_single")?);
    /// assert!(Quantize::with_checkpoint_blocks(None, &float, &Device::Cpu).is_none());
    /// # Ok(()) }
    /// ```
    pub fn with_checkpoint_blocks(
        given: Option<&Quantize>,
        ckpt: &Arc<Checkpoint>,
        device: &Device,
    ) -> Option<Quantize> {
        if !device.is_cpu() || !ckpt.has_bnb4() {
            return given.cloned();
        }
        Some(match given {
            Some(q) => q.clone().with_source(ckpt.clone()),
            None => Quantize::stored_only(ckpt.clone()),
        })
    }

    /// The format float weights are quantized to; `None` when they stay float
    /// ([`Quantize::stored_only`]).
    pub fn dtype(&self) -> Option<QuantFormat> {
        self.dtype
    }

    /// Whether the module at `path` is quantized (its last component is not skipped).
    pub fn applies_to(&self, path: &str) -> bool {
        let last = path.rsplit('.').next().unwrap_or(path);
        !self.skip.iter().any(|s| s == last)
    }

    /// The source's weight for `path` when the module is quantized and the source has it,
    /// checked to be `(d_out, d_in)`.
    pub(crate) fn stored(
        &self,
        path: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<Option<QuantizedWeight>> {
        let Some(source) = self.source.as_ref().filter(|_| self.applies_to(path)) else {
            return Ok(None);
        };
        let Some(w) = source.weight(path)? else {
            return Ok(None);
        };
        if (w.d_out(), w.d_in()) != (d_out, d_in) {
            return Err(Error::ShapeMismatch {
                layer: path.to_string(),
                what: "quantized weight from the source".to_string(),
                expected: format!("[{d_out}, {d_in}]"),
                got: format!("[{}, {}]", w.d_out(), w.d_in()),
            });
        }
        Ok(Some(w))
    }

    /// `base` quantized when the settings apply to it (a linear or Conv1D module not
    /// skipped, not quantized already); unchanged otherwise.
    pub(crate) fn apply(&self, path: &str, base: FrozenLinear) -> Result<FrozenLinear> {
        let Some(dtype) = self.dtype else {
            return Ok(base);
        };
        if base.kind() == BaseKind::Embedding || base.is_quantized() || !self.applies_to(path) {
            return Ok(base);
        }
        base.quantize(path, dtype)
    }
}
