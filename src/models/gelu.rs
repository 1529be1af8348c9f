//! GELU as one CPU op with its own backward, for training, in both of its forms: the
//! tanh approximation (GPT-2's `gelu_new`) and the exact one with the error function
//! (BERT's `gelu`). candle's `gelu` / `gelu_erf` are one node forward, but their backward
//! composes about ten full-size ops (powers, `tanh` or `erf` and `exp`, products and sums,
//! each a fresh tensor); the tanh form's took about a third of a GPT-2 training step. Here
//! the forward and the backward are each one vectorized pass, `tanh` and `erf` from the
//! vectorizable `exp`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use super::cpu_op::{f32_input, map2};

/// `sqrt(2 / π)`.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic term's coefficient.
const CUBIC: f32 = 0.044_715;
/// `1 / sqrt(2)`.
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2π)`, the standard normal density at 0.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`, differentiable. The fused op runs for
/// f32 CPU tensors that track a gradient; candle's `gelu` otherwise.
pub(crate) fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    fused_or(x, Form::Tanh, Tensor::gelu)
}

/// `x Φ(x) = 0.5 x (1 + erf(x / sqrt(2)))`, differentiable. The fused op runs for f32 CPU
/// tensors that track a gradient; candle's `gelu_erf` otherwise.
pub(crate) fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    fused_or(x, Form::Erf, Tensor::gelu_erf)
}

/// The fused op of `form` where a gradient flows through an f32 CPU tensor, else `composed`.
fn fused_or(
    x: &Tensor,
    form: Form,
    composed: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    if x.track_op() && x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Gelu(form))
    } else {
        composed(x)
    }
}

/// Which GELU.
#[derive(Clone, Copy, Debug)]
enum Form {
    /// `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`.
    Tanh,
    /// `0.5 x (1 + erf(x / sqrt(2)))`.
    Erf,
}

/// `tanh(u)` as `1 − 2 / (e^{2u} + 1)` (exact limits ±1 where `e^{2u}` is 0 or ∞).
#[inline(always)]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (crate::kernels::vector_math::exp(2.0 * u) + 1.0)
}

/// `erf(x)` by Abramowitz and Stegun's 7.1.26, the formula of PyTorch's vectorized CPU
/// `erf` (and so of its exact GELU): absolute error ≤ 1.5e-7 in exact arithmetic, ≤ 7e-7
/// evaluated in f32 (6.6e-7 at most on a grid over [−6, 6], near 0).
#[inline(always)]
fn erf(x: f32) -> f32 {
    erf_and_gaussian(x).0
}

/// `(erf(x), e^{−x²})`: the formula's Gaussian factor comes back too, so the exact GELU's
/// gradient, whose density term is the same `e^{−x²}` at `x / sqrt(2)`, computes one `exp`.
#[inline(always)]
fn erf_and_gaussian(x: f32) -> (f32, f32) {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_7) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let gaussian = crate::kernels::vector_math::exp(-a * a);
    ((1.0 - poly * gaussian).copysign(x), gaussian)
}

struct Gelu(Form);

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        match self.0 {
            Form::Tanh => "lorakit-gelu-tanh",
            Form::Erf => "lorakit-gelu-erf",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_input("gelu", s, l)?;
        let out = match self.0 {
            Form::Tanh => map2(x, x, |x, _| {
                0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + CUBIC * x * x * x)))
            }),
            Form::Erf => map2(x, x, |x, _| 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))),
        };
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&grad, &GeluGrad(self.0))?))
    }
}

/// `g ⊙ gelu'(x)`: for the tanh form
/// `0.5 (1 + t) + 0.5 x (1 − t²) sqrt(2/π) (1 + 3 · 0.044715 x²)`, for the exact one
/// `Φ(x) + x φ(x) = 0.5 (1 + erf(x / sqrt(2))) + x e^{−x²/2} / sqrt(2π)`.
struct GeluGrad(Form);

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        match self.0 {
            Form::Tanh => "lorakit-gelu-tanh-grad",
            Form::Erf => "lorakit-gelu-erf-grad",
        }
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
        let out = match self.0 {
            Form::Tanh => map2(x, g, |x, g| {
                let x2 = x * x;
                let t = tanh(SQRT_2_OVER_PI * (x + CUBIC * x2 * x));
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x2);
                g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
            }),
            Form::Erf => map2(x, g, |x, g| {
                // erf(x / sqrt(2)) and e^{−x²/2} from one `exp`.
                let (erf, gaussian) = erf_and_gaussian(x * FRAC_1_SQRT_2);
                let cdf = 0.5 * (1.0 + erf);
                let pdf = FRAC_1_SQRT_2PI * gaussian;
                g * (cdf + x * pdf)
            }),
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Both forms: value and gradient equal candle's `gelu` / `gelu_erf` and their composed
    /// backward (`gelu_erf`'s rounds `1/sqrt(2π)` to 0.398942, 7e-7 relative), within one
    /// parallel chunk and over several, including large |x| (tanh and erf at ±1).
    #[test]
    fn equals_candles_gelu_and_gelu_erf() {
        type Gelu = fn(&Tensor) -> candle_core::Result<Tensor>;
        let dev = Device::Cpu;
        let forms: [(&str, Gelu, Gelu); 2] = [
            ("gelu", super::gelu_tanh, Tensor::gelu),
            ("gelu_erf", super::gelu_erf, Tensor::gelu_erf),
        ];
        for (name, fused, composed) in forms {
            for shape in [(3, 50), (2, super::super::cpu_op::CHUNK / 2 + 33)] {
                let x = Var::from_tensor(&Tensor::randn(0f32, 4., shape, &dev).unwrap()).unwrap();
                let case = format!("{name} {shape:?}");
                let inputs = [("x", x.as_tensor())];
                super::super::op_test::assert_same_op(
                    &fused(x.as_tensor()).unwrap(),
                    &composed(x.as_tensor()).unwrap(),
                    &inputs,
                    1e-5,
                    &case,
                );
            }
        }
    }

    /// `erf` against f64 values (Python's `math.erf`) within 7e-7 (the formula's 1.5e-7
    /// plus its f32 evaluation), odd, and at its limits.
    #[test]
    fn erf_is_within_its_bound() {
        let table = [
            (0.0, 0.0),
            (0.1, 0.112_462_916_018_284_9),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (1.5, 0.966_105_146_475_310_7),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
        ];
        for (x, want) in table {
            for (x, want) in [(x, want), (-x, -want)] {
                let got = super::erf(x as f32) as f64;
                assert!((got - want).abs() <= 7e-7, "erf({x}) = {got}, want {want}");
            }
        }
        assert_eq!(super::erf(10.0), 1.0);
        assert_eq!(super::erf(-10.0), -1.0);
        assert_eq!(super::erf(f32::INFINITY), 1.0);
    }
}
