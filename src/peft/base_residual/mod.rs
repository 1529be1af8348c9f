//! PEFT's inits that replace each targeted base weight by a residual when the adapter is
//! built or loaded (`init_lora_weights` `"pissa"`, `"olora"`), computed as PEFT computes
//! them so that a saved adapter of either kind gives PEFT's outputs.
//!
//! PEFT runs the init again in `PeftModel.from_pretrained`: it takes the top-`r` part out
//! of the base weight (and draws A and B from it, which the file's A and B then replace).
//! The trained A and B only make sense on that residual, so lorakit recomputes it for
//! every targeted linear (and Conv1D) module when it builds the module from the adapter:
//!
//! - **PiSSA**: `W − U_r Σ_r V_rᵀ`, the part of `W` outside its `r` largest singular
//!   values. PEFT's `torch.linalg.svd` runs in `f32`; lorakit computes the residual in
//!   `f64`, the top-`r` singular subspace of the smaller side (`top_singular`) by a block
//!   subspace iteration on the smaller Gram matrix (block `2r + 8`, Chebyshev-filtered, in
//!   `f32` while far from settled, Rayleigh–Ritz in `f64` each step) until it is predicted
//!   within 1e-10 of where it converges, or, when that block covers the smaller side, from
//!   the Gram matrix's eigen-decomposition. On 1024 × 768 to 2048 × 2048 matrices (r = 16
//!   and 128) the result was within 5e-8 of `f64` LAPACK's (relative to the largest entry:
//!   the `f32` rounding of the output), where PEFT's own `f32` SVD was 5e-6–2.2e-5 from it
//!   (`benches/pissa_compare.py`). Where `σ_r` and `σ_{r+1}` nearly meet, PEFT's `f32`
//!   SVD is further off: on a random 1 GB Llama's `gate_proj` (2816 × 1024, r = 16, the
//!   two 2.6e-5 of `σ_1` apart) its merged weight was 1.5e-3 from the one of an `f64` SVD,
//!   lorakit's 6.8e-8 (`benches/merge_compare.py --pissa`). A residual is refused where it
//!   is not determined: `σ_r` and `σ_{r+1}` equal (to 1e-6 of `σ_1`), or an iteration that
//!   does not settle in 1000 steps. `"pissa_niter_N"` (a randomized SVD that PEFT itself
//!   draws anew on every load) is refused by the config check
//!   ([`lora_extensions`](super::lora_extensions)).
//! - **OLoRA**: `W − s · Q_r R_r` from `W`'s QR decomposition, where `Q_r R_r = Q_r Q_rᵀ W`
//!   is `W` projected on the span of its first `r` columns; `s` is the module's LoRA scale.
//!   Computed in `f64` from those columns, refused when they are linearly dependent (then
//!   QR's `Q_r` is not determined). PEFT runs it on the weight as stored: a Conv1D
//!   (`fan_in_fan_out`) module's `(d_in, d_out)` matrix, where its factors have the wrong
//!   shapes unless it is square; a non-square one is refused.
//!
//! The residual is rounded to the base's dtype, as PEFT rounds its `f32` result to the
//! model's, or to the dtype the base keeps its weight in where it computes in another (a
//! bf16 checkpoint merged in f32 by `lorakit merge`: `FrozenLinear::kept_in`). Its products
//! with the weight run on the base's device (the CPU or CUDA, in
//! `f64`; a base on Metal, which has no `f64`, is copied to the host and back); the small
//! dense algebra between them (the Ritz or Gram matrix's eigen-decomposition, Gram–Schmidt
//! inside a panel of vectors) runs on the host. The CUDA path is the same candle ops as
//! the CPU's; `tests/cuda` checks it against the CPU, but no GPU has run that test yet. An
//! embedding's table is left as it is (PEFT's embedding layers draw their factors without
//! touching the table); a quantized base is refused.
//!
//! The residual belongs to the adapter's layer: disabling that layer runs the residual,
//! as PEFT's `disable_adapter()` does. Beside other adapters
//! ([`NamedAdapters`](crate::model::NamedAdapters)) it differs from PEFT, which changes
//! the model's one shared base (and warns against combining such an adapter with others):
//! there the other adapters, and the model with every adapter disabled, keep the original
//! base weights.

