//! The one hot path every variant shares:
//!
//! ```text
//! y = row_scale ⊙ ( x Wᵀ + s · (x A_effᵀ) B_effᵀ ) + b
//! ```
//!
//! [`FusedLinear`] describes one such product; [`FusedLinear::forward`] runs it through the
//! fastest path the device has, [`FusedLinear::forward_composed`] through plain candle ops
//! (the reference the fused kernels are tested against, and the fallback on devices without
//! a fused kernel).
//!
//! # Paths
//!
//! | device, dtype | [`FusedLinear::forward`] |
//! |---|---|
//! | CPU, f32 / f64 | the fused `CustomOp3` (one output buffer, hand-written backward) |
//! | CPU, f16 / bf16 | the fused op in f32, inputs cast up and the output cast back |
//! | CUDA (feature `cuda`), f32 / f64 / bf16 / f16 | the fused op: cuBLAS forward and backward (f32 accumulation) |
//! | Metal, others | the composed path (candle's own kernels) |
//!
//! The fused op's CPU forward runs the base GEMM (`gemm` crate, onto a bias-prefilled
//! buffer when there is no row scale), accumulates `s · (x Aᵀ) Bᵀ` into the same buffer
//! (`read_dst`), then applies the row scale and bias in one epilogue pass. Its backward
//! computes `dx`, `dA_eff`, `dB_eff` and the row scale's gradient by hand (unsloth's
//! algebra with `g' = c ⊙ g`) and never a gradient for `W`: the frozen weight and bias are
//! held inside the op, not passed as inputs, so backprop cannot reach them. Gradients are
//! only computed for inputs that track one (a constant `x` costs no `dx` GEMM).
//!
//! A quantized frozen base ([`crate::quant`]) runs through the same two ops on the CPU: the
//! base products `x Wᵀ` and `g W` read `W` as row tiles dequantized into one reused f32
//! buffer (about 1 MiB, and at least 256 rows with AVX-512, 128 with AVX2, so that each
//! tile's product is wide enough to run at the float layer's speed), each tile one GEMM
//! into the output (or into `dx`), so no float copy
//! of the whole `W` exists (a forward of at most 4 rows streams `W` one dequantized row per
//! task instead); the results equal those over the dequantized weight. Other
//! devices take the composed path with the whole weight dequantized per call.
//!
//! VeRA's product, whose trainable parts are two vectors around frozen factors
//! (`y = x Wᵀ + b + out ⊙ ((mid ⊙ x Aᵀ) Bᵀ)`), has its own fused CPU op,
//! [`ScaledLowRankLinear`]: it saves `x Aᵀ` and the branch output in the forward and gives
//! the vectors their gradients without a GEMM for `A` or `B`.
//!
//! CUDA (feature `cuda`, module `kernels::cuda`): the forward is fused — three cuBLAS GEMMs into one
//! output buffer (the low-rank one with β = 1) and a small NVRTC-compiled epilogue kernel
//! for the row scale and bias — and so is the backward (`dx` in one buffer, `dA`, `dB` from
//! the kept `x Aᵀ`, the row scale's gradient by a two-pass column sum; no `W` gradient).
//! f32 and f64 run in their own precision; bf16 and f16 are stored in 16 bits with every
//! product accumulated in f32. VeRA's op and a quantized base take the composed path on
//! CUDA. The CUDA code is compile-checked (`scripts/check-cuda.sh`); its tests
//! (`tests/cuda.rs`) have not yet run on a GPU.

mod cpu;
mod cpu_report;
#[cfg(feature = "cuda")]
mod cuda;
pub(crate) mod dropout;
mod fused_op;
mod product;
mod rows;
mod saved_op;
mod scaled;
mod scaled_op;
pub(crate) mod vector_math;
mod weight;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::matmul::matmul;
pub(crate) use cpu::{gemm_with, machine, mat_of_layout, product_into, Accum, Isa, MatRef};
pub use cpu_report::CpuReport;
pub(crate) use product::Product;
pub(crate) use rows::{flatten_rows, unflatten_rows};
pub use scaled::ScaledLowRankLinear;
pub(crate) use weight::WeightRef;

/// The low-rank term `s · (x Aᵀ) Bᵀ`.
#[derive(Clone, Copy, Debug)]
pub struct LowRankTerm<'a> {
    /// `A_eff`, `(r, d_in)`.
    pub a: &'a Tensor,
    /// `B_eff`, `(d_out, r)`.
    pub b: &'a Tensor,
    /// The scale `s`.
    pub scale: f64,
}

