//! The frozen weight a product runs over: a float tensor or a [`QuantizedWeight`].

use candle_core::{DType, Tensor, WithDType};

use super::cpu::{mat_of_layout, with_slice, WeightMat};
use crate::quant::QuantizedWeight;

/// A borrowed frozen weight `W`, `(d_out, d_in)`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WeightRef<'a> {
    /// A float weight (any strides).
    Float(&'a Tensor),
    /// Quantized blocks.
    Quantized(&'a QuantizedWeight),
}

impl WeightRef<'_> {
    /// `(d_out, d_in)`.
    pub(crate) fn dims(&self) -> Vec<usize> {
        match self {
            WeightRef::Float(w) => w.dims().to_vec(),
            WeightRef::Quantized(q) => vec![q.d_out(), q.d_in()],
        }
    }

    /// `(d_out, d_in)`, or an error for a float weight that is not 2-D.
    pub(crate) fn dims2(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            WeightRef::Float(w) => w.dims2(),
            WeightRef::Quantized(q) => Ok((q.d_out(), q.d_in())),
        }
    }

    /// The weight as a float tensor in `dtype`: a cast of a float weight, the whole
    /// dequantized weight for a quantized one (the composed path on devices without the
    /// tiled CPU product).
    pub(crate) fn float(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            WeightRef::Float(w) => w.to_dtype(dtype),
            WeightRef::Quantized(q) => q
                .dequantize_to(&q.device(), dtype)
                .map_err(candle_core::Error::wrap),
        }
    }

    /// The operand a fused op holds: a float weight cast to `dtype` (and made contiguous
    /// with `contiguous`), a quantized one shared as is.
    pub(crate) fn to_op(self, dtype: DType, contiguous: bool) -> candle_core::Result<OpWeight> {
        Ok(match self {
            WeightRef::Float(w) => {
                let w = w.to_dtype(dtype)?;
                OpWeight::Float(if contiguous { w.contiguous()? } else { w })
            }
            WeightRef::Quantized(q) => OpWeight::Quantized(q.clone()),
        })
    }
}

/// The frozen weight held inside a fused op.
#[derive(Clone, Debug)]
pub(crate) enum OpWeight {
    /// A float weight in the op's compute dtype.
    Float(Tensor),
    /// Quantized blocks (CPU).
    Quantized(QuantizedWeight),
}

impl OpWeight {
    /// `(d_out, d_in)`.
    pub(crate) fn dims2(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            OpWeight::Float(w) => w.dims2(),
            OpWeight::Quantized(q) => Ok((q.d_out(), q.d_in())),
        }
    }

    /// Runs `f` with the CPU view of the weight.
    pub(crate) fn with_mat<T: WithDType, R>(
        &self,
        f: impl FnOnce(WeightMat<'_, T>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        match self {
            OpWeight::Float(w) => with_slice(w, |data, layout| {
                f(WeightMat::Dense(mat_of_layout(data, layout)?))
            }),
            OpWeight::Quantized(q) => f(WeightMat::Quantized(q)),
        }
    }

    /// The weight as a float tensor of `like`'s dtype (dequantized whole for a quantized
    /// weight: the composed backward of devices without the tiled product).
    pub(crate) fn float_like(&self, like: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            OpWeight::Float(w) => Ok(w.clone()),
            OpWeight::Quantized(q) => q
                .dequantize_to(like.device(), like.dtype())
                .map_err(candle_core::Error::wrap),
        }
    }
}