mod top_singular;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::frozen::{BaseKind, FrozenLinear};
use crate::linalg::orthonormalize;
use crate::matmul::matmul;
use top_singular::top_singular;

/// An init after which PEFT's base weights are a residual (see the module docs).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lorakit::frozen::FrozenLinear;
/// use lorakit::peft::BaseResidual;
/// # fn main() -> lorakit::Result<()> {
/// let w = Tensor::new(&[[3f32, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]], &Device::Cpu)?;
/// // PiSSA at r = 1 takes out the largest singular triplet: 3 at (0, 0).
/// let base = BaseResidual::Pissa.apply("fc", FrozenLinear::new(w.clone(), None)?, 1, 2.0)?;
/// assert_eq!(base.weight().to_vec2::<f32>()?, [[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]);
/// // OLoRA at r = 1, scale 0.5: W less half its projection on its first column.
/// let base = BaseResidual::Olora.apply("fc", FrozenLinear::new(w, None)?, 1, 0.5)?;
/// assert_eq!(base.weight().to_vec2::<f32>()?[0], [1.5, 0.0, 0.0]);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseResidual {
    /// PiSSA (`init_lora_weights = "pissa"`).
    Pissa,
    /// OLoRA (`init_lora_weights = "olora"`).
    Olora,
}

/// Singular values closer than this, relative to the largest, leave PiSSA's residual
/// undetermined.
const GAP: f64 = 1e-6;
/// A column whose norm falls below this fraction of itself when the earlier ones are
/// taken out is treated as dependent on them.
const DEPENDENT: f64 = 1e-10;

impl BaseResidual {
    /// PEFT's name of the init.
    pub fn name(self) -> &'static str {
        match self {
            BaseResidual::Pissa => "pissa",
            BaseResidual::Olora => "olora",
        }
    }

    /// `base` with its weight replaced by the residual PEFT leaves for a LoRA of rank `r`
    /// and scale `scale` on it; an embedding is returned as it is. `layer` names the module
    /// in errors.
    pub fn apply(
        self,
        layer: &str,
        base: FrozenLinear,
        r: usize,
        scale: f64,
    ) -> Result<FrozenLinear> {
        if base.kind() == BaseKind::Embedding {
            return Ok(base);
        }
        let operation = format!("init_lora_weights \"{}\" (its residual)", self.name());
        let weight = base.float_weight(layer, &operation)?;
        let stored = if base.kind().stores_in_out() {
            weight.t()?
        } else {
            weight.clone()
        };
        let stored = stored
            .to_device(&residual_device(weight.device()))?
            .to_dtype(DType::F64)?
            .contiguous()?;
        // Not determined: PEFT's SVD (PiSSA) refuses such a weight, its QR (OLoRA) gives NaN.
        // Here PiSSA's would come out NaN and OLoRA's arbitrary, without a word.
        if !stored.sqr()?.sum_all()?.to_scalar::<f64>()?.is_finite() {
            return Err(refused(
                layer,
                self,
                "the base weight holds NaN or infinite values, so its residual is not \
                 determined"
                    .to_string(),
            ));
        }
        let residual = match self {
            BaseResidual::Pissa => pissa_residual(layer, &stored, r)?,
            BaseResidual::Olora => {
                let (rows, cols) = stored.dims2()?;
                if base.kind() == BaseKind::Conv1D && rows != cols {
                    return Err(refused(
                        layer,
                        self,
                        format!(
                            "on a Conv1D (fan_in_fan_out) weight PEFT factors the stored \
                             ({rows}, {cols}) matrix, which gives A and B the wrong shapes \
                             unless it is square"
                        ),
                    ));
                }
                olora_residual(layer, &stored, r, scale)?
            }
        };
        base.with_stored_weight(layer, &residual)
    }
}

