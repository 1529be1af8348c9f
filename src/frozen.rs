//! [`FrozenLinear`]: the base layer every adapter wraps.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
pub(crate) use crate::kernels::{flatten_rows, unflatten_rows};
use crate::kernels::{Product, WeightRef};
use crate::quant::{QuantFormat, QuantizedWeight};
use crate::validate;

/// A linear layer `y = x Wᵀ + b` whose weight `W` (`d_out × d_in`, candle's layout) and
/// optional bias `b` (`d_out`) are constants: never `Var`s, never trained, never given a
/// gradient by lorakit's fused kernel.
///
/// Tensors passed in that happen to be variables are detached, so an optimizer built
/// from a `VarMap` never touches them.
///
/// ```
/// use candle_core::{Device, Tensor, Module};
/// use lorakit::FrozenLinear;
/// # fn main() -> lorakit::Result<()> {
/// let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu)?;
/// let base = FrozenLinear::new(w, None)?;
/// let y = base.forward(&Tensor::new(&[[10f32, 100.]], &Device::Cpu)?)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[210.0, 430.0, 650.0]]);
/// # Ok(()) }
/// ```
///
/// The weight may be quantized (QLoRA-style training, see [`crate::quant`]):
/// [`FrozenLinear::quantize`] and [`FrozenLinear::from_quantized`] build such a base, which
/// every variant but Delta-LoRA trains over without a float copy of `W`.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    /// `(d_out, d_in)`; for a module stored `(d_in, d_out)` a transposed view of it. For a
    /// quantized base, a placeholder of that shape without storage (see
    /// [`FrozenLinear::weight`]).
    weight: Tensor,
    bias: Option<Tensor>,
    kind: BaseKind,
    /// The quantized weight, when the base is quantized.
    quantized: Option<QuantizedWeight>,
    /// The dtype the weight is kept in outside this module's computation, when that is
    /// not `weight`'s: a bf16 checkpoint's module that `lorakit merge` computes in f32.
    /// A weight that replaces the stored one is rounded to it first
    /// ([`FrozenLinear::with_stored_weight`]).
    at_rest_dtype: Option<DType>,
}

/// What kind of module a [`FrozenLinear`] is: how its weight is stored and what its input is.
///
/// Every kind is the linear map `x Wᵀ + b` with `W` seen as `(d_out, d_in)`; they differ in
/// the stored layout (which merges write back) and the input:
///
/// | kind | stored weight | input |
/// |---|---|---|
/// | `Linear` (`nn.Linear`, `candle_nn::Linear`) | `(d_out, d_in)` | floats `[.., d_in]` |
/// | `Conv1D` (GPT-2's, PEFT's `fan_in_fan_out`) | `(d_in, d_out)` | floats `[.., d_in]` |
/// | `Embedding` (`nn.Embedding`, `candle_nn::Embedding`) | `(vocab, dim)`, so `d_in = vocab`, `d_out = dim` | token ids, any shape |
///
/// An embedding is the linear map of one-hot ids: its lookup `E[ids]` is `onehot(ids) E`, so
/// the same `W = Eᵀ` and the same ΔW as a linear layer describe it (PEFT's embedding merge
/// `E += s (B A)ᵀ` is ΔW in the stored layout).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BaseKind {
    /// A linear layer, weight stored `(d_out, d_in)`.
    #[default]
    Linear,
    /// GPT-2's `Conv1D`, weight stored `(d_in, d_out)`.
    Conv1D,
    /// An embedding table `(vocab, dim)`, input token ids.
    Embedding,
}

impl BaseKind {
    /// Whether the weight is stored `(d_in, d_out)` (Conv1D, embeddings).
    pub fn stores_in_out(self) -> bool {
        !matches!(self, BaseKind::Linear)
    }

    /// A name for messages (`linear`, `Conv1D`, `embedding`).
    pub fn name(self) -> &'static str {
        match self {
            BaseKind::Linear => "linear",
            BaseKind::Conv1D => "Conv1D",
            BaseKind::Embedding => "embedding",
        }
    }
}

