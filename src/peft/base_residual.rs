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
//!   `f64`, the top-`r` singular subspace by a block subspace iteration on `Wᵀ W` (block
//!   `2r + 8`, Chebyshev-filtered, Rayleigh–Ritz each step) until it moves less than 1e-10,
//!   or, when that block covers the smaller side, from the eigen-decomposition of `W Wᵀ`
//!   (or `Wᵀ W`). On 1024 × 768 and 512 × 2048 matrices (r = 16) the result was within
//!   4e-8 of `f64` LAPACK's (relative to the largest entry: the `f32` rounding of the
//!   output), where PEFT's own `f32` SVD was 5–7e-6 from it. A residual is refused where it
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
//! model's, and computed on the host (a base on a GPU is copied there and back). An
//! embedding's table is left as it is (PEFT's embedding layers draw their factors without
//! touching the table); a quantized base is refused.
//!
//! The residual belongs to the adapter's layer: disabling that layer runs the residual,
//! as PEFT's `disable_adapter()` does. Beside other adapters
//! ([`NamedAdapters`](crate::model::NamedAdapters)) it differs from PEFT, which changes
//! the model's one shared base (and warns against combining such an adapter with others):
//! there the other adapters, and the model with every adapter disabled, keep the original
//! base weights.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};
use crate::frozen::{BaseKind, FrozenLinear};
use crate::linalg::{dot, orthonormalize, symmetric_eigen};
use crate::matmul::matmul;

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
/// The subspace iteration has settled when the top-`r` subspace moves less than this
/// (the Frobenius norm of its part outside the previous one).
const SETTLED: f64 = 1e-10;
const MAX_ITERATIONS: usize = 1000;
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
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .contiguous()?;
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

fn refused(layer: &str, init: BaseResidual, reason: String) -> Error {
    Error::layer_config(
        layer.to_string(),
        "init_lora_weights",
        format!("\"{}\": {reason}", init.name()),
    )
}

/// `w − U_r U_rᵀ w` for `w`'s top-`r` left singular vectors `U_r` (`w` in `f64`, `m × n`).
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
    let block = (2 * r + 8).min(smaller);
    let (u, sigma_squared) = if block == smaller {
        top_by_gram(w, r)?
    } else {
        top_by_iteration(layer, w, r, block)?
    };
    let sigma = |i: usize| sigma_squared.get(i).map_or(0.0, |&v| v.max(0.0).sqrt());
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
    let u = from_columns(&u, m)?;
    let projection = matmul(&u, &matmul(&u.t()?, w)?)?;
    Ok((w - projection)?)
}

/// The top-`r` left singular vectors of `w` and all its squared singular values (descending),
/// from the eigen-decomposition of the smaller Gram matrix.
fn top_by_gram(w: &Tensor, r: usize) -> Result<(Vec<Vec<f64>>, Vec<f64>)> {
    let (m, n) = w.dims2()?;
    let left = m <= n;
    let gram = if left {
        matmul(w, &w.t()?)?
    } else {
        matmul(&w.t()?, w)?
    };
    let size = m.min(n);
    let pairs = symmetric_eigen(&gram.flatten_all()?.to_vec1::<f64>()?, size);
    let values = pairs.iter().map(|(v, _)| *v).collect();
    let top: Vec<Vec<f64>> = pairs.into_iter().take(r).map(|(_, v)| v).collect();
    if left {
        return Ok((top, values));
    }
    // Right singular vectors V_r: U_r spans w V_r (a zero column there is a zero singular
    // value, whose direction w has nothing in).
    let mut u = columns(&matmul(w, &from_columns(&top, n)?)?)?;
    orthonormalize(&mut u);
    Ok((u, values))
}

/// The top-`r` left singular vectors of `w` and the squared singular values of the top
/// `block`, by subspace iteration on `Wᵀ W` with Rayleigh–Ritz on `block` vectors, each
/// step a Chebyshev filter that damps the spectrum below the block's smallest Ritz value
/// (fewer products than plain powers where the singular values near `r` are close).
fn top_by_iteration(
    layer: &str,
    w: &Tensor,
    r: usize,
    block: usize,
) -> Result<(Vec<Vec<f64>>, Vec<f64>)> {
    let (_, n) = w.dims2()?;
    let wt = w.t()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut q: Vec<Vec<f64>> = vec![Vec::new(); block];
    orthonormal_block(&mut q, n, &mut rng);
    let mut previous: Option<Vec<Vec<f64>>> = None;
    for _ in 0..MAX_ITERATIONS {
        // Rayleigh–Ritz: the eigenpairs of Qᵀ Wᵀ W Q, Ritz vectors Q E.
        let q_t = from_columns(&q, n)?;
        let wq = matmul(w, &q_t)?;
        let ritz = matmul(&wq.t()?, &wq)?;
        let pairs = symmetric_eigen(&ritz.flatten_all()?.to_vec1::<f64>()?, block);
        let rotated: Vec<Vec<f64>> = pairs.iter().map(|(_, e)| combine(&q, e, n)).collect();
        let values: Vec<f64> = pairs.iter().map(|(v, _)| *v).collect();
        // Directions of (next to) zero singular values hold nothing of `w` and need not
        // settle: a weight of rank below `r` has no determined top-`r` subspace, but its
        // residual is determined all the same.
        let largest = values.first().copied().unwrap_or(0.0);
        let significant = values
            .iter()
            .take(r)
            .filter(|&&v| v > GAP * GAP * largest)
            .count();
        let top = rotated.get(..significant).unwrap_or_default();
        let settled = previous
            .as_ref()
            .is_some_and(|p| p.len() == significant && distance(p, top) < SETTLED);
        if settled {
            let right = rotated.get(..r).unwrap_or_default();
            let mut left = columns(&matmul(w, &from_columns(right, n)?)?)?;
            orthonormalize(&mut left);
            return Ok((left, values));
        }
        previous = Some(top.to_vec());
        let cut = values.last().copied().unwrap_or(0.0);
        let kept = values.get(r.saturating_sub(1)).copied().unwrap_or(0.0);
        let degree = filter_degree(largest, kept, cut);
        let filtered = chebyshev_filter(w, &wt, &from_columns(&rotated, n)?, degree, cut)?;
        q = columns(&filtered)?;
        orthonormal_block(&mut q, n, &mut rng);
    }
    Err(refused(
        layer,
        BaseResidual::Pissa,
        format!(
            "the top-{r} singular subspace of the base weight did not settle in \
             {MAX_ITERATIONS} iterations (singular values {r} and {} too close): its \
             residual is not determined",
            r + 1
        ),
    ))
}

