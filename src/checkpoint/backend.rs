//! A candle `VarBuilder` over a [`Checkpoint`]: each tensor is read when the model asks for
//! it (positioned reads, no memory map), optionally transformed (an adapter merged in).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::checkpoint::Checkpoint;
use crate::error::Result;

/// A per-tensor transform applied to each tensor as it is read, on the CPU in the stored
/// dtype (f32 for a tensor dequantized from MXFP4, the quant state's dtype for one
/// dequantized from bitsandbytes 4-bit blocks, f64 in an f64 model; e.g.
/// [`crate::peft::adapted_var_builder`] merges an adapter into the weights it targets).
/// Returns the tensor to hand to the model (cast to its dtype afterwards).
pub type TensorTransform = dyn Fn(&str, Tensor) -> Result<Tensor> + Send + Sync;

/// The `SimpleBackend` behind [`Checkpoint::var_builder`].
pub struct CheckpointBackend {
    ckpt: Arc<Checkpoint>,
    transform: Option<Box<TensorTransform>>,
}

impl std::fmt::Debug for CheckpointBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointBackend")
            .field("checkpoint", &self.ckpt.path())
            .field("transform", &self.transform.is_some())
            .finish()
    }
}

impl CheckpointBackend {
    /// A backend reading `ckpt`, passing every tensor through `transform` if given.
    pub fn new(ckpt: Arc<Checkpoint>, transform: Option<Box<TensorTransform>>) -> Self {
        Self { ckpt, transform }
    }

    /// The `VarBuilder` a candle model is built from.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

/// `t` (the tensor `name` of `file`) if it has the shape a model asked for; an error
/// naming both otherwise (any `SimpleBackend`'s `get`).
pub(crate) fn check_shape(
    t: Tensor,
    expected: Shape,
    name: &str,
    file: &Path,
) -> candle_core::Result<Tensor> {
    if t.shape() != &expected {
        return Err(shape_error(expected, t.shape().clone(), name, file));
    }
    Ok(t)
}

fn shape_error(expected: Shape, got: Shape, name: &str, file: &Path) -> candle_core::Error {
    candle_core::Error::UnexpectedShape {
        msg: format!("shape mismatch for `{name}` in {}", file.display()),
        expected,
        got,
    }
    .bt()
}

impl SimpleBackend for CheckpointBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if self.ckpt.is_bnb4(name) {
            // Refused from the quant state, before dequantizing.
            let (rows, cols) = self
                .ckpt
                .bnb4_params(name)
                .map_err(candle_core::Error::wrap)?
                .shape;
            if [rows, cols] != shape.dims() {
                return Err(shape_error(
                    shape,
                    (rows, cols).into(),
                    name,
                    self.ckpt.path(),
                ));
            }
        }
        if self.ckpt.is_mxfp4(name) {
            // Refused from the headers, before dequantizing gigabytes of experts.
            let packed = self
                .ckpt
                .mxfp4_shape(name)
                .map_err(candle_core::Error::wrap)?;
            if packed != shape.dims() {
                return Err(shape_error(shape, packed.into(), name, self.ckpt.path()));
            }
        }
        let t = self.get_unchecked(name, dtype, dev)?;
        check_shape(t, shape, name, self.ckpt.path())
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = if self.ckpt.is_mxfp4(name) {
            // `X` stored as `X_blocks` and `X_scales`: dequantized as transformers does, in
            // f32 (f64 for f64) for the transform, then rounded once to `dtype` below.
            let exact = if dtype == DType::F64 {
                dtype
            } else {
                DType::F32
            };
            self.ckpt.load_mxfp4(name, exact, &Device::Cpu)
        } else if self.ckpt.is_bnb4(name) {
            // bitsandbytes 4-bit blocks: their values in the quant state's dtype.
            self.ckpt.load_bnb4_dequantized(name)
        } else {
            self.ckpt.load(name, &Device::Cpu)
        };
        let t = t.map_err(candle_core::Error::wrap)?;
        let t = match &self.transform {
            Some(f) => f(name, t).map_err(candle_core::Error::wrap)?,
            None => t,
        };
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.ckpt.contains(name) || self.ckpt.is_mxfp4(name)
    }
}

impl Checkpoint {
    /// A `VarBuilder` over this checkpoint for any candle model (for example
    /// `candle_transformers::models::llama::Llama::load(vb, &config)`), in `dtype` on
    /// `device`. Tensors are read one at a time as the model asks for them. A tensor `X` the
    /// checkpoint holds MXFP4-packed, as `X_blocks` and `X_scales` (GPT-OSS's experts), is
    /// there too, dequantized as transformers does ([`Checkpoint::load_mxfp4`]); so is a
    /// weight stored as bitsandbytes 4-bit blocks, dequantized as bitsandbytes does
    /// ([`Checkpoint::load_bnb4`]).
    ///
    /// ```no_run
    /// use candle_core::{DType, Device};
    /// use lorakit::checkpoint::Checkpoint;
    /// # fn main() -> lorakit::Result<()> {
    /// let vb = Checkpoint::open("models/TinyLlama")?.var_builder(DType::F32, &Device::Cpu);
    /// let q = vb.get((2048, 2048), "model.layers.0.self_attn.q_proj.weight")?;
    /// # Ok(()) }
    /// ```
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        CheckpointBackend::new(Arc::new(self), None).into_var_builder(dtype, device)
    }
}