impl FrozenLinear {
    /// Builds from a weight `(d_out, d_in)` and an optional bias `(d_out,)` of the same
    /// dtype and device. The weight must be a float tensor with `d_out, d_in ≥ 1`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let &[d_out, _] = weight.dims() else {
            return Err(Error::ShapeMismatch {
                layer: "base".to_string(),
                what: "weight".to_string(),
                expected: "[d_out, d_in]".to_string(),
                got: format!("{:?}", weight.dims()),
            });
        };
        validate::nonzero_dims("base", "weight", &weight)?;
        validate::float_dtype("base", "weight", &weight)?;
        if let Some(b) = &bias {
            validate::shape("base", "bias", b, &[d_out])?;
            validate::dtype_device("base", "bias", b, weight.dtype(), weight.device())?;
        }
        Ok(Self {
            weight: weight.detach(),
            bias: bias.map(|b| b.detach()),
            kind: BaseKind::Linear,
            quantized: None,
            at_rest_dtype: None,
        })
    }

    /// The same module with its weight quantized to `to`: a GGML type (Q8_0, Q4_K, Q5_K,
    /// Q6_K, …: see [`crate::quant::QUANTIZE_TYPES`]) or a bitsandbytes 4-bit code book
    /// ([`crate::quant::Bnb4Type`], as bitsandbytes quantizes: blocks of 64, no double
    /// quantization; see [`QuantizedWeight::quantize`]); the float weight is dropped (memory is freed once
    /// no other tensor shares it). The layer keeps its dtype (that of its inputs, outputs
    /// and bias). `layer` names the layer in errors: a `d_in` that is not a multiple of
    /// the type's block size (32, or 256 for the k-quants) is refused, as is an embedding.
    ///
    /// ```
    /// use candle_core::{quantized::GgmlDType, Device, Module, Tensor};
    /// use lorakit::FrozenLinear;
    /// # fn main() -> lorakit::Result<()> {
    /// let dev = Device::Cpu;
    /// let w = Tensor::randn(0f32, 1., (8, 256), &dev)?;
    /// let base = FrozenLinear::new(w, None)?.quantize("proj", GgmlDType::Q4K)?;
    /// assert!(base.is_quantized());
    /// let x = Tensor::randn(0f32, 1., (3, 256), &dev)?;
    /// // Exactly the product with the dequantized weight.
    /// let reference = x.matmul(&base.dequantized_weight()?.t()?)?;
    /// let diff = (base.forward(&x)? - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(diff < 1e-3);
    /// # Ok(()) }
    /// ```
    pub fn quantize(self, layer: &str, to: impl Into<QuantFormat>) -> Result<Self> {
        if self.kind == BaseKind::Embedding {
            return Err(Error::layer_config(
                layer,
                "quantize",
                "an embedding is not quantized (only linear and Conv1D bases are)",
            ));
        }
        let q = QuantizedWeight::quantize(layer, &self.dequantized_weight()?, to)?;
        Ok(Self {
            weight: placeholder(q.d_out(), q.d_in(), self.dtype(), self.device())?,
            quantized: Some(q),
            ..self
        })
    }

    /// A linear base over an already-quantized weight `(d_out, d_in)` (a GGUF file's, as
    /// stored), computing in `dtype` (its inputs', outputs' and bias's dtype), with an
    /// optional bias `(d_out,)`.
    pub fn from_quantized(
        weight: QuantizedWeight,
        bias: Option<Tensor>,
        dtype: DType,
    ) -> Result<Self> {
        let device = weight.device();
        let base = Self::new(
            placeholder(weight.d_out(), weight.d_in(), dtype, &device)?,
            bias,
        )?;
        Ok(Self {
            quantized: Some(weight),
            ..base
        })
    }

    /// The quantized weight, for a quantized base.
    pub fn quantized(&self) -> Option<&QuantizedWeight> {
        self.quantized.as_ref()
    }

    /// Whether the weight is quantized.
    pub fn is_quantized(&self) -> bool {
        self.quantized.is_some()
    }

    /// The frozen weight as the kernels take it.
    pub(crate) fn weight_ref(&self) -> WeightRef<'_> {
        match &self.quantized {
            Some(q) => WeightRef::Quantized(q),
            None => WeightRef::Float(&self.weight),
        }
    }

    /// The float weight `(d_out, d_in)`, or an error naming `layer` and `operation` when the
    /// base is quantized (an operation that needs to read or update `W` in float).
    pub fn float_weight(&self, layer: &str, operation: &str) -> Result<&Tensor> {
        match &self.quantized {
            Some(q) => Err(Error::usage(
                crate::Scope::Layer(layer.to_string()),
                format!(
                    "{operation} needs a float base weight, but this base is quantized \
                     ({}); build the layer over a float base",
                    q.format()
                ),
            )),
            None => Ok(&self.weight),
        }
    }

    /// The weight `(d_out, d_in)` in the layer's dtype: the float weight itself, or the
    /// whole quantized weight dequantized (a full float copy, made on purpose: merges into
    /// a float checkpoint).
    pub fn dequantized_weight(&self) -> Result<Tensor> {
        match &self.quantized {
            Some(q) => Ok(q.dequantize()?.to_dtype(self.dtype())?),
            None => Ok(self.weight.clone()),
        }
    }

    /// Builds from a weight stored `(d_in, d_out)`, as GPT-2's `Conv1D` stores it (PEFT's
    /// `fan_in_fan_out`), and an optional bias `(d_out,)`. No transposed copy is made: the
    /// layer computes with a transposed view, and merges write the weight back in this layout
    /// ([`FrozenLinear::stored_weight`]).
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Module};
    /// use lorakit::{BaseKind, FrozenLinear};
    /// # fn main() -> lorakit::Result<()> {
    /// let w_in_out = Tensor::new(&[[1f32, 3., 5.], [2., 4., 6.]], &Device::Cpu)?; // (2 in, 3 out)
    /// let base = FrozenLinear::conv1d(w_in_out.clone(), None)?;
    /// assert_eq!((base.d_in(), base.d_out(), base.kind()), (2, 3, BaseKind::Conv1D));
    /// let y = base.forward(&Tensor::new(&[[10f32, 100.]], &Device::Cpu)?)?;
    /// assert_eq!(y.to_vec2::<f32>()?, [[210.0, 430.0, 650.0]]);
    /// assert_eq!(base.stored_weight()?.to_vec2::<f32>()?, w_in_out.to_vec2::<f32>()?);
    /// # Ok(()) }
    /// ```
    pub fn conv1d(weight_in_out: Tensor, bias: Option<Tensor>) -> Result<Self> {
        check_2d("Conv1D weight, stored (in, out)", &weight_in_out)?;
        let layer = Self::new(weight_in_out.t()?, bias)?;
        Ok(Self {
            kind: BaseKind::Conv1D,
            ..layer
        })
    }

    /// Builds from an embedding table `(vocab, dim)`: a frozen [`BaseKind::Embedding`] whose
    /// forward looks up token ids (`d_in = vocab`, `d_out = dim`).
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Module};
    /// use lorakit::FrozenLinear;
    /// # fn main() -> lorakit::Result<()> {
    /// let table = Tensor::new(&[[0f32, 1.], [10., 11.], [20., 21.]], &Device::Cpu)?;
    /// let emb = FrozenLinear::embedding(table)?;
    /// let ids = Tensor::new(&[[2u32, 0]], &Device::Cpu)?;
    /// assert_eq!(emb.forward(&ids)?.to_vec3::<f32>()?, [[[20.0, 21.0], [0.0, 1.0]]]);
    /// # Ok(()) }
    /// ```
    pub fn embedding(table: Tensor) -> Result<Self> {
        check_2d("embedding weight (vocab, dim)", &table)?;
        let layer = Self::new(table.contiguous()?.t()?, None)?;
        Ok(Self {
            kind: BaseKind::Embedding,
            ..layer
        })
    }

    /// Wraps a `candle_nn::Embedding` (its table is shared, not copied).
    pub fn from_embedding(embedding: &candle_nn::Embedding) -> Result<Self> {
        Self::embedding(embedding.embeddings().clone())
    }

    /// Wraps a `candle_nn::Linear` (its weight and bias are shared, not copied).
    pub fn from_linear(linear: &candle_nn::Linear) -> Result<Self> {
        Self::new(linear.weight().clone(), linear.bias().cloned())
    }

    /// Loads `weight` (and `bias` when `with_bias`) at the VarBuilder's path, with the
    /// same names and shapes as `candle_nn::linear` / `candle_nn::linear_no_bias`.
    pub fn from_var_builder(
        d_in: usize,
        d_out: usize,
        with_bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get((d_out, d_in), "weight")?;
        let bias = if with_bias {
            Some(vb.get(d_out, "bias")?)
        } else {
            None
        };
        Self::new(weight, bias)
    }

    /// Loads a GPT-2 `Conv1D`: `weight` stored `(d_in, d_out)` (and `bias` when
    /// `with_bias`) at the VarBuilder's path.
    pub fn conv1d_from_var_builder(
        d_in: usize,
        d_out: usize,
        with_bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get((d_in, d_out), "weight")?;
        let bias = if with_bias {
            Some(vb.get(d_out, "bias")?)
        } else {
            None
        };
        Self::conv1d(weight, bias)
    }

    /// Loads an embedding table `weight` `(vocab, dim)` at the VarBuilder's path, as
    /// `candle_nn::embedding` does.
    pub fn embedding_from_var_builder(vocab: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::embedding(vb.get((vocab, dim), "weight")?)
    }

    /// The same module with `bias` made trainable (PEFT's `bias = "lora_only"` / `"all"`):
    /// the layer's forward adds it after the frozen product, so gradients reach it. It must
    /// have shape `(d_out,)` and the weight's dtype and device.
    pub fn with_trainable_bias(self, bias: &Var) -> Result<Self> {
        validate::shape("base", "bias", bias.as_tensor(), &[self.d_out()])?;
        validate::dtype_device(
            "base",
            "bias",
            bias.as_tensor(),
            self.dtype(),
            self.device(),
        )?;
        Ok(Self {
            bias: Some(bias.as_tensor().clone()),
            ..self
        })
    }

    /// The bias as a variable, when it was made trainable by
    /// [`FrozenLinear::with_trainable_bias`].
    pub fn trainable_bias(&self) -> Option<Var> {
        let b = self.bias.as_ref().filter(|b| b.is_variable())?;
        Var::from_tensor(b).ok()
    }

    /// A module of `kind` from its weight in the stored layout and its bias.
    pub fn from_stored(kind: BaseKind, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        match kind {
            BaseKind::Linear => Self::new(weight, bias),
            BaseKind::Conv1D => Self::conv1d(weight, bias),
            BaseKind::Embedding => {
                if bias.is_some() {
                    return Err(crate::Error::layer_config(
                        "base",
                        "bias",
                        "an embedding has no bias",
                    ));
                }
                Self::embedding(weight)
            }
        }
    }

    /// The same module, its weight kept in `dtype` outside its computation (a checkpoint's
    /// bf16 weight computed in f32): a weight that later replaces the stored one is rounded
    /// to `dtype` first, as a model holding its weights in `dtype` (PEFT's, loaded in the
    /// checkpoint's dtype) rounds it.
    pub(crate) fn kept_in(self, dtype: DType) -> Self {
        Self {
            at_rest_dtype: Some(dtype),
            ..self
        }
    }

    /// `t` rounded to the dtype the module keeps its weight in ([`FrozenLinear::kept_in`];
    /// `t` itself without one), in `t`'s dtype.
    pub(crate) fn rounded_as_kept(&self, t: &Tensor) -> Result<Tensor> {
        match self.at_rest_dtype {
            Some(at_rest) if at_rest != t.dtype() => {
                Ok(t.to_dtype(at_rest)?.to_dtype(t.dtype())?)
            }
            _ => Ok(t.clone()),
        }
    }

    /// The same module with its weight replaced by `stored` (in the stored layout, same
    /// shape; PEFT's `base_layer.weight` copy in an adapter file, PiSSA's residual),
    /// rounded to the dtype the module keeps its weight in ([`FrozenLinear::kept_in`]),
    /// then converted to the module's dtype and device.
    pub(crate) fn with_stored_weight(self, layer: &str, stored: &Tensor) -> Result<Self> {
        let dims = if self.kind.stores_in_out() {
            [self.d_in(), self.d_out()]
        } else {
            [self.d_out(), self.d_in()]
        };
        validate::shape(layer, "base_layer.weight", stored, &dims)?;
        let stored = self.rounded_as_kept(stored)?;
        let stored = stored.to_dtype(self.dtype())?.to_device(self.device())?;
        let replaced = Self::from_stored(self.kind, stored, None)?;
        Ok(Self {
            bias: self.bias,
            at_rest_dtype: self.at_rest_dtype,
            ..replaced
        })
    }

    /// The same module with its bias replaced by the constant `bias` (`(d_out,)`).
    pub(crate) fn with_frozen_bias(self, layer: &str, bias: &Tensor) -> Result<Self> {
        validate::shape(layer, "bias", bias, &[self.d_out()])?;
        let bias = bias.to_dtype(self.dtype())?.to_device(self.device())?;
        Ok(Self {
            bias: Some(bias.detach()),
            ..self
        })
    }

    /// What kind of module this is (its stored layout and input).
    pub fn kind(&self) -> BaseKind {
        self.kind
    }

    /// The frozen weight, `(d_out, d_in)` (for a module stored `(d_in, d_out)`, a
    /// transposed view of the stored tensor).
    ///
    /// For a quantized base this is a placeholder of the weight's shape, dtype and device
    /// with no storage, every element NaN (so that a computation that reads it by mistake
    /// shows): read [`FrozenLinear::quantized`], [`FrozenLinear::dequantized_weight`] or
    /// [`FrozenLinear::float_weight`] instead.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The weight in its stored layout: `(d_out, d_in)` for [`BaseKind::Linear`],
    /// `(d_in, d_out)` for Conv1D and embeddings (what a checkpoint holds). A quantized
    /// base's weight is dequantized (a full float copy, see
    /// [`FrozenLinear::dequantized_weight`]).
    pub fn stored_weight(&self) -> Result<Tensor> {
        let weight = self.dequantized_weight()?;
        if self.kind.stores_in_out() {
            Ok(weight.t()?)
        } else {
            Ok(weight)
        }
    }

    /// The frozen bias, `(d_out,)`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Input features.
    pub fn d_in(&self) -> usize {
        // The weight is 2-D by construction.
        self.weight.dims().get(1).copied().unwrap_or(0)
    }

    /// Output features.
    pub fn d_out(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }

    /// The weight's dtype (the layer's dtype).
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// The device the weight lives on.
    pub fn device(&self) -> &Device {
        self.weight.device()
    }

    /// Number of scalars in weight and bias.
    pub fn num_params(&self) -> usize {
        self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }

    /// Replaces the weight by another of the same shape, dtype and device (merges,
    /// Delta-LoRA updates). Crate-internal: users see a frozen layer.
    /// A module stored `(d_in, d_out)` keeps that layout: the new weight is stored
    /// transposed (one copy per merge, none per forward).
    /// A quantized base becomes a float one (a merge into a dequantized weight).
    pub(crate) fn replace_weight(&mut self, layer: &str, weight: Tensor) -> Result<()> {
        validate::shape(layer, "weight", &weight, self.weight.dims())?;
        validate::dtype_device(layer, "weight", &weight, self.dtype(), self.device())?;
        self.quantized = None;
        let weight = weight.detach();
        self.weight = if self.kind.stores_in_out() && !weight.t()?.is_contiguous() {
            weight.t()?.contiguous()?.t()?
        } else {
            weight
        };
        Ok(())
    }

    /// Adds `delta` (`(d_out,)`) to the bias (a merged `lora_B.bias`); a trainable bias is
    /// updated in place. Errors when the module has no bias.
    pub(crate) fn add_to_bias(&mut self, layer: &str, delta: &Tensor) -> Result<()> {
        let Some(b) = &self.bias else {
            return Err(no_bias_to_merge(layer));
        };
        let updated = (b + delta.to_dtype(b.dtype())?)?;
        match self.trainable_bias() {
            Some(var) => var.set(&updated)?,
            None => self.bias = Some(updated.detach()),
        }
        Ok(())
    }

    /// The forward with its input checked: floats `[.., d_in]` for linear kinds, integer
    /// token ids below `vocab` of any shape for an embedding.
    pub fn forward_checked(&self, layer: &str, x: &Tensor) -> Result<Tensor> {
        self.check_input(layer, x)?;
        Ok(self.forward(x)?)
    }

    /// Checks a forward input (see [`FrozenLinear::forward_checked`]).
    pub fn check_input(&self, layer: &str, x: &Tensor) -> Result<()> {
        match self.kind {
            BaseKind::Embedding => validate::token_ids(layer, x, self.d_in(), self.device()),
            _ => validate::linear_input(layer, x, self.d_in(), self.dtype(), self.device()),
        }
    }
}

