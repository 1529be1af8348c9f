//! A softmax over the last dimension with a backward pass, for attention in training:
//! candle-nn's fused `softmax_last_dim` has no backward in candle 0.11, and its composed
//! `softmax` takes about five full-size passes forward and more backward.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType, D};
use rayon::prelude::*;

/// `softmax(x)` over the last dimension of a contiguous f32 CPU tensor, differentiable:
/// the backward is `p ⊙ (g − Σ g ⊙ p)`.
pub(crate) fn softmax_last_trainable(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxLast)
}

/// Whether [`softmax_last_trainable`] runs `x` (f32 on the CPU).
pub(crate) fn supports(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

struct SoftmaxLast;

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "lorakit-softmax-last"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = f32::cpu_storage_as_slice(storage)?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax: the input must be contiguous")
        };
        let Some(x) = data.get(start..end) else {
            candle_core::bail!("softmax: the input is out of its storage")
        };
        let n = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(dst, row)| {
                crate::kernels::vector_math::on_widest_vectors(
                    #[inline(always)]
                    || {
                        let max = crate::kernels::vector_math::max(row);
                        dst.copy_from_slice(row);
                        let sum = crate::kernels::vector_math::exp_in_place_sum(dst, max);
                        let inv = 1.0 / sum;
                        dst.iter_mut().for_each(|d| *d *= inv);
                    },
                )
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let gp = (grad * res)?;
        let sum = gp.sum_keepdim(D::Minus1)?;
        Ok(Some((gp - res.broadcast_mul(&sum)?)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var, D};

    /// Forward and gradient equal candle-nn's composed softmax (the reference).
    #[test]
    fn equals_the_composed_softmax() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3., (2, 3, 5, 7), &dev).unwrap()).unwrap();
        let weights = Tensor::randn(0f32, 1., (2, 3, 5, 7), &dev).unwrap();
        let fused = super::softmax_last_trainable(x.as_tensor()).unwrap();
        let composed = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        let diff = (&fused - &composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        let gf = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (composed * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (gf, gc) = (
            gf.get(x.as_tensor()).unwrap(),
            gc.get(x.as_tensor()).unwrap(),
        );
        let scale = gc
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (gf - gc)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff <= 1e-5 * scale,
            "gradient differs by {diff} (scale {scale})"
        );
    }
}
