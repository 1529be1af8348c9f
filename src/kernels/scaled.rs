//! VeRA's product, `y = x Wᵀ + b + out ⊙ ((mid ⊙ (x Aᵀ)) Bᵀ)`, with `W`, `A`, `B` frozen
//! and the vectors `mid` (`λ_d`, length `r`) and `out` (`λ_b`, length `d_out`) trainable.
//!
//! [`ScaledLowRankLinear::forward`] runs it as one fused op on the CPU (f32/f64; f16/bf16
//! computed in f32): the backward computes the vectors' gradients from the forward's saved
//! `x Aᵀ` and `(mid ⊙ x Aᵀ) Bᵀ` without forming a gradient for `A` or `B`, three GEMMs
//! where the generic [`super::FusedLinear`] (with `B_eff = diag(out) B diag(mid)`) needs four.
//! On CUDA (feature `cuda`) the same op runs through cuBLAS and small kernels
//! (`kernels::cuda`). Other devices take [`ScaledLowRankLinear::forward_composed`].

use candle_core::{DType, Tensor};

use super::saved_op::SavedOp;
use super::scaled_op::ScaledLowRankOp;
use super::{compute_dtype, LowRankTerm, Product, WeightRef};
use crate::error::Result;

/// One vector-scaled low-rank linear product (see the module docs).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use lorakit::kernels::ScaledLowRankLinear;
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let w = Tensor::randn(0f32, 1., (6, 4), &dev)?; // frozen (d_out, d_in)
/// let a = Tensor::randn(0f32, 1., (3, 4), &dev)?; // frozen (r, d_in)
/// let b = Tensor::randn(0f32, 1., (6, 3), &dev)?; // frozen (d_out, r)
/// let mid = Var::randn(0f32, 1., 3, &dev)?; // λ_d
/// let out = Var::randn(0f32, 1., 6, &dev)?; // λ_b
/// let layer = ScaledLowRankLinear {
///     weight: &w,
///     bias: None,
///     a: &a,
///     b: &b,
///     mid: mid.as_tensor(),
///     out: out.as_tensor(),
/// };
/// let x = Tensor::randn(0f32, 1., (2, 4), &dev)?;
/// let y = layer.forward(&x)?;
/// let diff = (&y - layer.forward_composed(&x)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-4);
/// let grads = y.sum_all()?.backward()?;
/// assert!(grads.get(mid.as_tensor()).is_some() && grads.get(&a).is_none());
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ScaledLowRankLinear<'a> {
    /// Frozen `W`, `(d_out, d_in)`.
    pub weight: &'a Tensor,
    /// Frozen bias, `(d_out,)`.
    pub bias: Option<&'a Tensor>,
    /// Frozen `A`, `(r, d_in)`; a strided view (a slice of a larger matrix) is fine.
    pub a: &'a Tensor,
    /// Frozen `B`, `(d_out, r)`; a strided view is fine.
    pub b: &'a Tensor,
    /// `mid` (`λ_d`), `(r,)`.
    pub mid: &'a Tensor,
    /// `out` (`λ_b`), `(d_out,)`.
    pub out: &'a Tensor,
}

impl ScaledLowRankLinear<'_> {
    /// Runs the product: the fused op on the CPU, the composed path elsewhere.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_over(WeightRef::Float(self.weight), x)
    }

    /// [`ScaledLowRankLinear::forward`] with `weight` standing for `W` (a quantized base's
    /// blocks; `self.weight` is then only its shape).
    pub(crate) fn forward_over(&self, weight: WeightRef<'_>, x: &Tensor) -> Result<Tensor> {
        if let Some(bias) = self.bias.filter(|b| b.track_op()) {
            let y = ScaledLowRankLinear {
                bias: None,
                ..*self
            }
            .forward_over(weight, x)?;
            return super::add_trainable_bias(&y, bias);
        }
        let dtype = x.dtype();
        let compute = compute_dtype(dtype, x.device());
        let on_cpu = x.device().is_cpu() && matches!(compute, DType::F32 | DType::F64);
        #[cfg(feature = "cuda")]
        let on_cuda = super::cuda::supported(x) && matches!(weight, WeightRef::Float(_));
        #[cfg(not(feature = "cuda"))]
        let on_cuda = false;
        if !on_cpu && !on_cuda {
            return self.composed_over(weight, x);
        }
        // The CUDA kernels take contiguous operands.
        let cast = |t: &Tensor| {
            let t = t.to_dtype(compute)?;
            if on_cuda {
                t.contiguous()
            } else {
                Ok(t)
            }
        };
        let (x, mid, out) = (cast(x)?, cast(self.mid)?, cast(self.out)?);
        let trains = [&x, &mid, &out].iter().any(|t| t.track_op());
        let op = SavedOp::new(ScaledLowRankOp {
            weight: weight.to_op(compute, on_cuda)?,
            bias: self.bias.map(cast).transpose()?,
            a: cast(self.a)?,
            b: cast(self.b)?,
            trains,
        });
        let y = x.apply_op3(&mid, &out, op)?;
        Ok(y.to_dtype(dtype)?)
    }

    /// The reference: [`super::FusedLinear::forward_composed`] with `B_eff = diag(out) B diag(mid)`.
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        self.composed_over(WeightRef::Float(self.weight), x)
    }

    /// [`ScaledLowRankLinear::forward_composed`] over `weight`.
    pub(crate) fn composed_over(&self, weight: WeightRef<'_>, x: &Tensor) -> Result<Tensor> {
        let b_eff = self.effective_b()?;
        Product {
            weight,
            bias: self.bias,
            low_rank: Some(LowRankTerm {
                a: self.a,
                b: &b_eff,
                scale: 1.0,
            }),
            row_scale: None,
        }
        .forward_composed(x)
    }

    /// `B_eff = diag(out) B diag(mid)`, `(d_out, r)`, carrying the vectors' gradients.
    pub fn effective_b(&self) -> Result<Tensor> {
        let out = self.out.unsqueeze(1)?;
        let mid = self.mid.unsqueeze(0)?;
        Ok(self.b.broadcast_mul(&out)?.broadcast_mul(&mid)?)
    }
}