/// One adapted linear product. `weight` and `bias` are frozen (they never receive a
/// gradient from the fused kernel); `a`, `b` and `row_scale` may be trainable.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use lorakit::kernels::{FusedLinear, LowRankTerm};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let w = Tensor::randn(0f32, 1., (6, 4), &dev)?; // frozen (d_out, d_in)
/// let a = Var::randn(0f32, 1., (2, 4), &dev)?; // (r, d_in)
/// let b = Var::randn(0f32, 1., (6, 2), &dev)?; // (d_out, r)
/// let layer = FusedLinear {
///     weight: &w,
///     bias: None,
///     low_rank: Some(LowRankTerm { a: a.as_tensor(), b: b.as_tensor(), scale: 0.5 }),
///     row_scale: None,
/// };
/// let x = Tensor::randn(0f32, 1., (2, 3, 4), &dev)?; // any rank, last dim d_in
/// let y = layer.forward(&x)?;
/// let reference = layer.forward_composed(&x)?;
/// let diff = (&y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-4);
/// // Gradients reach A and B, never the frozen W.
/// let grads = y.sum_all()?.backward()?;
/// assert!(grads.get(a.as_tensor()).is_some() && grads.get(&w).is_none());
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct FusedLinear<'a> {
    /// Frozen `W`, `(d_out, d_in)`.
    pub weight: &'a Tensor,
    /// Frozen bias, `(d_out,)`, added after the row scale.
    pub bias: Option<&'a Tensor>,
    /// The low-rank term, if any.
    pub low_rank: Option<LowRankTerm<'a>>,
    /// Per-output scale `(d_out,)` applied to base plus low-rank term (DoRA's `m / ‖W'‖`).
    pub row_scale: Option<&'a Tensor>,
}

impl<'a> FusedLinear<'a> {
    /// The same product over a borrowed float weight.
    fn product(&self) -> Product<'a> {
        Product {
            weight: WeightRef::Float(self.weight),
            bias: self.bias,
            low_rank: self.low_rank,
            row_scale: self.row_scale,
        }
    }

    /// Runs the product on the fastest path available for `x`'s device (see the module
    /// docs): the fused op on the CPU, the composed path elsewhere.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.product().forward(x)
    }

    /// The reference: the same product composed from candle ops. Half-precision inputs are
    /// computed in f32 on the CPU and cast back.
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        self.product().forward_composed(x)
    }
}

/// `y + b` for a bias that tracks gradients, in `y`'s dtype.
pub(crate) fn add_trainable_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(y.broadcast_add(&bias.to_dtype(y.dtype())?)?)
}

/// `s · (x Aᵀ) Bᵀ` alone, composed (the adapter branch when dropout feeds it another input
/// than the base).
pub fn low_rank_only(x: &Tensor, term: &LowRankTerm) -> Result<Tensor> {
    let dtype = x.dtype();
    let compute = compute_dtype(dtype, x.device());
    let (x2, lead) = flatten_rows(x)?;
    let xa = matmul(&x2.to_dtype(compute)?, &term.a.to_dtype(compute)?.t()?)?;
    let low = (matmul(&xa, &term.b.to_dtype(compute)?.t()?)? * term.scale)?;
    Ok(unflatten_rows(&low.to_dtype(dtype)?, &lead)?)
}

/// `w += u · v` in `w`'s own storage when the CPU kernel can (a contiguous f32/f64 `w` on
/// the CPU with `u`, `v` of its dtype): returns `Ok(true)` then, `Ok(false)` without
/// touching `w` otherwise (the caller computes a new tensor instead). Every tensor sharing
/// `w`'s storage sees the change: callers own `w`.
pub(crate) fn add_product_in_place(w: &Tensor, u: &Tensor, v: &Tensor) -> Result<bool> {
    let same_dtype = u.dtype() == w.dtype() && v.dtype() == w.dtype();
    let cpu = w.device().is_cpu() && u.device().is_cpu() && v.device().is_cpu();
    if !(cpu && same_dtype && w.is_contiguous() && matches!(w.dtype(), DType::F32 | DType::F64)) {
        return Ok(false);
    }
    w.inplace_op3(u, v, &cpu::AddProduct)?;
    Ok(true)
}

/// The dtype of a reduction whose result goes to the host (a norm, a count, a score): f64,
/// except on Metal, which has no f64 (candle's Metal backend casts to no f64 dtype), f32.
pub(crate) fn reduction_dtype(device: &Device) -> DType {
    if device.is_metal() {
        DType::F32
    } else {
        DType::F64
    }
}

/// `Σ t²` (a squared norm) on `t`'s device in [`reduction_dtype`], left there as a 0-d
/// tensor: sums over several tensors or calls add up on the device and cross to the host
/// once ([`host_scalar`]; on a GPU each crossing waits for the device).
pub(crate) fn sum_of_squares(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(reduction_dtype(t.device()))?.sqr()?.sum_all()
}

