//! The low-rank pair `(A, B)` shared by the LoRA-family layers, how its factors are
//! created as trainable variables through a `VarBuilder`, and the forward every low-rank
//! variant without a row scale shares ([`low_rank_forward`]).

use candle_core::{DType, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::adapter::{NamedVar, ParamRole};
use crate::error::{Error, Result};
use crate::frozen::FrozenLinear;
use crate::kernels::{LowRankTerm, Product};
use crate::validate;

/// `B A` of two factors (a layer's weight change before its scale), computed in the
/// compute dtype ([`crate::kernels::compute_dtype`]: f32 for f16 / bf16 on the CPU) and
/// returned in `dtype`.
///
/// The factors may be strided views (one expert's columns of a stacked `lora_B`,
/// `crate::model::ParameterLora`): `crate::matmul` copies those that a BLAS-backed or GPU
/// matmul would refuse.
pub(crate) fn factor_product(b: &Tensor, a: &Tensor, dtype: DType) -> Result<Tensor> {
    let compute = crate::kernels::compute_dtype(dtype, a.device());
    let product = crate::matmul::matmul(&b.to_dtype(compute)?, &a.to_dtype(compute)?)?;
    Ok(product.to_dtype(dtype)?)
}

/// One factor of a low-rank pair: trained (a `Var`) or frozen (a constant).
#[derive(Clone, Debug)]
pub enum Factor {
    /// Receives gradients and optimizer updates.
    Trainable(Var),
    /// A constant: no gradient, no optimizer state (LoRA-FA's A).
    Frozen(Tensor),
}

impl Factor {
    /// The factor's current value.
    pub fn tensor(&self) -> &Tensor {
        match self {
            Factor::Trainable(v) => v.as_tensor(),
            Factor::Frozen(t) => t,
        }
    }

    /// The variable, when trainable.
    pub fn var(&self) -> Option<&Var> {
        match self {
            Factor::Trainable(v) => Some(v),
            Factor::Frozen(_) => None,
        }
    }
}

/// `A` (`r × d_in`) and `B` (`d_out × r`).
#[derive(Clone, Debug)]
pub struct LowRankPair {
    /// Down projection.
    pub a: Factor,
    /// Up projection.
    pub b: Factor,
}

impl LowRankPair {
    /// The rank `r` (A's first dimension; 0 if A is a scalar).
    pub fn rank(&self) -> usize {
        self.a.tensor().dims().first().copied().unwrap_or(0)
    }

    /// `B A`, `(d_out, d_in)`, computed in f32 for half-precision factors and returned in
    /// the factors' dtype (a strided factor, a view into a stacked
    /// tensor, is copied only where a BLAS-backed or GPU matmul would refuse it).
    pub fn product(&self) -> Result<Tensor> {
        let a = self.a.tensor();
        factor_product(self.b.tensor(), a, a.dtype())
    }

    /// The trainable factors as named vars (`lora_A`, `lora_B`).
    pub fn named_vars(&self) -> Vec<NamedVar> {
        let mut out = Vec::with_capacity(2);
        if let Some(v) = self.a.var() {
            out.push(NamedVar {
                name: "lora_A".into(),
                role: ParamRole::LowRankA,
                var: v.clone(),
            });
        }
        if let Some(v) = self.b.var() {
            out.push(NamedVar {
                name: "lora_B".into(),
                role: ParamRole::LowRankB,
                var: v.clone(),
            });
        }
        out
    }

    /// Both factors under PEFT's names (`lora_A.weight`, `lora_B.weight`).
    pub fn tensors_to_save(&self) -> Vec<(String, Tensor)> {
        vec![
            ("lora_A.weight".into(), self.a.tensor().clone()),
            ("lora_B.weight".into(), self.b.tensor().clone()),
        ]
    }
}

/// Checks that `pair` fits `base`: A `(r, d_in)`, B `(d_out, r)`, same dtype and device.
pub(crate) fn check_pair(name: &str, base: &FrozenLinear, pair: &LowRankPair) -> Result<()> {
    let (a, b) = (pair.a.tensor(), pair.b.tensor());
    let r = a.dims().first().copied().unwrap_or(0);
    validate::rank(name, r)?;
    validate::shape(name, "lora_A", a, &[r, base.d_in()])?;
    validate::shape(name, "lora_B", b, &[base.d_out(), r])?;
    validate::dtype_device(name, "lora_A", a, base.dtype(), base.device())?;
    validate::dtype_device(name, "lora_B", b, base.dtype(), base.device())
}

/// Creates (or fetches) the variable `name` through `vb` and sets it to `init`.
///
/// Over a `VarMap` the variable is registered there (so `varmap.all_vars()` trains it) and
/// set to `init`; a variable already registered under that name is an error (two layers
/// built under one prefix would otherwise share it and re-initialise it). Over a backend of
/// loaded tensors, the loaded value is kept and wrapped in a fresh `Var`.
pub fn trainable_var(vb: &VarBuilder, name: &str, init: &Tensor) -> Result<Var> {
    let existed = vb.contains_tensor(name);
    let t = vb.get_with_hints_dtype(init.shape(), name, Init::Const(0.0), init.dtype())?;
    if t.is_variable() {
        if existed {
            let path = match vb.prefix() {
                p if p.is_empty() => name.to_string(),
                p => format!("{p}.{name}"),
            };
            return Err(Error::layer_config(
                vb.prefix(),
                "VarBuilder prefix",
                format!(
                    "the variable `{path}` already exists: another layer was built under the \
                     same prefix (give each layer its own `vb.pp(name)`)"
                ),
            ));
        }
        let var = Var::from_tensor(&t)?;
        var.set(init)?;
        Ok(var)
    } else {
        Ok(Var::from_tensor(&t)?)
    }
}

/// `x Wᵀ + b + s · (drop(x) A_effᵀ) B_effᵀ`, with dropout (probability `dropout`) only when
/// `train` is set: one fused product ([`crate::kernels::FusedLinear`]'s, over a float or
/// quantized `W`), which on the CPU draws the dropout inside it too.
pub fn low_rank_forward(
    base: &FrozenLinear,
    term: LowRankTerm<'_>,
    dropout: f64,
    x: &Tensor,
    train: bool,
) -> Result<Tensor> {
    Product {
        weight: base.weight_ref(),
        bias: base.bias(),
        low_rank: Some(term),
        row_scale: None,
    }
    .forward_dropped(x, if train { dropout } else { 0.0 })
}
