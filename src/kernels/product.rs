//! [`Product`]: the adapted linear product over a frozen weight that is a float tensor or
//! quantized blocks; [`super::FusedLinear`] is its public face for float weights.

use candle_core::{DType, Tensor};

use super::fused_op::FusedLowRankOp;
use super::saved_op::SavedOp;
use super::weight::WeightRef;
use super::{add_trainable_bias, compute_dtype, flatten_rows, unflatten_rows, LowRankTerm};
use crate::error::Result;
use crate::kernels::dropout::Dropout;
use crate::matmul::matmul;

/// One adapted linear product (see [`super::FusedLinear`]) over any frozen weight.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Product<'a> {
    /// Frozen `W`, `(d_out, d_in)`.
    pub weight: WeightRef<'a>,
    /// Frozen bias, `(d_out,)`, added after the row scale.
    pub bias: Option<&'a Tensor>,
    /// The low-rank term, if any.
    pub low_rank: Option<LowRankTerm<'a>>,
    /// Per-output scale `(d_out,)` applied to base plus low-rank term.
    pub row_scale: Option<&'a Tensor>,
}

impl Product<'_> {
    /// Every operand fits `W`'s `(d_out, d_in)`: errors name the operand, whichever path
    /// runs. Dtypes may differ (each operand is cast to `x`'s compute dtype).
    fn check_shapes(&self, x: &Tensor) -> Result<()> {
        const OP: &str = "fused linear";
        let dims = self.weight.dims();
        let &[d_out, d_in] = dims.as_slice() else {
            return Err(crate::Error::ShapeMismatch {
                layer: OP.to_string(),
                what: "weight".to_string(),
                expected: "[d_out, d_in]".to_string(),
                got: format!("{dims:?}"),
            });
        };
        if x.dims().last() != Some(&d_in) {
            return Err(crate::Error::ShapeMismatch {
                layer: OP.to_string(),
                what: "input".to_string(),
                expected: format!("[.., {d_in}]"),
                got: format!("{:?}", x.dims()),
            });
        }
        if let Some(term) = &self.low_rank {
            let r = term.a.dims().first().copied().unwrap_or(0);
            crate::validate::shape(OP, "A", term.a, &[r, d_in])?;
            crate::validate::shape(OP, "B", term.b, &[d_out, r])?;
        }
        if let Some(b) = self.bias {
            crate::validate::shape(OP, "bias", b, &[d_out])?;
        }
        if let Some(c) = self.row_scale {
            crate::validate::shape(OP, "row scale", c, &[d_out])?;
        }
        Ok(())
    }

    /// Runs the product on the fastest path available for `x`'s device (see the module
    /// docs): the fused op on the CPU, the composed path elsewhere.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_dropped(x, 0.0)
    }

    /// [`Product::forward`] with dropout at probability `p` (in `[0, 1)`; 0 for none) on
    /// the low-rank term's input: `x Wᵀ + b + s (drop(x) A_effᵀ) B_effᵀ`, LoRA's
    /// `lora_dropout` in training. On the CPU one fused op that draws the dropout itself
    /// ([`crate::kernels::dropout`]); elsewhere the base product plus the composed low-rank term
    /// on candle-nn's dropout. With `p > 0` there is no row scale (an error names it).
    pub(crate) fn forward_dropped(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        self.check_shapes(x)?;
        if let Some(bias) = self.bias.filter(|b| b.track_op()) {
            // A trainable bias (PEFT's `bias = "lora_only"`): the fused op holds its bias as
            // a constant, so it is added outside, where autograd reaches it.
            let y = Product {
                bias: None,
                ..*self
            }
            .forward_dropped(x, p)?;
            return add_trainable_bias(&y, bias);
        }
        let dropped_term = self.low_rank.filter(|_| p > 0.0);
        if dropped_term.is_some() && self.row_scale.is_some() {
            return Err(crate::Error::usage(
                crate::error::Scope::Settings("fused linear".to_string()),
                "dropout on the low-rank input with a row scale: compose it (DoRA's forward does)",
            ));
        }
        let compute = compute_dtype(x.dtype(), x.device());
        if x.device().is_cpu() && matches!(compute, DType::F32 | DType::F64) {
            let dropout = dropped_term.and_then(|_| Dropout::new(p as f32));
            return self.forward_fused(x, false, dropout);
        }
        if let Some(term) = dropped_term {
            let base = Product {
                low_rank: None,
                ..*self
            };
            let dropped = candle_nn::ops::dropout(x, p as f32)?;
            return Ok((base.forward(x)? + super::low_rank_only(&dropped, &term)?)?);
        }
        #[cfg(feature = "cuda")]
        if super::cuda::supported(x) && matches!(self.weight, WeightRef::Float(_)) {
            return self.forward_fused(x, true, None);
        }
        self.forward_composed(x)
    }

    /// The fused `CustomOp3`: inputs `x`, `A_eff` and `[B_eff | row_scale]` (zero-sized
    /// factors without a low-rank term), `W`, bias, scale and `dropout` (on the low-rank
    /// input; the CPU kernel's only) held in the op. `contiguous`: make every tensor
    /// contiguous first (the CUDA kernel's requirement).
    fn forward_fused(
        &self,
        x: &Tensor,
        contiguous: bool,
        dropout: Option<Dropout>,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let compute = compute_dtype(dtype, x.device());
        let cast = |t: &Tensor| {
            let t = t.to_dtype(compute)?;
            if contiguous {
                t.contiguous()
            } else {
                Ok(t)
            }
        };
        let (d_out, d_in) = self.weight.dims2()?;
        let (a, b, scale, rank) = match &self.low_rank {
            Some(term) => (cast(term.a)?, cast(term.b)?, term.scale, term.a.dims2()?.0),
            None => (
                Tensor::zeros((0, d_in), compute, x.device())?,
                Tensor::zeros((d_out, 0), compute, x.device())?,
                0.0,
                0,
            ),
        };
        let packed = match self.row_scale {
            Some(c) => {
                let c = cast(c)?.reshape((d_out, 1))?;
                if rank > 0 {
                    Tensor::cat(&[&b, &c], 1)?.contiguous()?
                } else {
                    c
                }
            }
            None => b,
        };
        let x = cast(x)?;
        let trains = [&x, &a, &packed].iter().any(|t| t.track_op());
        let op = SavedOp::new(FusedLowRankOp {
            weight: self.weight.to_op(compute, contiguous)?,
            bias: self.bias.map(cast).transpose()?,
            scale,
            rank,
            row_scale: self.row_scale.is_some(),
            dropout,
            trains,
        });
        let y = x.apply_op3(&a, &packed, op)?;
        Ok(y.to_dtype(dtype)?)
    }

    /// The reference: the same product composed from candle ops. Half-precision inputs are
    /// computed in f32 on the CPU and cast back.
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        self.check_shapes(x)?;
        let dtype = x.dtype();
        let compute = compute_dtype(dtype, x.device());
        let cast = |t: &Tensor| t.to_dtype(compute);
        let (x2, lead) = flatten_rows(x)?;
        let x2 = cast(&x2)?;
        let mut y = matmul(&x2, &self.weight.float(compute)?.t()?)?;
        if let Some(term) = &self.low_rank {
            let xa = matmul(&x2, &cast(term.a)?.t()?)?;
            let low = (matmul(&xa, &cast(term.b)?.t()?)? * term.scale)?;
            y = (y + low)?;
        }
        if let Some(c) = self.row_scale {
            y = y.broadcast_mul(&cast(c)?)?;
        }
        if let Some(b) = self.bias {
            y = y.broadcast_add(&cast(b)?)?;
        }
        Ok(unflatten_rows(&y.to_dtype(dtype)?, &lead)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::{LowRankTerm, Product, WeightRef};
    use crate::kernels::dropout::Dropout;
    use crate::matmul::matmul;
    use crate::models::op_test::assert_same_op;

    /// With dropout on the low-rank input, the fused op equals the composition with the
    /// same dropped entries: the output and the gradients of `x` (through the dropout),
    /// `A` and `B`, over a bias, for inputs with a batch dimension; and the trainable-bias
    /// route keeps the dropout.
    #[test]
    fn dropout_on_the_low_rank_input_equals_the_composition() {
        let dev = Device::Cpu;
        let (batch, rows, d_in, d_out, r, s) = (2, 5, 37, 23, 4, 0.7);
        let var = |shape: &[usize]| {
            Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev).unwrap()).unwrap()
        };
        let (x, a, b) = (var(&[batch, rows, d_in]), var(&[r, d_in]), var(&[d_out, r]));
        let w = Tensor::randn(0f32, 1., (d_out, d_in), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1., d_out, &dev).unwrap();
        for p in [0.3f32, 0.9] {
            let dropout = Dropout::with_seed(p, 42);
            let term = LowRankTerm {
                a: a.as_tensor(),
                b: b.as_tensor(),
                scale: s,
            };
            let product = Product {
                weight: WeightRef::Float(&w),
                bias: Some(&bias),
                low_rank: Some(term),
                row_scale: None,
            };
            let fused = product
                .forward_fused(x.as_tensor(), false, Some(dropout))
                .unwrap();
            let keep = dropout.factors(batch * rows * d_in);
            let keep = Tensor::from_vec(keep, x.shape(), &dev).unwrap();
            let dropped = (x.as_tensor() * keep).unwrap();
            let flat = |t: &Tensor| t.reshape((batch * rows, d_in)).unwrap();
            let base = matmul(&flat(x.as_tensor()), &w.t().unwrap()).unwrap();
            let low = matmul(
                &matmul(&flat(&dropped), &a.as_tensor().t().unwrap()).unwrap(),
                &b.as_tensor().t().unwrap(),
            )
            .unwrap();
            let reference = (base + (low * s).unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap()
                .reshape((batch, rows, d_out))
                .unwrap();
            let inputs = [
                ("x", x.as_tensor()),
                ("A", a.as_tensor()),
                ("B", b.as_tensor()),
            ];
            assert_same_op(&fused, &reference, &inputs, 1e-5, &format!("p {p}"));
        }
        // A trainable bias is added outside the op; the dropout still applies inside.
        let trained_bias = Var::from_tensor(&bias).unwrap();
        let product = Product {
            weight: WeightRef::Float(&w),
            bias: Some(trained_bias.as_tensor()),
            low_rank: Some(LowRankTerm {
                a: a.as_tensor(),
                b: b.as_tensor(),
                scale: s,
            }),
            row_scale: None,
        };
        let plain = product.forward_dropped(x.as_tensor(), 0.0).unwrap();
        let dropped = product.forward_dropped(x.as_tensor(), 0.5).unwrap();
        let differ = (plain - dropped).unwrap().abs().unwrap().max_all().unwrap();
        assert!(differ.to_scalar::<f32>().unwrap() > 1e-3);
    }
}