/// Adds `value` to a running `total` kept on the device (`None` until the first value), for
/// sums read once at the end ([`host_scalar`]) instead of after every term.
pub(crate) fn add_to_total(total: &mut Option<Tensor>, value: Tensor) -> candle_core::Result<()> {
    *total = Some(match total.take() {
        Some(sum) => (sum + value)?,
        None => value,
    });
    Ok(())
}

/// A 0-d tensor's value on the host, as an f64 ([`host_f64`]).
pub(crate) fn host_scalar(t: &Tensor) -> candle_core::Result<f64> {
    host_f64(t)?.to_scalar::<f64>()
}

/// `t` as f64 values on the host: moved there first and converted there, so that it works
/// on a device without f64 (Metal), and moves the narrower dtype off any device.
pub(crate) fn host_f64(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F64)
}

/// The values of several tensors on the host as f64 vectors, flattened, one per tensor:
/// the tensors of each device and dtype are concatenated there and cross to the host once
/// ([`host_f64`]), not once per tensor (on a GPU each crossing waits for the device). Empty
/// tensors give empty vectors and are not read.
pub(crate) fn host_f64_vectors(parts: &[Tensor]) -> candle_core::Result<Vec<Vec<f64>>> {
    // One group per device and dtype: its flattened non-empty tensors, with their indices.
    let mut groups: Vec<Vec<(usize, Tensor)>> = Vec::new();
    for (index, part) in parts.iter().enumerate() {
        if part.elem_count() == 0 {
            continue;
        }
        let flat = part.flatten_all()?;
        let group = groups.iter_mut().find(|group| {
            group.first().is_some_and(|(_, t)| {
                t.device().same_device(part.device()) && t.dtype() == part.dtype()
            })
        });
        match group {
            Some(group) => group.push((index, flat)),
            None => groups.push(vec![(index, flat)]),
        }
    }
    let mut values = vec![Vec::new(); parts.len()];
    for group in groups {
        let flat: Vec<Tensor> = group.iter().map(|(_, t)| t.clone()).collect();
        let mut host = host_f64(&Tensor::cat(&flat, 0)?)?
            .to_vec1::<f64>()?
            .into_iter();
        for (index, t) in &group {
            if let Some(slot) = values.get_mut(*index) {
                *slot = host.by_ref().take(t.elem_count()).collect();
            }
        }
    }
    Ok(values)
}

/// The dtype arithmetic runs in: f32 for f16/bf16 on the CPU (candle's CPU matmul has no
/// half-precision kernel), the tensor's own dtype otherwise.
pub fn compute_dtype(dtype: DType, device: &Device) -> DType {
    match dtype {
        DType::F16 | DType::BF16 if device.is_cpu() => DType::F32,
        d => d,
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    /// On the CPU reductions run in f64 (a sum of squares of f32 values past f32's range
    /// included), and `host_f64` gives the values exactly in f64.
    #[test]
    fn reductions_in_f64_off_metal_and_host_values_in_f64() {
        assert_eq!(super::reduction_dtype(&Device::Cpu), DType::F64);
        let t = Tensor::new(&[1.5f32, -0.1, 3e38], &Device::Cpu).unwrap();
        let host = super::host_f64(&t).unwrap();
        assert_eq!(host.dtype(), DType::F64);
        let want: Vec<f64> = [1.5f32, -0.1, 3e38].iter().map(|&v| f64::from(v)).collect();
        assert_eq!(host.to_vec1::<f64>().unwrap(), want);
        let squares: f64 = want.iter().map(|v| v * v).sum();
        let sum = super::sum_of_squares(&t).unwrap();
        assert_eq!(super::host_scalar(&sum).unwrap(), squares);
    }

    /// Read together, each tensor gets its own values back, whatever the dtypes' order, with
    /// empty and two-dimensional tensors among them.
    #[test]
    fn vectors_read_together_match_each_read_alone() {
        let dev = Device::Cpu;
        let parts = [
            Tensor::new(&[1.5f32, -2.25], &dev).unwrap(),
            Tensor::new(&[0.1f64, 7.0, -3.5], &dev).unwrap(),
            Tensor::zeros(0, DType::F32, &dev).unwrap(),
            Tensor::new(&[[4f32, 5.0], [6.0, -0.3]], &dev).unwrap(),
            Tensor::new(&[9.5f32], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
            Tensor::new(&[-1e30f32], &dev).unwrap(),
        ];
        let together = super::host_f64_vectors(&parts).unwrap();
        let alone: Vec<Vec<f64>> = parts
            .iter()
            .map(|t| {
                super::host_f64(&t.flatten_all().unwrap())
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            })
            .collect();
        assert_eq!(together, alone);
        assert_eq!(together[3], [4.0, 5.0, 6.0, f64::from(-0.3f32)]);
        assert!(super::host_f64_vectors(&[]).unwrap().is_empty());
    }
}
