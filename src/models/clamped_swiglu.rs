//! gpt-oss's clamped SwiGLU (transformers' `GptOssExperts._apply_gate`) as one CPU op with
//! its own backward: from `gate_up` `(…, 2I)` whose even columns are the gate and odd ones
//! the up projection, `(up' + 1) · g · σ(α g)` `(…, I)` with `g = min(gate, limit)` and
//! `up' = clamp(up, −limit, limit)`. Composed from candle ops, the de-interleaving, the two
//! clamps, the sigmoid and the products each record a node and keep an intermediate for the
//! backward; the op keeps only its input.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu_op::{f32_input, sigmoid, CHUNK};
use super::ops;
use crate::error::Result;

/// `(up' + 1) · g · σ(α g)` of the interleaved `gate_up` `(…, 2I)` (see the module's doc),
/// differentiable in `gate_up`. The fused op runs for f32 CPU tensors when a gradient
/// flows; candle's ops otherwise ([`clamped_swiglu_composed`]).
pub(crate) fn clamped_swiglu(gate_up: &Tensor, limit: f64, alpha: f64) -> Result<Tensor> {
    let fused = gate_up.track_op()
        && gate_up.device().is_cpu()
        && gate_up.dtype() == DType::F32
        && gate_up.dim(D::Minus1)? % 2 == 0;
    if !fused {
        return clamped_swiglu_composed(gate_up, limit, alpha);
    }
    let op = ClampedSwiGlu {
        limit: limit as f32,
        alpha: alpha as f32,
    };
    Ok(gate_up.contiguous()?.apply_op1(op)?)
}

/// [`clamped_swiglu`] in candle ops (any dtype and device; the reference of the op).
pub(crate) fn clamped_swiglu_composed(gate_up: &Tensor, limit: f64, alpha: f64) -> Result<Tensor> {
    let mut dims = gate_up.dims().to_vec();
    let width = dims.pop().unwrap_or(0);
    let pairs = gate_up.reshape([dims.clone(), vec![width / 2, 2]].concat())?;
    let last = dims.len() + 1;
    let gate = pairs.narrow(last, 0, 1)?.squeeze(last)?;
    let up = pairs.narrow(last, 1, 1)?.squeeze(last)?;
    let gate = gate.minimum(limit)?;
    let up = up.clamp(-limit, limit)?;
    let glu = (&gate * ops::sigmoid(&(&gate * alpha)?)?)?;
    Ok(((up + 1.0)? * glu)?)
}

#[derive(Clone, Copy)]
struct ClampedSwiGlu {
    limit: f32,
    alpha: f32,
}

impl ClampedSwiGlu {
    /// The output of one `(gate, up)` pair.
    #[inline(always)]
    fn value(self, gate: f32, up: f32) -> f32 {
        let g = gate.min(self.limit);
        (up.clamp(-self.limit, self.limit) + 1.0) * g * sigmoid(self.alpha * g)
    }

    /// The gradients of one pair's output, times `grad`: `(d gate, d up)`. A clamped input
    /// gets none (as torch's `clamp`, which passes the gradient at the bounds themselves).
    #[inline(always)]
    fn grads(self, gate: f32, up: f32, grad: f32) -> (f32, f32) {
        let g = gate.min(self.limit);
        let s = sigmoid(self.alpha * g);
        let up_in = (-self.limit..=self.limit).contains(&up);
        let d_up = if up_in { grad * g * s } else { 0.0 };
        let d_gate = if gate <= self.limit {
            let up = up.clamp(-self.limit, self.limit) + 1.0;
            grad * up * s * (1.0 + self.alpha * g * (1.0 - s))
        } else {
            0.0
        };
        (d_gate, d_up)
    }
}

impl CustomOp1 for ClampedSwiGlu {
    fn name(&self) -> &'static str {
        "lorakit-clamped-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let gate_up = f32_input("clamped swiglu", s, l)?;
        let mut out = vec![0f32; gate_up.len() / 2];
        let op = *self;
        out.par_chunks_mut(CHUNK)
            .zip(gate_up.par_chunks(2 * CHUNK))
            .for_each(|(out, pairs)| {
                crate::kernels::vector_math::on_widest_vectors(
                    #[inline(always)]
                    || {
                        for (o, pair) in out.iter_mut().zip(pairs.chunks_exact(2)) {
                            if let [gate, up] = *pair {
                                *o = op.value(gate, up);
                            }
                        }
                    },
                )
            });
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last /= 2;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&grad, self)?))
    }
}

/// The backward: `gate_up`'s gradient from it and the output's gradient.
impl CustomOp2 for ClampedSwiGlu {
    fn name(&self) -> &'static str {
        "lorakit-clamped-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let gate_up = f32_input("clamped swiglu backward", s1, l1)?;
        let grad = f32_input("clamped swiglu backward", s2, l2)?;
        if gate_up.len() != 2 * grad.len() {
            candle_core::bail!(
                "clamped swiglu backward: input {:?}, gradient {:?}",
                l1.dims(),
                l2.dims()
            );
        }
        let mut out = vec![0f32; gate_up.len()];
        let op = *self;
        out.par_chunks_mut(2 * CHUNK)
            .zip(gate_up.par_chunks(2 * CHUNK).zip(grad.par_chunks(CHUNK)))
            .for_each(|(out, (pairs, grad))| {
                crate::kernels::vector_math::on_widest_vectors(
                    #[inline(always)]
                    || {
                        let outs = out.chunks_exact_mut(2).zip(pairs.chunks_exact(2));
                        for ((d, pair), &g) in outs.zip(grad) {
                            if let ([d_gate, d_up], &[gate, up]) = (d, pair) {
                                (*d_gate, *d_up) = op.grads(gate, up, g);
                            }
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Value and gradient equal the composed ops, with some inputs past the limit on both
    /// sides, within one parallel chunk and over several (a partial last one).
    #[test]
    fn equals_the_composed_ops() {
        let dev = Device::Cpu;
        for shape in [(3, 10), (2, 2 * super::CHUNK + 154)] {
            let x = Tensor::randn(0f32, 2., shape, &dev).unwrap();
            let gate_up = Var::from_tensor(&x).unwrap();
            let (limit, alpha) = (1.5, 1.702);
            let fused = super::clamped_swiglu(gate_up.as_tensor(), limit, alpha).unwrap();
            let composed =
                super::clamped_swiglu_composed(gate_up.as_tensor(), limit, alpha).unwrap();
            let clamped = x.abs().unwrap().ge(limit).unwrap();
            let clamped = clamped.to_dtype(candle_core::DType::F32).unwrap();
            let share = clamped.mean_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(share > 0.2, "few inputs clamped: {share}");
            let inputs = [("gate_up", gate_up.as_tensor())];
            let case = format!("clamped swiglu {shape:?}");
            super::super::op_test::assert_same_op(&fused, &composed, &inputs, 1e-5, &case);
        }
    }
}
