//! RMSNorm over the last dimension as one CPU op with its own backward, for training:
//! candle-nn's fused `rms_norm` has no backward in candle 0.11, and its composed
//! `rms_norm_slow` records six full-size nodes (each costing the backward a zero-filled
//! gradient and an add on top of its own work).
//!
//! The op gives the gradient of the input only: the norm's weight is a frozen base tensor
//! in lorakit's models (no adapter or `modules_to_save` entry reaches it). A weight that
//! tracks a gradient takes candle's composed ops instead ([`supports`]).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use super::cpu_op::{map_rows, rows_and_weight, rows_weight_and_grad};

/// `w ⊙ x / sqrt(mean(x²) + eps)` over the last dimension, differentiable in `x`.
/// Callers check [`supports`] first.
pub(crate) fn rms_norm_trainable(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNormOp { eps })
}

/// Whether [`rms_norm_trainable`] runs `x` with weight `w`: f32 on the CPU, `w` the size of
/// `x`'s last dimension and tracking no gradient.
pub(crate) fn supports(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && !w.track_op()
        && w.dims() == [x.dims().last().copied().unwrap_or(0)]
}

/// The forward kernel (`CustomOp2` on `x`, `w`).
struct RmsNormOp {
    eps: f32,
}

/// `1 / sqrt(mean(row²) + eps)`.
#[inline(always)]
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let sum2 = crate::kernels::vector_math::dot(row, row);
    1.0 / (sum2 / row.len().max(1) as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "lorakit-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = rows_and_weight("rms_norm", (s1, l1), (s2, l2))?;
        let out = map_rows(
            x,
            x,
            w.len(),
            #[inline(always)]
            |dst, row, _| {
                let r = inv_rms(row, self.eps);
                for ((d, &v), &a) in dst.iter_mut().zip(row).zip(w) {
                    *d = v * r * a;
                }
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gx = x.apply_op3_no_bwd(w, &grad, &RmsNormGrad { eps: self.eps })?;
        Ok((Some(gx), None))
    }
}

/// The input's gradient: with `r = 1 / rms(x)` per row and `u = g ⊙ w`,
/// `r u − x r³ Σ(u ⊙ x) / n`.
struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "lorakit-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, g) = rows_weight_and_grad("rms_norm backward", (s1, l1), (s2, l2), (s3, l3))?;
        let n = w.len();
        let out = map_rows(
            x,
            g,
            n,
            #[inline(always)]
            |dst, row, grow| {
                let r = inv_rms(row, self.eps);
                let dot = crate::kernels::vector_math::dot3(grow, w, row);
                let c = r * r * r * dot / n as f32;
                for (((d, &v), &gv), &a) in dst.iter_mut().zip(row).zip(grow).zip(w) {
                    *d = r * gv * a - v * c;
                }
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Value and input gradient equal candle-nn's composed `rms_norm_slow`.
    #[test]
    fn equals_the_composed_rms_norm() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2., (2, 3, 5, 12), &dev).unwrap()).unwrap();
        let w = Tensor::randn(1f32, 0.5, 12, &dev).unwrap();
        assert!(super::supports(x.as_tensor(), &w));
        let fused = super::rms_norm_trainable(x.as_tensor(), &w, 1e-5).unwrap();
        let composed = candle_nn::ops::rms_norm_slow(x.as_tensor(), &w, 1e-5).unwrap();
        super::super::op_test::assert_same_op(
            &fused,
            &composed,
            &[("x", x.as_tensor())],
            1e-5,
            "rms_norm",
        );
        // A weight that trains is not the fused op's.
        let wv = Var::from_tensor(&w).unwrap();
        assert!(!super::supports(x.as_tensor(), wv.as_tensor()));
    }
}