/// Where a residual is computed for a base on `device`: there, where the backend has
/// `f64` (the CPU, CUDA); on the host for Metal, which has none.
fn residual_device(device: &Device) -> Device {
    if device.is_metal() {
        Device::Cpu
    } else {
        device.clone()
    }
}

fn refused(layer: &str, init: BaseResidual, reason: String) -> Error {
    Error::layer_config(
        layer.to_string(),
        "init_lora_weights",
        format!("\"{}\": {reason}", init.name()),
    )
}

/// `w` without its top-`r` singular triplets (`w` in `f64`, `m × n`).
fn pissa_residual(layer: &str, w: &Tensor, r: usize) -> Result<Tensor> {
    let (m, n) = w.dims2()?;
    let smaller = m.min(n);
    if r == 0 {
        return Ok(w.clone());
    }
    if r >= smaller {
        // Every singular triplet moves into B·A.
        return Ok(w.zeros_like()?);
    }
    // Work on the smaller side: `x` is `w` or `wᵀ`, whichever has fewer columns, so the
    // singular vectors sought (x's right ones) and the Gram matrix `xᵀ x` are smallest.
    let transposed = m < n;
    let x = if transposed {
        w.t()?.contiguous()?
    } else {
        w.clone()
    };
    let top = top_singular(layer, &x, r)?;
    let sigma = |i: usize| top.sigma_squared.get(i).map_or(0.0, |&v| v.max(0.0).sqrt());
    let (first, last_kept, next) = (sigma(0), sigma(r.saturating_sub(1)), sigma(r));
    if last_kept > GAP * first && last_kept - next <= GAP * first {
        return Err(refused(
            layer,
            BaseResidual::Pissa,
            format!(
                "singular values {r} and {} of the base weight are equal to 1e-6 of the \
                 largest ({last_kept:.6e} and {next:.6e}), so the residual of the top {r} \
                 is not determined (PEFT's SVD picks one by rounding)",
                r + 1
            ),
        ));
    }
    // x − (x V_r) V_rᵀ: x less its projection on its top-r right singular vectors.
    let residual = (&x - matmul(&top.products, &top.vectors.t()?)?)?;
    Ok(if transposed {
        residual.t()?.contiguous()?
    } else {
        residual
    })
}

/// `w − s · Q_r Q_rᵀ w`, `Q_r` an orthonormal basis of `w`'s first `r` columns.
fn olora_residual(layer: &str, w: &Tensor, r: usize, scale: f64) -> Result<Tensor> {
    let (m, n) = w.dims2()?;
    let mut q = columns(&w.narrow(1, 0, r.min(m).min(n))?)?;
    if orthonormalize(&mut q).iter().any(|&kept| kept < DEPENDENT) {
        return Err(refused(
            layer,
            BaseResidual::Olora,
            format!(
                "the first {r} columns of the base weight are linearly dependent, so QR's \
                 Q_r (and the residual) is not determined"
            ),
        ));
    }
    let q = from_columns(&q, m, w.device())?;
    let projection = matmul(&q, &matmul(&q.t()?, w)?)?;
    Ok((w - (projection * scale)?)?)
}

/// The columns of the `f64` matrix `t`.
fn columns(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.t()?.contiguous()?.to_vec2::<f64>()?)
}

