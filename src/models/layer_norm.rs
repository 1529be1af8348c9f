//! LayerNorm over the last dimension as one CPU op with its own backward, for training
//! (GPT-2's and BERT's norms): candle-nn's fused `layer_norm` has no backward in candle
//! 0.11, and its composed `layer_norm_slow` records eight full-size nodes (each costing
//! the backward a zero-filled gradient and an add on top of its own work).
//!
//! The op gives the gradients of the input and of the bias: the norm's weight is a frozen
//! base tensor in lorakit's models, while the bias trains under PEFT's `bias = "all"`. A
//! weight that tracks a gradient takes candle's composed ops instead ([`supports`]).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};

use super::cpu_op::{f32_input, map_rows, rows_and_weight, rows_weight_and_grad};

/// The norm by the fastest path that keeps gradients (see `models::fused::layer_norm`,
/// which checks the shapes first): this op where a gradient flows through f32 CPU tensors
/// and the weight is frozen, candle-nn's composition elsewhere when a gradient flows,
/// candle-nn's kernel (no backward) when none does.
pub(crate) fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    let tracks = x.track_op() || b.track_op();
    // candle-nn's fused kernel takes f32, f16 and bf16 only.
    let fused_dtype = matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16);
    if tracks && supports(x, w, b) {
        layer_norm_trainable(x, w, b, eps)
    } else if tracks || w.track_op() || !fused_dtype {
        candle_nn::ops::layer_norm_slow(x, w, b, eps)
    } else {
        candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps)
    }
}

/// `(x − mean(x)) / sqrt(var(x) + eps) ⊙ w + b` over the last dimension (the biased
/// variance, as PyTorch's `nn.LayerNorm`), differentiable in `x` and `b`. Callers check
/// [`supports`] first.
fn layer_norm_trainable(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps })
}

/// Whether [`layer_norm_trainable`] runs: f32 CPU tensors, `w` and `b` the size of `x`'s
/// last dimension, `w` tracking no gradient.
fn supports(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    let dim = [x.dims().last().copied().unwrap_or(0)];
    [x, w, b]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
        && !w.track_op()
        && w.dims() == dim
        && b.dims() == dim
}

/// The forward kernel (`CustomOp3` on `x`, `w`, `b`).
struct LayerNormOp {
    eps: f32,
}

/// A row's mean and `1 / sqrt(var + eps)`.
#[inline(always)]
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len().max(1) as f32;
    let mean = crate::kernels::vector_math::sum(row) / n;
    let var = crate::kernels::vector_math::sum_sq_dev(row, mean) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "lorakit-layer-norm"
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
        let (x, w) = rows_and_weight("layer_norm", (s1, l1), (s2, l2))?;
        let b = f32_input("layer_norm", s3, l3)?;
        if b.len() != w.len() {
            candle_core::bail!("layer_norm: bias {:?} vs weight {:?}", l3.dims(), l2.dims());
        }
        let out = map_rows(
            x,
            x,
            w.len(),
            #[inline(always)]
            |dst, row, _| {
                let (mean, r) = moments(row, self.eps);
                for (((d, &v), &a), &c) in dst.iter_mut().zip(row).zip(w).zip(b) {
                    *d = (v - mean) * r * a + c;
                }
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gx = x.apply_op3_no_bwd(w, &grad, &LayerNormGrad { eps: self.eps })?;
        // The bias's gradient: the upstream gradient summed over every row.
        let gb = match b.track_op() {
            true => Some(grad.flatten_to(D::Minus2)?.sum(0)?),
            false => None,
        };
        Ok((Some(gx), None, gb))
    }
}

/// The input's gradient: with `x̂ = (x − mean) r` and `u = g ⊙ w` per row,
/// `r (u − mean(u) − x̂ mean(u ⊙ x̂))`.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "lorakit-layer-norm-grad"
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
        let (x, w, g) = rows_weight_and_grad("layer_norm backward", (s1, l1), (s2, l2), (s3, l3))?;
        let n = w.len();
        let out = map_rows(
            x,
            g,
            n,
            #[inline(always)]
            |dst, row, grow| {
                let (mean, r) = moments(row, self.eps);
                // Σ u and Σ u ⊙ x̂ = r (Σ u ⊙ x − mean Σ u).
                let su = crate::kernels::vector_math::dot(grow, w);
                let sux = r * (crate::kernels::vector_math::dot3(grow, w, row) - mean * su);
                let (mu, mux) = (su / n as f32, sux / n as f32);
                for (((d, &v), &gv), &a) in dst.iter_mut().zip(row).zip(grow).zip(w) {
                    *d = r * (gv * a - mu - (v - mean) * r * mux);
                }
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Value and the gradients of the input and of a trained bias equal candle-nn's
    /// composed `layer_norm_slow`.
    #[test]
    fn equals_the_composed_layer_norm() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0.5f32, 2., (2, 3, 5, 40), &dev).unwrap()).unwrap();
        let w = Tensor::randn(1f32, 0.5, 40, &dev).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, 40, &dev).unwrap()).unwrap();
        assert!(super::supports(x.as_tensor(), &w, b.as_tensor()));
        let fused = super::layer_norm_trainable(x.as_tensor(), &w, b.as_tensor(), 1e-5).unwrap();
        let composed =
            candle_nn::ops::layer_norm_slow(x.as_tensor(), &w, b.as_tensor(), 1e-5).unwrap();
        super::super::op_test::assert_same_op(
            &fused,
            &composed,
            &[("x", x.as_tensor()), ("b", b.as_tensor())],
            1e-5,
            "layer_norm",
        );
        // A weight that trains is not the fused op's.
        let wv = Var::from_tensor(&w).unwrap();
        assert!(!super::supports(
            x.as_tensor(),
            wv.as_tensor(),
            b.as_tensor()
        ));
    }
}
