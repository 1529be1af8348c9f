//! Loading a Llama-family model straight from a llama.cpp GGUF file, its quantized blocks
//! kept: [`GgufTensors`] (the file's tensors on a device, as a [`QuantizedSource`] for the
//! linear weights stored quantized and a `VarBuilder` for every other tensor) and
//! [`LlamaForCausalLM::from_gguf`].

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::model::GgufModel;
use super::names::gguf_tensor;
use crate::checkpoint::backend::check_shape;
use crate::error::Result;
use crate::model::{AdapterPlan, Quantize, QuantizedSource};
use crate::models::llama::LlamaForCausalLM;
use crate::quant::QuantizedWeight;

/// A [`GgufModel`]'s tensors under Hugging Face names, read on `device` as a model asks for
/// them. Cloning shares the opened file.
///
/// - As a [`QuantizedSource`]: the `weight` of a module whose tensor is stored in a
///   quantized GGML type (Q8_0, Q4_K, ...) comes back as a [`QuantizedWeight`] with the
///   file's blocks; a float-stored one (F32, F16, BF16) is `None`, so the model's float path
///   reads it through the `VarBuilder` (and a plan's [`Quantize`] dtype, if any, applies).
/// - As a `VarBuilder` ([`GgufTensors::var_builder`]): every tensor, dequantized to the
///   requested dtype, shape-checked (errors name the tensor and the file).
///
/// The source carries the device because a [`QuantizedWeight`] lives on one (a
/// `GgufModel` alone has none).
///
/// ```
/// use candle_core::{DType, Device};
/// use lorakit::gguf::{GgufModel, GgufTensors};
/// use lorakit::model::QuantizedSource;
/// # fn main() -> lorakit::Result<()> {
/// let tensors = GgufTensors::new(GgufModel::open("tests/fixtures/gguf/model_mistral.gguf")?, &Device::Cpu);
/// let q = tensors.weight("model.layers.0.self_attn.q_proj")?.unwrap(); // stored Q8_0
/// assert_eq!((q.d_out(), q.d_in()), (48, 32));
/// assert!(tensors.weight("model.layers.0.self_attn.v_proj")?.is_none()); // stored f32
/// let vb = tensors.var_builder(DType::F32);
/// assert_eq!(vb.get((32, 48), "model.layers.0.self_attn.o_proj.weight")?.dims(), [32, 48]);
/// assert!(vb.get((48, 32), "model.layers.0.self_attn.o_proj.weight").is_err()); // wrong shape
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct GgufTensors {
    model: Arc<GgufModel>,
    device: Device,
}

impl GgufTensors {
    /// The tensors of `model`, read on `device`.
    pub fn new(model: GgufModel, device: &Device) -> Self {
        Self {
            model: Arc::new(model),
            device: device.clone(),
        }
    }

    /// The opened file.
    pub fn model(&self) -> &GgufModel {
        &self.model
    }

    /// A `VarBuilder` over every tensor with a Hugging Face name, dequantized to `dtype` on
    /// the device.
    pub fn var_builder(&self, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, self.device.clone())
    }

    /// The GGML type the tensor transformers calls `hf_name` is stored in, if the file has
    /// it.
    fn stored_type(&self, hf_name: &str) -> Option<GgmlDType> {
        let name = gguf_tensor(hf_name)?;
        self.model
            .content()
            .tensor_infos
            .get(&name)
            .map(|t| t.ggml_dtype)
    }
}

impl QuantizedSource for GgufTensors {
    fn weight(&self, path: &str) -> Result<Option<QuantizedWeight>> {
        let name = format!("{path}.weight");
        match self.stored_type(&name) {
            None | Some(GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => Ok(None),
            Some(_) => {
                let q = self.model.qtensor(&name, &self.device)?;
                QuantizedWeight::from_qtensor(path, q).map(Some)
            }
        }
    }
}

impl SimpleBackend for GgufTensors {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        check_shape(t, shape, name, self.model.path())
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let q = self
            .model
            .qtensor(name, dev)
            .map_err(candle_core::Error::wrap)?;
        q.dequantize(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.stored_type(name).is_some()
    }
}

impl LlamaForCausalLM {
    /// Reads a llama.cpp GGUF model file (architectures `llama` — Llama, Mistral —,
    /// `qwen2`, `qwen3`; see [`GgufModel::config`] for what is refused): the config from
    /// its metadata, every linear weight stored quantized kept as the file's blocks, every
    /// other tensor (embedding, norms, float-stored weights, biases) dequantized to `dtype`
    /// on `device`. Adapters come from `plan` under Hugging Face's module names, so a PEFT
    /// adapter trained on the Hugging Face model applies.
    ///
    /// Quantization: with no [`AdapterPlan::with_quantize`] settings, float-stored linears
    /// stay float ([`Quantize::stored_only`]); with them, the file's quantized weights still
    /// come from the file (except for modules in the skip list, dequantized: by default
    /// `lm_head`) and float-stored linears are quantized to their dtype. Call
    /// `plan.finish()` afterwards as with [`LlamaForCausalLM::load`].
    ///
    /// Errors: a missing file, a file that is not a GGUF model (a llama.cpp LoRA adapter
    /// included), an unsupported architecture or option, a missing tensor or one whose
    /// shape disagrees with the config (naming the tensor and the file).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dev = Device::Cpu;
    /// // The PEFT LoRA trained on the Hugging Face model, over its GGUF conversion
    /// // (attn_q stored Q8_0; scripts/make_gguf_fixtures.py).
    /// let plan = PeftAdapter::load("tests/fixtures/models/llama/mistral/lora", &dev)?.plan()?;
    /// let model = LlamaForCausalLM::from_gguf("tests/fixtures/gguf/model_mistral.gguf", DType::F32, &dev, &plan)?;
    /// let layers = plan.finish()?;
    /// let q = layers.get("model.layers.0.self_attn.q_proj").unwrap();
    /// assert!(q.read().base().is_quantized()); // the file's Q8_0 blocks
    /// let v = layers.get("model.layers.0.self_attn.v_proj").unwrap();
    /// assert!(!v.read().base().is_quantized()); // stored f32
    /// let logits = model.forward(&Tensor::new(&[[1u32, 17, 42]], &dev)?)?;
    /// assert_eq!(logits.dims(), [1, 3, 64]);
    /// # Ok(()) }
    /// ```
    pub fn from_gguf(
        path: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let model = GgufModel::open(path)?;
        let config = model.config()?;
        let tensors = GgufTensors::new(model, device);
        let quantize = match plan.quantize() {
            Some(q) => q.clone().with_source(tensors.clone()),
            None => Quantize::stored_only(tensors.clone()),
        };
        // Clones share the plan's adapted set: the caller's `plan.finish()` sees the layers.
        let plan = plan.clone().with_quantize(quantize);
        Self::load(&config, tensors.var_builder(dtype), &plan)
    }
}
