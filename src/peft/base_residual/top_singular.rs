//! The top-`r` right singular vectors of a matrix, for PiSSA's residual: from the Gram
//! matrix's eigen-decomposition, or by a Chebyshev-filtered block subspace iteration.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::{columns, from_columns, refused, BaseResidual, DEPENDENT, GAP};
use crate::error::Result;
use crate::linalg::{dot, norm, orthonormalize, symmetric_eigen, take_out};
use crate::matmul::matmul;

/// The subspace iteration has settled when the top-`r` subspace is predicted to be this
/// close to where it converges (the Frobenius norm of its part outside that subspace; see
/// `predicted_error`).
const SETTLED: f64 = 1e-10;
const MAX_ITERATIONS: usize = 1000;
/// While the top-`r` subspace still moves more than this in a step, the Chebyshev filter
/// runs in `f32`: its rounding (about 1e-7 of each filtered column, times the filter's
/// spread) is then far below what the step has left to settle.
const COARSE_ABOVE: f64 = 0.1;

/// The top `r` of `x` (`r` below its column count): from the Gram matrix where the
/// iteration's block would cover every column, by subspace iteration otherwise.
pub(super) fn top_singular(layer: &str, x: &Tensor, r: usize) -> Result<TopSingular> {
    let (_, n) = x.dims2()?;
    let block = (2 * r + 8).min(n);
    if block == n {
        top_by_gram(x, r)
    } else {
        top_by_iteration(layer, x, r, block)
    }
}

/// What the PiSSA routes find of a matrix `x`: its top-`r` right singular vectors, `x`
/// times them, and its squared singular values (descending; as many as the route sees).
pub(super) struct TopSingular {
    /// `V_r`, `n × r`, orthonormal columns.
    pub(super) vectors: Tensor,
    /// `x V_r`, `m × r`.
    pub(super) products: Tensor,
    pub(super) sigma_squared: Vec<f64>,
}

/// The top `r` of `x` from the eigen-decomposition of its Gram matrix `xᵀ x`.
fn top_by_gram(x: &Tensor, r: usize) -> Result<TopSingular> {
    let (_, n) = x.dims2()?;
    let gram = matmul(&x.t()?, x)?;
    let pairs = symmetric_eigen(&gram.flatten_all()?.to_vec1::<f64>()?, n);
    let sigma_squared = pairs.iter().map(|(v, _)| *v).collect();
    let top: Vec<Vec<f64>> = pairs.into_iter().take(r).map(|(_, v)| v).collect();
    let vectors = from_columns(&top, n, x.device())?;
    Ok(TopSingular {
        products: matmul(x, &vectors)?,
        vectors,
        sigma_squared,
    })
}