impl Module for FrozenLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // A quantized base, and a float one on the CPU in f32/f64, run the adapters' fused
        // kernel without a low-rank term: the same GEMM routes (the decode kernel for a few
        // rows included), so an adapter at init equals its base bit for bit.
        let fused_float = self.kind != BaseKind::Embedding
            && x.device().is_cpu()
            && x.dtype() == self.weight.dtype()
            && matches!(x.dtype(), DType::F32 | DType::F64);
        if self.quantized.is_some() || fused_float {
            let product = Product {
                weight: self.weight_ref(),
                bias: self.bias.as_ref(),
                low_rank: None,
                row_scale: None,
            };
            return product.forward(x).map_err(candle_core::Error::wrap);
        }
        plain_forward(self.kind, &self.weight, self.bias.as_ref(), x)
    }
}

/// A `(d_out, d_in)` tensor of `dtype` on `device` without storage (one NaN broadcast):
/// the shape-carrying stand-in for a quantized weight.
fn placeholder(d_out: usize, d_in: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let nan = Tensor::new(f32::NAN, device)?.to_dtype(dtype)?;
    Ok(nan.broadcast_as((d_out, d_in))?)
}

/// A weight given in a stored layout must be 2-D before it is transposed.
fn check_2d(what: &str, weight: &Tensor) -> Result<()> {
    if weight.rank() != 2 {
        return Err(crate::Error::ShapeMismatch {
            layer: "base".to_string(),
            what: what.to_string(),
            expected: "a 2-D tensor".to_string(),
            got: format!("{:?}", weight.dims()),
        });
    }
    Ok(())
}

