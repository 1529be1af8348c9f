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

use super::{gemm_into, MatRef};

/// The forward's CPU views and vectors.
pub(crate) struct ScaledForward<'a, T> {
    /// `x`, `(n, d_in)`.
    pub x: MatRef<'a, T>,
    /// Frozen `W`, `(d_out, d_in)`.
    pub w: MatRef<'a, T>,
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
pub(crate) fn scaled_forward<T: WithDType>(
    p: &ScaledForward<T>,
) -> candle_core::Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let (n, d_out, r) = (p.x.rows, p.w.rows, p.a.rows);
    let (zero, one) = (T::from_f64(0.0), T::from_f64(1.0));
    let mut y = match p.bias {
        Some(b) => b.iter().copied().cycle().take(n * d_out).collect(),
        None => vec![zero; n * d_out],
    };
    gemm_into(&mut y, d_out, p.x, p.w.t(), p.bias.is_some(), one)?;
    let mut xa = vec![zero; n * r];
    gemm_into(&mut xa, r, p.x, p.a.t(), false, one)?;
    let z = scale_columns(&xa, p.mid);
    let mut v = vec![zero; n * d_out];
    gemm_into(
        &mut v,
        d_out,
        MatRef::contiguous(&z, n, r)?,
        p.b.t(),
        false,
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

/// The backward for the incoming gradient `g` `(n, d_out)` (any strides). `need`: which
/// of `dx`, `d mid`, `d out` to compute.
pub(crate) fn scaled_backward<T: WithDType>(
    p: &ScaledForward<T>,
    saved: ScaledSaved<T>,
    g: MatRef<T>,
    need: (bool, bool, bool),
) -> candle_core::Result<ScaledGrads<T>> {
    let (n, d_in, d_out, r) = (p.x.rows, p.x.cols, p.w.rows, p.a.rows);
    let (zero, one) = (T::from_f64(0.0), T::from_f64(1.0));
    let (need_dx, need_mid, need_out) = need;
    if saved.xa.len() != n * r || saved.v.len() != n * d_out {
        candle_core::bail!("scaled low-rank linear: saved intermediates do not fit the inputs");
    }
    let d_out_grad = need_out.then(|| {
        saved
            .v
            .par_chunks(d_out.max(1))
            .enumerate()
            .fold(
                || vec![zero; d_out],
                |mut acc, (i, v_row)| {
                    for (j, (a, &v)) in acc.iter_mut().zip(v_row).enumerate() {
                        *a += g.at(i, j) * v;
                    }
                    acc
                },
            )
            .reduce(
                || vec![zero; d_out],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    a
                },
            )
    });
    let (mut dx, mut d_mid) = (None, None);
    if need_dx || need_mid {
        // g' = g ⊙ out (contiguous), then g' B (n, r).
        let mut g_out = vec![zero; n * d_out];
        g_out
            .par_chunks_mut(d_out.max(1))
            .enumerate()
            .for_each(|(i, row)| {
                for (j, (slot, &o)) in row.iter_mut().zip(p.out).enumerate() {
                    *slot = g.at(i, j) * o;
                }
            });
        let mut gb = vec![zero; n * r];
        gemm_into(
            &mut gb,
            r,
            MatRef::contiguous(&g_out, n, d_out)?,
            p.b,
            false,
            one,
        )?;
        if need_mid {
            let mut acc = vec![zero; r];
            for (gb_row, xa_row) in gb
                .chunks_exact(r.max(1))
                .zip(saved.xa.chunks_exact(r.max(1)))
            {
                for ((a, &x), &y) in acc.iter_mut().zip(gb_row).zip(xa_row) {
                    *a += x * y;
                }
            }
            d_mid = Some(acc);
        }
        if need_dx {
            let mut out = vec![zero; n * d_in];
            gemm_into(&mut out, d_in, g, p.w, false, one)?;
            let gbm = scale_columns(&gb, p.mid);
            gemm_into(
                &mut out,
                d_in,
                MatRef::contiguous(&gbm, n, r)?,
                p.a,
                true,
                one,
            )?;
            dx = Some(out);
        }
    }
    Ok((dx, d_mid, d_out_grad))
}

/// `m ⊙ s` for a row-major matrix `m` with `s.len()` columns: each row times `s`.
fn scale_columns<T: WithDType>(m: &[T], s: &[T]) -> Vec<T> {
    m.chunks_exact(s.len().max(1))
        .flat_map(|row| row.iter().zip(s).map(|(&v, &k)| v * k))
        .collect()
}