/// The top `r` of `x` and the squared singular values of its top `block`, by subspace
/// iteration on `xᵀ x` with Rayleigh–Ritz on `block` vectors, each step a Chebyshev filter
/// that damps the spectrum below the block's smallest Ritz value (fewer products than
/// plain powers where the singular values near `r` are close). A step costs `2·degree`
/// products with `x`: the Rayleigh–Ritz product `x Q` serves the filter's first term too.
/// It has settled when the top-`r` subspace's error, as [`predicted_error`] tells it from
/// the last two steps' moves, is below [`SETTLED`].
fn top_by_iteration(layer: &str, x: &Tensor, r: usize, block: usize) -> Result<TopSingular> {
    let (_, n) = x.dims2()?;
    let xt = x.t()?;
    let coarse = x.to_dtype(DType::F32)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let start = random_block(n, block, x.device(), &mut rng)?;
    let mut q = orthonormal_block(&start, &mut rng)?;
    let mut previous: Option<Vec<Vec<f64>>> = None;
    let mut moved_before: Option<f64> = None;
    let mut filtered_precisely = true;
    for _ in 0..MAX_ITERATIONS {
        // Rayleigh–Ritz: the eigenpairs (λ, e) of Qᵀ xᵀ x Q; Ritz vectors Q E, and x Q E.
        let xq = matmul(x, &q)?;
        let ritz = matmul(&xq.t()?, &xq)?;
        let pairs = symmetric_eigen(&ritz.flatten_all()?.to_vec1::<f64>()?, block);
        let rotation: Vec<Vec<f64>> = pairs.iter().map(|(_, e)| e.clone()).collect();
        let rotation = from_columns(&rotation, block, x.device())?;
        let (ritz_vectors, ritz_products) = (matmul(&q, &rotation)?, matmul(&xq, &rotation)?);
        let values: Vec<f64> = pairs.iter().map(|(v, _)| *v).collect();
        // Directions of (next to) zero singular values hold nothing of `x` and need not
        // settle: a weight of rank below `r` has no determined top-`r` subspace, but its
        // residual is determined all the same.
        let largest = values.first().copied().unwrap_or(0.0);
        let significant = values
            .iter()
            .take(r)
            .filter(|&&v| v > GAP * GAP * largest)
            .count();
        let top = columns(&ritz_vectors.narrow(1, 0, significant)?)?;
        let moved = previous
            .as_ref()
            .filter(|p| p.len() == significant)
            .map(|p| distance(p, &top));
        // The prediction holds for a subspace that an f64 filter made: an f32 one leaves
        // rounding that no earlier move tells of. (An earlier move that includes such
        // rounding makes the predicted rate larger, which only errs on the safe side.)
        let settled = filtered_precisely
            && moved.is_some_and(|moved| predicted_error(moved, moved_before) < SETTLED);
        if settled {
            return Ok(TopSingular {
                vectors: ritz_vectors.narrow(1, 0, r)?,
                products: ritz_products.narrow(1, 0, r)?,
                sigma_squared: values,
            });
        }
        previous = Some(top);
        moved_before = moved;
        let cut = values.last().copied().unwrap_or(0.0);
        let kept = values.get(r.saturating_sub(1)).copied().unwrap_or(0.0);
        // xᵀ x Q E, the filter's first product.
        let applied = matmul(&xt, &ritz_products)?;
        // Far from settled, the filter's products run in f32 (twice as fast; the filtered
        // block is as good a start for what remains); near it, in f64.
        let far = moved.is_none_or(|moved| moved > COARSE_ABOVE);
        let degree_in = |limit| filter_degree(largest, kept, cut, limit);
        let (filter_with, degree) = match far.then(|| degree_in(MAX_AMPLIFICATION_F32)) {
            Some(Some(degree)) => (&coarse, degree),
            _ => (x, degree_in(MAX_AMPLIFICATION_F64).unwrap_or(1)),
        };
        filtered_precisely = filter_with.dtype() == DType::F64;
        let filtered = chebyshev_filter(filter_with, &ritz_vectors, &applied, degree, cut)?;
        q = orthonormal_block(&filtered, &mut rng)?;
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

/// The most a filter may amplify in `f64` and in `f32`: far below each one's largest
/// finite value, so that the recurrence's terms stay finite.
const MAX_AMPLIFICATION_F64: f64 = 1e100;
const MAX_AMPLIFICATION_F32: f64 = 1e30;

/// The highest degree (up to [`MAX_DEGREE`]) whose filter over `[0, cut]` amplifies the
/// eigenvalue `largest` at most [`MAX_SPREAD`] times more than `kept`, and at most `limit`
/// times in all (a cut far below the top, as for a weight of low rank, would otherwise
/// overflow); `None` where even degree 1 amplifies more than `limit`.
fn filter_degree(largest: f64, kept: f64, cut: f64, limit: f64) -> Option<usize> {
    let x = |lambda: f64| 2.0 * lambda / cut - 1.0;
    if cut <= 0.0 || chebyshev(1, x(largest)) > limit {
        return None;
    }
    if kept <= cut {
        return Some(1);
    }
    (1..=MAX_DEGREE)
        .take_while(|&d| {
            let top = chebyshev(d, x(largest));
            top <= limit && top <= MAX_SPREAD * chebyshev(d, x(kept))
        })
        .last()
        .or(Some(1))
}

/// How far the top-`r` subspace still is from where the iteration converges, from how
/// much it `moved` in the last step and `before` it: the step moved it by about the error
/// it had, and a linearly converging iteration takes each error down by the ratio of the
/// moves, `ρ`, so what is left is about `moved · ρ / (1 − ρ)`. Where the ratio is not
/// clearly below 1 (`ρ ≥ 1/2`, or no earlier move), the last move itself.
fn predicted_error(moved: f64, before: Option<f64>) -> f64 {
    match before {
        Some(before) if before > 0.0 && moved < before / 2.0 => {
            let rate = moved / before;
            moved * rate / (1.0 - rate)
        }
        _ => moved,
    }
}

/// `T_d((2 xᵀ x − cut) / cut) q`: the Chebyshev polynomial that stays within ±1 over the
/// damped eigenvalues `[0, cut]` and grows fast above it, by its three-term recurrence.
/// `aq` is `xᵀ x q`, already at hand from the Rayleigh–Ritz step. The recurrence runs in
/// `x`'s dtype; the result is `f64`.
fn chebyshev_filter(
    x: &Tensor,
    q: &Tensor,
    aq: &Tensor,
    degree: usize,
    cut: f64,
) -> Result<Tensor> {
    if cut <= 0.0 {
        return Ok(aq.clone());
    }
    let (xt, q, aq) = (x.t()?, q.to_dtype(x.dtype())?, aq.to_dtype(x.dtype())?);
    let (q, aq) = (&q, &aq);
    let half = cut / 2.0;
    // (A − half·I) y / half, A = xᵀ x, from y and A y.
    let step = |y: &Tensor, ay: &Tensor| -> Result<Tensor> { Ok(((ay - (y * half)?)? / half)?) };
    let mut before = q.clone();
    let mut current = step(q, aq)?;
    for _ in 1..degree {
        let applied = matmul(&xt, &matmul(x, &current)?)?;
        let next = ((step(&current, &applied)? * 2.0)? - &before)?;
        before = current;
        current = next;
    }
    Ok(current.to_dtype(DType::F64)?)
}

/// Columns per panel of [`orthonormal_block`]: enough for its products to run as matrix
/// products, few enough that the Gram–Schmidt inside a panel stays small.
const PANEL: usize = 32;

/// An orthonormal basis of the columns of `y` (`n × b`, `f64`), in order: each panel of
/// [`PANEL`] columns has the earlier panels' span taken out twice by matrix products
/// (block classical Gram–Schmidt, whose second pass removes what rounding left), then is
/// orthonormalized inside by [`orthonormalize`]. A column (nearly) dependent on the
/// columns before it is replaced by a random one and its panel redone; random columns are
/// independent of up to `n` others with probability 1, so a second round is already rare.
fn orthonormal_block(y: &Tensor, rng: &mut impl rand::Rng) -> Result<Tensor> {
    let (n, b) = y.dims2()?;
    let mut basis: Option<Tensor> = None;
    for start in (0..b).step_by(PANEL) {
        let width = PANEL.min(b - start);
        let mut panel = columns(&y.narrow(1, start, width)?)?;
        let mut rounds_left = 8;
        let orthonormal = loop {
            let before: Vec<f64> = panel.iter().map(|c| norm(c)).collect();
            let mut projected = from_columns(&panel, n, y.device())?;
            if let Some(q) = &basis {
                for _pass in 0..2 {
                    projected = (&projected - matmul(q, &matmul(&q.t()?, &projected)?)?)?;
                }
            }
            let mut result = columns(&projected)?;
            let between: Vec<f64> = result.iter().map(|c| norm(c)).collect();
            let within = orthonormalize(&mut result);
            rounds_left -= 1;
            let mut redrawn = false;
            for ((column, before), (between, within)) in panel
                .iter_mut()
                .zip(before)
                .zip(between.into_iter().zip(within))
            {
                if before == 0.0 || between * within < DEPENDENT * before {
                    *column = (0..n).map(|_| StandardNormal.sample(&mut *rng)).collect();
                    redrawn = true;
                }
            }
            if !redrawn || rounds_left == 0 {
                break from_columns(&result, n, y.device())?;
            }
        };
        basis = Some(match basis {
            Some(q) => Tensor::cat(&[q, orthonormal], 1)?,
            None => orthonormal,
        });
    }
    Ok(basis.unwrap_or(Tensor::zeros((n, 0), DType::F64, y.device())?))
}

/// An `n × b` block of standard normal draws (drawn on the host, from `rng`), on `device`.
fn random_block(n: usize, b: usize, device: &Device, rng: &mut impl rand::Rng) -> Result<Tensor> {
    let values: Vec<f64> = (0..n * b)
        .map(|_| StandardNormal.sample(&mut *rng))
        .collect();
    Ok(Tensor::from_vec(values, (n, b), device)?)
}

/// `‖U − P Pᵀ U‖_F` for orthonormal columns `P` and `U`: how far `U`'s span leaves `P`'s.
fn distance(p: &[Vec<f64>], u: &[Vec<f64>]) -> f64 {
    u.iter()
        .map(|column| {
            let mut outside = column.clone();
            take_out(&mut outside, p);
            dot(&outside, &outside)
        })
        .sum::<f64>()
        .sqrt()
}
