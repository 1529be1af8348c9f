//! [`FrozenLinear`]: the base layer every adapter wraps.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
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
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
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
        })
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

    /// The frozen weight, `(d_out, d_in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
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
    pub(crate) fn replace_weight(&mut self, layer: &str, weight: Tensor) -> Result<()> {
        validate::shape(layer, "weight", &weight, self.weight.dims())?;
        validate::dtype_device(layer, "weight", &weight, self.dtype(), self.device())?;
        self.weight = weight.detach();
        Ok(())
    }

    /// `x Wᵀ + b` for inputs of rank ≥ 1 (last dimension `d_in`).
    pub fn forward_checked(&self, layer: &str, x: &Tensor) -> Result<Tensor> {
        validate::linear_input(layer, x, self.d_in(), self.dtype(), self.device())?;
        Ok(self.forward(x)?)
    }
}

impl Module for FrozenLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (x2, lead) = flatten_rows(x)?;
        let y = x2.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        unflatten_rows(&y, &lead)
    }
}

/// Views `x` (`[.., d]`) as a matrix `(n, d)`; returns it with the leading dims.
pub(crate) fn flatten_rows(x: &Tensor) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let dims = x.dims();
    let lead = dims.split_last().map_or(&[][..], |(_, lead)| lead).to_vec();
    let d = dims.last().copied().unwrap_or(1);
    let n: usize = lead.iter().product();
    Ok((x.reshape((n, d))?, lead))
}

/// Inverse of [`flatten_rows`] for an output `(n, d_out)`.
pub(crate) fn unflatten_rows(y: &Tensor, lead: &[usize]) -> candle_core::Result<Tensor> {
    let mut dims = lead.to_vec();
    dims.push(y.dim(1)?);
    y.reshape(dims)
}
