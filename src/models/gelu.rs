//! GELU's tanh approximation (GPT-2's `gelu_new`) as one CPU op with its own backward,
//! for training: candle's `gelu` is one node forward, but its backward composes about ten
//! full-size ops (two `powf`, a `tanh`, products and sums, each a fresh tensor), which
//! took about a third of a GPT-2 training step. Here the forward and the backward are
//! each one vectorized pass, `tanh` from the vectorizable `exp`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use super::cpu_op::{f32_input, map2};

/// `sqrt(2 / π)`.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic term's coefficient.
const CUBIC: f32 = 0.044_715;

/// `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`, differentiable. The fused op runs for
/// f32 CPU tensors that track a gradient; candle's `gelu` otherwise.
pub(crate) fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() && x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(GeluTanh)
    } else {
        x.gelu()
    }
}

/// `tanh(u)` as `1 − 2 / (e^{2u} + 1)` (exact limits ±1 where `e^{2u}` is 0 or ∞).
#[inline(always)]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (crate::vector_math::exp(2.0 * u) + 1.0)
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "lorakit-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_input("gelu", s, l)?;
        let out = map2(x, x, |x, _| {
            0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + CUBIC * x * x * x)))
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&grad, &GeluTanhGrad)?))
    }
}

/// `g ⊙ gelu'(x)`: `0.5 (1 + t) + 0.5 x (1 − t²) sqrt(2/π) (1 + 3 · 0.044715 x²)`.
struct GeluTanhGrad;

impl CustomOp2 for GeluTanhGrad {
    fn name(&self) -> &'static str {
        "lorakit-gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (
            f32_input("gelu backward", s1, l1)?,
            f32_input("gelu backward", s2, l2)?,
        );
        if x.len() != g.len() {
            candle_core::bail!(
                "gelu backward: gradient {:?} vs input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let out = map2(x, g, |x, g| {
            let x2 = x * x;
            let t = tanh(SQRT_2_OVER_PI * (x + CUBIC * x2 * x));
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x2);
            g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Value and gradient equal candle's `gelu` (forward and its composed backward),
    /// within one parallel chunk and over several, including large |x| (tanh at ±1).
    #[test]
    fn equals_candles_gelu() {
        let dev = Device::Cpu;
        for shape in [(3, 50), (2, super::super::cpu_op::CHUNK / 2 + 33)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 4., shape, &dev).unwrap()).unwrap();
            let fused = super::gelu_tanh(x.as_tensor()).unwrap();
            let composed = x.as_tensor().gelu().unwrap();
            let case = format!("gelu {shape:?}");
            let inputs = [("x", x.as_tensor())];
            super::super::op_test::assert_same_op(&fused, &composed, &inputs, 1e-5, &case);
        }
    }
}
