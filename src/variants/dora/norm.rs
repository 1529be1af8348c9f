//! DoRA's per-output-row norms `‖W + s·BA‖` computed without forming `BA` or `W + s·BA`.
//!
//! With `W` frozen, `‖W_i‖²` is cached once, and for each row `i`
//!
//! ```text
//! n_i² = ‖W_i‖² + 2s·⟨(W Aᵀ)_i, B_i⟩ + s²·⟨(B (A Aᵀ))_i, B_i⟩
//! ```
//!
//! needs only `W Aᵀ` (`d_out × r`), `A Aᵀ` (`r × r`) and `B (A Aᵀ)` (`d_out × r`): no
//! `d_out × d_in` temporary for f32/f64 weights. The sum is clamped at 0 before the square
//! root (rounding can make it slightly negative where `W_i + s·(BA)_i ≈ 0`).
//!
//! Norms are returned in [`norm_dtype`]: f64 for f64 layers, f32 otherwise, so that the
//! epsilon floor [`dora_eps`] and `m / n` are computed in a dtype where they are
//! representable.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::frozen::FrozenLinear;
use crate::kernels::compute_dtype;
use crate::matmul::matmul;

/// The dtype DoRA's norms and `m / n` are computed in: f64 for f64 layers, f32 otherwise.
pub fn norm_dtype(layer_dtype: DType) -> DType {
    match layer_dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// The floor on row norms: `c = m / max(n, eps)`. `1e-12`, except f16 layers (`1e-4`) so
/// that `m / eps` stays within f16's range (65504) for magnitudes up to ~6.
///
/// A row whose adapted weight `W_i + s·(BA)_i` is exactly zero has a zero base-plus-low-rank
/// output, so the floor turns PEFT's `0 · (m / 0) = NaN` into a finite value (0).
pub fn dora_eps(layer_dtype: DType) -> f64 {
    match layer_dtype {
        DType::F16 => 1e-4,
        _ => 1e-12,
    }
}

/// Squared row norms `‖W_i‖²` of `w` (`d_out × d_in`), shape `(d_out,)`, in [`norm_dtype`].
pub fn row_sq_norms(w: &Tensor) -> Result<Tensor> {
    let nd = norm_dtype(w.dtype());
    Ok(w.detach().to_dtype(nd)?.sqr()?.sum(1)?)
}

/// Row norms `‖W_i + s·(B A)_i‖` from the cached `w_sq = ‖W_i‖²` (see [`row_sq_norms`]),
/// without forming `B A`. `A` and `B` are detached: the result is a constant for autograd.
///
/// Shapes: `w_sq` `(d_out,)`, `w` `(d_out, d_in)`, `a` `(r, d_in)`, `b` `(d_out, r)`.
/// Returns `(d_out,)` in [`norm_dtype`] of `w`'s dtype.
pub fn factored_row_norms(
    w_sq: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let compute = compute_dtype(w.dtype(), w.device());
    let w = w.detach().to_dtype(compute)?;
    let wa = matmul(&w, &a.detach().to_dtype(compute)?.t()?)?; // (d_out, r)
    factored_row_norms_from(w_sq, &wa, a, b, scale)
}

/// [`factored_row_norms`] from `W Aᵀ` (`(d_out, r)`, computed by the caller: from a
/// quantized base's blocks, without `W` in float). Returns `(d_out,)` in [`norm_dtype`] of
/// `wa`'s dtype.
pub fn factored_row_norms_from(
    w_sq: &Tensor,
    wa: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let compute = compute_dtype(wa.dtype(), wa.device());
    let nd = norm_dtype(wa.dtype());
    let wa = wa.detach().to_dtype(compute)?;
    let a = a.detach().to_dtype(compute)?;
    let b = b.detach().to_dtype(compute)?;
    let aa = matmul(&a, &a.t()?)?; // (r, r)
    let baa = matmul(&b, &aa)?; // (d_out, r)
                                // ⟨B_i, 2s·(WAᵀ)_i + s²·(B AAᵀ)_i⟩
    let t = ((wa * (2.0 * scale))? + (baa * (scale * scale))?)?;
    let dots = (t * b)?.sum(1)?.to_dtype(nd)?;
    let sq = (w_sq.to_dtype(nd)? + dots)?.relu()?;
    Ok(sq.sqrt()?)
}

/// `‖W_i‖²` of a base (see [`row_sq_norms`]): for a quantized base, computed once from
/// row tiles of the dequantized blocks (never the whole `W` in float).
pub fn base_row_sq_norms(base: &FrozenLinear) -> Result<Tensor> {
    match base.quantized() {
        Some(q) => {
            let nd = norm_dtype(base.dtype());
            Ok(q.row_sq_norms()?.to_dtype(nd)?.to_device(base.device())?)
        }
        None => row_sq_norms(base.weight()),
    }
}