/// The error for a bias delta (`lora_B.bias`) on a base layer without a bias.
pub(crate) fn no_bias_to_merge(layer: &str) -> crate::Error {
    crate::Error::layer_config(
        layer,
        "lora_bias",
        "the adapter has a bias (`lora_B.bias`) but the base layer has none, so it cannot be \
         merged (PEFT refuses this merge too)",
    )
}

/// `x Wᵀ + b` for a module of `kind` with weight `weight` seen `(d_out, d_in)` (a lookup of
/// `Wᵀ`'s rows for an embedding), with candle ops: gradients reach whichever of `weight`
/// and `bias` are variables.
pub(crate) fn plain_forward(
    kind: BaseKind,
    weight: &Tensor,
    bias: Option<&Tensor>,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    if kind == BaseKind::Embedding {
        return lookup_rows(&weight.t()?, x);
    }
    let (x2, lead) = flatten_rows(x)?;
    let y = crate::matmul::matmul(&x2, &weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    unflatten_rows(&y, &lead)
}

/// The rows of `table` (`(vocab, dim)`) at `ids` (any shape): `[ids.., dim]`. Ids are
/// read as u32 (candle's `index_select` takes the id dtype's largest value as padding, so a
/// u8 id 255 would read zeros).
pub(crate) fn lookup_rows(table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
    let rows = table.index_select(&flat, 0)?;
    let mut dims = ids.dims().to_vec();
    dims.push(table.dim(1)?);
    rows.reshape(dims)
}
