//! CPU math of the vector-scaled low-rank product (VeRA's):
//!
//! ```text
//! y = x Wᵀ + b + out ⊙ ((mid ⊙ (x Aᵀ)) Bᵀ)
//! ```
//!
//! with `W`, `A`, `B` frozen and the vectors `mid` (`r`) and `out` (`d_out`) trainable.
//! The forward keeps `x Aᵀ` and `v = (mid ⊙ x Aᵀ) Bᵀ`; the backward then needs three
//! GEMMs (`g W`, `g' B`, `(g' B ⊙ mid) A`), against four through a packed `B_eff`:
//!
//! ```text
//! d out_j = Σ_i g_ij v_ij,   g' = g ⊙ out,   d mid_k = Σ_i (g' B)_ik (x Aᵀ)_ik,
//! dx = g W + ((g' B) ⊙ mid) A
//! ```

use candle_core::WithDType;
use rayon::prelude::*;

use super::rowwise::{column_dot, scale_columns_and_dot, scale_rows};
use super::{gemm_into, Accum, MatRef, Scratch, WeightMat};

/// The forward's CPU views and vectors.
pub(crate) struct ScaledForward<'a, T> {
    /// `x`, `(n, d_in)`.
    pub x: MatRef<'a, T>,
    /// Frozen `W`, `(d_out, d_in)`.
    pub w: WeightMat<'a, T>,
    /// Frozen `A`, `(r, d_in)`.
    pub a: MatRef<'a, T>,
    /// Frozen `B`, `(d_out, r)`.
    pub b: MatRef<'a, T>,
    /// `mid`, `r` values.
    pub mid: &'a [T],
    /// `out`, `d_out` values.
    pub out: &'a [T],
    /// Bias, `d_out` values.
    pub bias: Option<&'a [T]>,
}

/// The intermediates the backward reuses: `x Aᵀ` `(n, r)` and `v` `(n, d_out)`.
pub(crate) struct ScaledSaved<'a, T> {
    pub xa: &'a [T],
    pub v: &'a [T],
}

/// `y` `(n, d_out)` contiguous, and the intermediates `x Aᵀ` and `v` (see [`ScaledSaved`]).
/// The bias goes in with the base product (`WeightMat::times_t_new`: in its first step
/// where the packed route takes it), `out ⊙ v` in one epilogue pass.
pub(crate) fn scaled_forward<T: WithDType>(
    p: &ScaledForward<T>,
) -> candle_core::Result<(Vec<T>, Scratch<T>, Scratch<T>)> {
    let (n, d_out, r) = (p.x.rows, p.w.rows(), p.a.rows);
    let one = T::from_f64(1.0);
    let mut y = p.w.times_t_new(p.x, p.bias, None)?;
    let mut xa = Scratch::overwritten(n * r);
    gemm_into(&mut xa, r, p.x, p.a.t(), Accum::Replace, one)?;
    let (z, _) = scale_columns_and_dot(MatRef::contiguous(&xa, n, r)?, p.mid, None)?;
    let mut v = Scratch::overwritten(n * d_out);
    gemm_into(
        &mut v,
        d_out,
        MatRef::contiguous(&z, n, r)?,
        p.b.t(),
        Accum::Replace,
        one,
    )?;
    y.par_chunks_mut(d_out.max(1))
        .zip(v.par_chunks(d_out.max(1)))
        .for_each(|(y_row, v_row)| {
            for ((y, &v), &o) in y_row.iter_mut().zip(v_row).zip(p.out) {
                *y += o * v;
            }
        });
    Ok((y, xa, v))
}

/// Gradients of `x`, `mid` and `out` (each only when asked for); never one for `W`, `A`
/// or `B`.
pub(crate) type ScaledGrads<T> = (Option<Vec<T>>, Option<Vec<T>>, Option<Vec<T>>);

/// Which gradients [`scaled_backward`] computes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScaledNeed {
    /// `dx`.
    pub x: bool,
    /// `d mid`.
    pub mid: bool,
    /// `d out`.
    pub out: bool,
}

/// The backward for the incoming gradient `g` `(n, d_out)` (any strides), computing the
/// gradients `need` asks for.
pub(crate) fn scaled_backward<T: WithDType>(
    p: &ScaledForward<T>,
    saved: ScaledSaved<T>,
    g: MatRef<T>,
    need: ScaledNeed,
) -> candle_core::Result<ScaledGrads<T>> {
    let (n, d_in, d_out, r) = (p.x.rows, p.x.cols, p.w.rows(), p.a.rows);
    let one = T::from_f64(1.0);
    if saved.xa.len() != n * r || saved.v.len() != n * d_out {
        candle_core::bail!("scaled low-rank linear: saved intermediates do not fit the inputs");
    }
    let d_out_grad = need.out.then(|| column_dot(g, saved.v)).transpose()?;
    if !(need.x || need.mid) {
        return Ok((None, None, d_out_grad));
    }
    // g' B with g' = g ⊙ out, as g (diag(out) B): no n × d_out temporary.
    let b_out = scale_rows(p.b, p.out)?;
    let mut gb = Scratch::overwritten(n * r);
    gemm_into(
        &mut gb,
        r,
        g,
        MatRef::contiguous(&b_out, d_out, r)?,
        Accum::Replace,
        one,
    )?;
    // (g' B) ⊙ mid and d mid in one pass.
    let (gbm, d_mid) = scale_columns_and_dot(
        MatRef::contiguous(&gb, n, r)?,
        p.mid,
        need.mid.then_some(saved.xa),
    )?;
    let mut dx = None;
    if need.x {
        let mut out = p.w.grad_times_new(g, None)?;
        gemm_into(
            &mut out,
            d_in,
            MatRef::contiguous(&gbm, n, r)?,
            p.a,
            Accum::Add,
            one,
        )?;
        dx = Some(out);
    }
    Ok((dx, d_mid, d_out_grad))
}