/// The `rows × columns.len()` `f64` matrix with these columns, on `device`.
fn from_columns(columns: &[Vec<f64>], rows: usize, device: &Device) -> Result<Tensor> {
    let flat: Vec<f64> = columns.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (columns.len(), rows), device)?
        .t()?
        .contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    /// `count` orthonormal vectors of length `len`, from a seeded draw.
    fn orthonormal(len: usize, count: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut v: Vec<Vec<f64>> = (0..count)
            .map(|_| (0..len).map(|_| StandardNormal.sample(&mut rng)).collect())
            .collect();
        orthonormalize(&mut v);
        v
    }

    /// `Σ σ_i u_i v_iᵀ` over the given triplets, `m × n`.
    fn from_triplets(u: &[Vec<f64>], sigma: &[f64], v: &[Vec<f64>], m: usize, n: usize) -> Tensor {
        let mut w = vec![0f64; m * n];
        for ((u, s), v) in u.iter().zip(sigma).zip(v) {
            for i in 0..m {
                for j in 0..n {
                    w[i * n + j] += s * u[i] * v[j];
                }
            }
        }
        Tensor::from_vec(w, (m, n), &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// A weight built from known singular triplets: its residual is the triplets past the
    /// first `r`, on both routes (the Gram matrix for a side within the block, the subspace
    /// iteration beyond) and both orientations, full rank or not.
    #[test]
    fn pissa_residual_is_the_triplets_past_r() {
        // The last: singular values 1% apart, where the iteration takes many steps.
        for (m, n, r, rank, decay) in [
            (7, 10, 2, 7, 0.8f64),
            (10, 7, 2, 7, 0.8),
            (60, 40, 3, 40, 0.8),
            (40, 60, 3, 40, 0.8),
            (60, 40, 3, 5, 0.8),
            (60, 40, 3, 2, 0.8),
            (200, 150, 4, 150, 0.99),
        ] {
            let u = orthonormal(m, rank, 1);
            let v = orthonormal(n, rank, 2);
            let sigma: Vec<f64> = (0..rank).map(|i| 10.0 * decay.powi(i as i32)).collect();
            let w = from_triplets(&u, &sigma, &v, m, n);
            let keep = r.min(rank);
            let want = from_triplets(&u[keep..], &sigma[keep..], &v[keep..], m, n);
            let got = pissa_residual("layer", &w, r)
                .unwrap_or_else(|e| panic!("{m}x{n} r {r} rank {rank}: {e}"));
            let err = max_abs_diff(&got, &want);
            assert!(err < 1e-10, "{m}x{n} r {r} rank {rank}: {err:e}");
        }
    }

    /// Equal singular values at `r` and `r + 1` leave the residual undetermined: refused on
    /// both routes, naming the module and the init.
    #[test]
    fn pissa_refuses_a_tie_at_r() {
        for (m, n) in [(8, 6), (50, 40)] {
            let k = m.min(n);
            let sigma: Vec<f64> = (0..k)
                .map(|i| {
                    [5.0, 3.0, 3.0]
                        .get(i)
                        .copied()
                        .unwrap_or(1.0 / (i + 1) as f64)
                })
                .collect();
            let w = from_triplets(&orthonormal(m, k, 3), &sigma, &orthonormal(n, k, 4), m, n);
            let err = pissa_residual("model.q_proj", &w, 2)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("model.q_proj")
                    && err.contains("pissa")
                    && err.contains("not determined"),
                "{m}x{n}: {err}"
            );
        }
    }

    /// OLoRA's residual against the projection written with the normal equations,
    /// `C (CᵀC)⁻¹ Cᵀ W` for the first `r` columns `C`.
    #[test]
    fn olora_residual_matches_the_normal_equations() {
        for (m, n, r) in [(12, 9, 3), (9, 12, 4), (6, 6, 8)] {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
            let values: Vec<f64> = (0..m * n)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            let w = Tensor::from_vec(values, (m, n), &Device::Cpu).unwrap();
            let scale = 0.75;
            let got = olora_residual("layer", &w, r, scale).unwrap();
            let c = w.narrow(1, 0, r.min(m).min(n)).unwrap();
            let gram = matmul(&c.t().unwrap(), &c).unwrap();
            let rhs = matmul(&c.t().unwrap(), &w).unwrap();
            let k = gram.dim(0).unwrap();
            let mut values = gram.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let inverse = crate::linalg::invert(&mut values, k).unwrap();
            let inverse = Tensor::from_vec(inverse, (k, k), &Device::Cpu).unwrap();
            let x = matmul(&inverse, &rhs).unwrap();
            let want = (&w - (matmul(&c, &x).unwrap() * scale).unwrap()).unwrap();
            let err = max_abs_diff(&got, &want);
            assert!(err < 1e-12, "{m}x{n} r {r}: {err:e}");
        }
    }

    #[test]
    fn olora_refuses_dependent_leading_columns() {
        let w = Tensor::new(
            &[[1f64, 2.0, 0.5], [2.0, 4.0, 1.0], [0.0, 0.0, 3.0]],
            &Device::Cpu,
        )
        .unwrap();
        let err = olora_residual("model.v_proj", &w, 2, 1.0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.v_proj") && err.contains("linearly dependent"),
            "{err}"
        );
    }

    /// `apply` keeps an embedding's table, writes a Conv1D's residual in its stored layout,
    /// refuses OLoRA on a non-square Conv1D and a quantized base, and rounds to the base's
    /// dtype.
    #[test]
    fn apply_follows_the_module_kind() {
        let dev = Device::Cpu;
        let table = Tensor::randn(0f32, 1.0, (10, 4), &dev).unwrap();
        let embedding = FrozenLinear::embedding(table.clone()).unwrap();
        let kept = BaseResidual::Pissa.apply("wte", embedding, 2, 1.0).unwrap();
        assert_eq!(
            max_abs_diff(
                &kept.stored_weight().unwrap().to_dtype(DType::F64).unwrap(),
                &table.to_dtype(DType::F64).unwrap()
            ),
            0.0
        );

        let stored = Tensor::randn(0f32, 1.0, (6, 6), &dev).unwrap();
        let conv = FrozenLinear::conv1d(stored.clone(), None).unwrap();
        let got = BaseResidual::Olora.apply("c_proj", conv, 2, 0.5).unwrap();
        let want = olora_residual("c_proj", &stored.to_dtype(DType::F64).unwrap(), 2, 0.5).unwrap();
        let got = got.stored_weight().unwrap();
        assert_eq!(got.dtype(), DType::F32);
        assert!(max_abs_diff(&got.to_dtype(DType::F64).unwrap(), &want) < 1e-6);

        let wide =
            FrozenLinear::conv1d(Tensor::randn(0f32, 1.0, (6, 9), &dev).unwrap(), None).unwrap();
        let err = BaseResidual::Olora
            .apply("c_attn", wide, 2, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("c_attn") && err.contains("square"), "{err}");

        let weight = Tensor::randn(0f32, 1.0, (32, 64), &dev).unwrap();
        let quantized = FrozenLinear::new(weight, None)
            .unwrap()
            .quantize("q_proj", GgmlDType::Q8_0)
            .unwrap();
        let err = BaseResidual::Pissa
            .apply("q_proj", quantized, 4, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("q_proj") && err.contains("quantized"), "{err}");
    }

    /// A weight with a NaN or an infinity is refused by both inits, naming the module,
    /// where the residual would otherwise come out NaN or arbitrary.
    #[test]
    fn non_finite_weights_are_refused() {
        let dev = Device::Cpu;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut values: Vec<f32> = (0..60 * 40).map(|i| (i as f32 * 0.37).sin()).collect();
            values[77] = bad;
            let w = Tensor::from_vec(values, (60, 40), &dev).unwrap();
            for init in [BaseResidual::Pissa, BaseResidual::Olora] {
                let base = FrozenLinear::new(w.clone(), None).unwrap();
                let err = init.apply("v_proj", base, 3, 1.0).unwrap_err().to_string();
                assert!(
                    err.contains("v_proj") && err.contains(init.name()) && err.contains("NaN"),
                    "{bad} {init:?}: {err}"
                );
            }
        }
    }
}