/// The highest filter degree.
const MAX_DEGREE: usize = 16;
/// How much more a filter may amplify the largest eigenvalue than the `r`-th: beyond
/// this the `r`-th direction loses digits to rounding in the filtered block.
const MAX_SPREAD: f64 = 1e4;

/// The Chebyshev polynomial `T_d(x)` for `x ≥ 1`.
fn chebyshev(d: usize, x: f64) -> f64 {
    (d as f64 * x.max(1.0).acosh()).cosh()
}

/// The highest degree (up to [`MAX_DEGREE`], at least 1) whose filter over `[0, cut]`
/// amplifies the eigenvalue `largest` at most [`MAX_SPREAD`] times more than `kept`, and
/// at most 1e100 times in all (a cut far below the top, as for a weight of low rank,
/// would otherwise overflow).
fn filter_degree(largest: f64, kept: f64, cut: f64) -> usize {
    if cut <= 0.0 || kept <= cut {
        return 1;
    }
    let x = |lambda: f64| 2.0 * lambda / cut - 1.0;
    (1..=MAX_DEGREE)
        .take_while(|&d| {
            let top = chebyshev(d, x(largest));
            top <= 1e100 && top <= MAX_SPREAD * chebyshev(d, x(kept))
        })
        .last()
        .unwrap_or(1)
}

/// `T_d((2 Wᵀ W − cut) / cut) q`: the Chebyshev polynomial that stays within ±1 over the
/// damped eigenvalues `[0, cut]` and grows fast above it, by its three-term recurrence.
fn chebyshev_filter(
    w: &Tensor,
    wt: &Tensor,
    q: &Tensor,
    degree: usize,
    cut: f64,
) -> Result<Tensor> {
    if cut <= 0.0 {
        return Ok(matmul(wt, &matmul(w, q)?)?);
    }
    let half = cut / 2.0;
    // (A − half·I) y / half, A = Wᵀ W.
    let step = |y: &Tensor| -> Result<Tensor> {
        let ay = matmul(wt, &matmul(w, y)?)?;
        Ok(((ay - (y * half)?)? / half)?)
    };
    let mut before = q.clone();
    let mut current = step(q)?;
    for _ in 1..degree {
        let next = ((step(&current)? * 2.0)? - &before)?;
        before = current;
        current = next;
    }
    Ok(current)
}

/// Orthonormalizes `block` (vectors of length `len`), replacing a vector that is empty or
/// (nearly) dependent on the ones before it by a random one, until all are independent.
fn orthonormal_block(block: &mut [Vec<f64>], len: usize, rng: &mut impl rand::Rng) {
    // Each round replaces the dependent vectors; random ones are independent of up to
    // `len` others with probability 1, so a second round is already rare.
    for _round in 0..8 {
        let kept = orthonormalize(block);
        let mut redrawn = false;
        for (vector, kept) in block.iter_mut().zip(kept) {
            if kept < DEPENDENT || vector.len() != len {
                *vector = (0..len).map(|_| StandardNormal.sample(&mut *rng)).collect();
                redrawn = true;
            }
        }
        if !redrawn {
            return;
        }
    }
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
    let q = from_columns(&q, m)?;
    let projection = matmul(&q, &matmul(&q.t()?, w)?)?;
    Ok((w - (projection * scale)?)?)
}

/// The columns of the `f64` matrix `t`.
fn columns(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.t()?.contiguous()?.to_vec2::<f64>()?)
}

/// The `rows × columns.len()` `f64` matrix with these columns.
fn from_columns(columns: &[Vec<f64>], rows: usize) -> Result<Tensor> {
    let flat: Vec<f64> = columns.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (columns.len(), rows), &Device::Cpu)?
        .t()?
        .contiguous()?)
}

/// `Σ_j coefficients_j · basis_j` (vectors of length `len`).
fn combine(basis: &[Vec<f64>], coefficients: &[f64], len: usize) -> Vec<f64> {
    let mut out = vec![0f64; len];
    for (b, &c) in basis.iter().zip(coefficients) {
        out.iter_mut().zip(b).for_each(|(o, x)| *o += c * x);
    }
    out
}

/// `‖U − P Pᵀ U‖_F` for orthonormal columns `P` and `U`: how far `U`'s span leaves `P`'s.
fn distance(p: &[Vec<f64>], u: &[Vec<f64>]) -> f64 {
    u.iter()
        .map(|column| {
            let mut outside = column.clone();
            for basis in p {
                let along = dot(basis, column);
                outside
                    .iter_mut()
                    .zip(basis)
                    .for_each(|(o, b)| *o -= along * b);
            }
            dot(&outside, &outside)
        })
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

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
}
