//! The fused low-rank linear's forward and backward on the CPU (the op of LoRA and of the
//! variants built on it, DoRA's row scale included; VeRA's is [`super::scaled`]):
//! `y = c ⊙ (x Wᵀ + s (x̃ Aᵀ) Bᵀ) + b` and its gradients, built from products that
//! accumulate into one output buffer: the forward makes no output-sized temporary beyond
//! the pre-scale output it keeps for the backward when there is a row scale, and the
//! backward never a gradient for `W`.

use super::{gemm_into, rowwise, Accum, AddedTerm, MatRef, Scratch, WeightMat};
use crate::kernels::dropout::Dropout;
use candle_core::WithDType;

/// Everything the forward needs, as CPU views.
pub(crate) struct Forward<'a, T> {
    /// `x`, `(n, d_in)`.
    pub x: MatRef<'a, T>,
    /// `W`, `(d_out, d_in)`.
    pub w: WeightMat<'a, T>,
    /// `A_eff` `(r, d_in)` and `B_eff` `(d_out, r)`, `r ≥ 1`, with the scale.
    pub low_rank: Option<(MatRef<'a, T>, MatRef<'a, T>, T)>,
    /// With dropout on the low-rank term's input: that input, `drop(x)` `(n, d_in)`, and
    /// the dropout that made it from `x` (entry `(i, j)` is its entry `i · d_in + j`).
    /// `None`: the low-rank term reads `x`.
    pub dropped: Option<(MatRef<'a, T>, Dropout)>,
    /// Row scale, `d_out` values.
    pub row_scale: Option<Vec<T>>,
    /// Bias, `d_out` values.
    pub bias: Option<Vec<T>>,
}

/// `y = c ⊙ (x Wᵀ + s (x̃ Aᵀ) Bᵀ) + b`, contiguous `(n, d_out)`, and the intermediate
/// `x̃ Aᵀ` `(n, r)` (empty without a low-rank term), which the backward reuses; `x̃` is
/// `x`, or its dropped copy ([`Forward::dropped`]).
///
/// Without a row scale the output is a new vector ([`super::product_owned`]: the bias in the
/// base product's first step where the packed route takes it, else pre-filled and the
/// product added onto it); the low-rank term joins the base product's passes where the
/// route allows; a row scale is one epilogue pass.
pub(crate) fn forward<T: WithDType>(p: &Forward<T>) -> candle_core::Result<Forwarded<T>> {
    let (n, d_out) = (p.x.rows, p.w.rows());
    let one = T::from_f64(1.0);
    let mut xa = Scratch::overwritten(0);
    if let Some((a, _, _)) = p.low_rank {
        let r = a.rows;
        xa = Scratch::overwritten(n * r);
        gemm_into(&mut xa, r, p.low_rank_input(), a.t(), Accum::Replace, one)?;
    }
    // The low-rank term `s (x̃ Aᵀ) Bᵀ` goes in with the base product, in the same passes
    // over `y` where the route allows (`packed`).
    let term = low_rank_term(p, &xa)?;
    let Some(c) = &p.row_scale else {
        // The output (candle's once returned), the bias in it.
        let y = p.w.times_t_new(p.x, p.bias.as_deref(), term)?;
        return Ok((y, xa, None));
    };
    // With a row scale, the pooled pre-scale `u` (no bias yet): kept for the backward.
    let mut u = Scratch::overwritten(n * d_out);
    p.w.times_t(&mut u, p.x, Accum::Replace, term)?;
    let y_scaled = rowwise::scale_columns_add(&u, c, p.bias.as_deref())?;
    Ok((y_scaled, xa, Some(u)))
}

/// The forward's low-rank term `s (x̃ Aᵀ) Bᵀ` over the saved `x̃ Aᵀ` (`n × r`), if any.
fn low_rank_term<'a, T: WithDType>(
    p: &Forward<'a, T>,
    xa: &'a [T],
) -> candle_core::Result<Option<AddedTerm<'a, T>>> {
    let Some((a, b, s)) = p.low_rank else {
        return Ok(None);
    };
    let lhs = MatRef::contiguous(xa, p.x.rows, a.rows)?;
    Ok(Some(AddedTerm {
        lhs,
        rhs: b.t(),
        scale: s,
    }))
}

/// `drop(x)`: a contiguous copy of `x` `(rows, cols)` with `dropout`'s dropped entries
/// zero and the rest scaled by `1 / (1 − p)` (entry `(i, j)` is the dropout's entry
/// `i · cols + j`); rows in parallel.
pub(crate) fn dropped_copy<T: WithDType>(x: MatRef<T>, dropout: &Dropout) -> Vec<T> {
    use rayon::prelude::*;
    let cols = x.cols;
    let mut out = vec![T::zero(); x.rows * cols];
    out.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each_init(Vec::new, |buf, (i, row)| {
            dropout.add_kept_run(row, x.row_or_copy(i, buf), i * cols);
        });
    out
}

impl<'a, T: Copy> Forward<'a, T> {
    /// What the low-rank term reads: the dropped copy of `x`, or `x`.
    fn low_rank_input(&self) -> MatRef<'a, T> {
        self.dropped.as_ref().map_or(self.x, |(x, _)| *x)
    }
}

/// The forward's output `y` `(n, d_out)`, `x Aᵀ` `(n, r)` (empty without a low-rank term)
/// and, with a row scale, the pre-scale output `u` `(n, d_out)`; the intermediates are
/// pooled buffers.
pub(crate) type Forwarded<T> = (Vec<T>, Scratch<T>, Option<Scratch<T>>);

/// Everything the backward needs, as CPU views.
pub(crate) struct Backward<'a, T> {
    /// The forward's inputs.
    pub fwd: &'a Forward<'a, T>,
    /// The incoming gradient, `(n, d_out)`.
    pub g: MatRef<'a, T>,
    /// Which gradients to compute.
    pub need: Need,
    /// `x Aᵀ` `(n, r)` saved by the forward, if it was; recomputed otherwise.
    pub xa: Option<&'a [T]>,
    /// The pre-scale output `u` `(n, d_out)` saved by the forward (with a row scale), if it
    /// was; recomputed otherwise.
    pub u: Option<&'a [T]>,
}

/// Which gradients [`backward`] computes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Need {
    /// `dx`.
    pub x: bool,
    /// `dA`.
    pub a: bool,
    /// The packed `[dB | dc]`.
    pub bc: bool,
}

/// The gradients of [`Backward`]: `dx (n, d_in)`, `dA (r, d_in)`, and the gradient of the
/// packed third input `[B | c]`, `(d_out, r + 1)` (or `(d_out, r)` without a row scale).
pub(crate) struct Grads<T> {
    pub dx: Option<Vec<T>>,
    pub da: Option<Vec<T>>,
    pub dbc: Option<Vec<T>>,
}

/// unsloth's algebra with `g' = c ⊙ g`:
/// `dx = g' W + s (g' B) A`, `dA = s (g' B)ᵀ x`, `dB = s g'ᵀ (x Aᵀ)`,
/// `dc_j = Σ_i g_ij u_ij` with `u` the pre-scale output the forward saved.
/// With dropout on the low-rank input `x̃ = keep ⊙ x / (1 − p)`: `x̃` in place of `x` in
/// `dA` and `dB`, and `dx = g' W + keep ⊙ (s (g' B) A) / (1 − p)`.
/// Never a gradient for `W`.
pub(crate) fn backward<T: WithDType>(p: &Backward<T>) -> candle_core::Result<Grads<T>> {
    let f = p.fwd;
    let (n, d_in, d_out) = (f.x.rows, f.x.cols, f.w.rows());
    let zero = T::from_f64(0.0);
    let one = T::from_f64(1.0);
    // g' = c ⊙ g (contiguous), or g itself.
    let scaled: Option<Scratch<T>> = f
        .row_scale
        .as_ref()
        .map(|c| rowwise::scale_columns_and_dot(p.g, c, None).map(|(scaled, _)| scaled))
        .transpose()?;
    let gs = match &scaled {
        Some(v) => MatRef::contiguous(v, n, d_out)?,
        None => p.g,
    };
    let r = f.low_rank.map_or(0, |(a, _, _)| a.rows);
    let mut out = Grads {
        dx: None,
        da: None,
        dbc: None,
    };
    // g' B, (n, r): shared by dx and dA.
    let gb = match f.low_rank {
        Some((_, b, _)) if p.need.x || p.need.a => {
            let mut gb = Scratch::overwritten(n * r);
            gemm_into(&mut gb, r, gs, b, Accum::Replace, one)?;
            Some(gb)
        }
        _ => None,
    };
    if p.need.x {
        // Without dropout the low-rank term `s (g' B) A` goes in with `g' W`, in the same
        // passes over `dx` where the route allows (`packed`).
        let term = match (f.low_rank, &gb, &f.dropped) {
            (Some((a, _, s)), Some(gb), None) => Some(AddedTerm {
                lhs: MatRef::contiguous(gb, n, r)?,
                rhs: a,
                scale: s,
            }),
            _ => None,
        };
        let mut dx = f.w.grad_times_new(gs, term)?;
        if let (Some((a, _, s)), Some(gb), Some((_, dropout))) = (f.low_rank, &gb, &f.dropped) {
            // Through the dropout: its kept entries, scaled.
            let mut low = Scratch::overwritten(n * d_in);
            gemm_into(
                &mut low,
                d_in,
                MatRef::contiguous(gb, n, r)?,
                a,
                Accum::Replace,
                s,
            )?;
            dropout.add_kept(&mut dx, &low, 0);
        }
        out.dx = Some(dx);
    }
    if let (true, Some((_, _, s)), Some(gb)) = (p.need.a, f.low_rank, &gb) {
        let mut da = vec![zero; r * d_in];
        gemm_into(
            &mut da,
            d_in,
            MatRef::contiguous(gb, n, r)?.t(),
            f.low_rank_input(),
            Accum::Replace,
            s,
        )?;
        out.da = Some(da);
    }
    if p.need.bc {
        let width = r + usize::from(f.row_scale.is_some());
        let mut dbc = vec![zero; d_out * width];
        let recomputed;
        let xa: &[T] = match (f.low_rank, p.xa) {
            (Some(_), Some(saved)) if saved.len() == n * r => saved,
            (Some((a, _, _)), _) => {
                let mut xa = Scratch::overwritten(n * r);
                gemm_into(&mut xa, r, f.low_rank_input(), a.t(), Accum::Replace, one)?;
                recomputed = xa;
                &recomputed
            }
            (None, _) => &[],
        };
        if let Some((_, _, s)) = f.low_rank {
            gemm_into(
                &mut dbc,
                width,
                gs.t(),
                MatRef::contiguous(xa, n, r)?,
                Accum::Replace,
                s,
            )?;
        }
        if f.row_scale.is_some() {
            let xa = MatRef::contiguous(xa, n, r)?;
            let dc = row_scale_grad(p, xa)?;
            for (row, v) in dbc.chunks_mut(width).zip(dc) {
                if let Some(slot) = row.get_mut(r) {
                    *slot = v;
                }
            }
        }
        out.dbc = Some(dbc);
    }
    Ok(out)
}

/// `dc_j = Σ_i g_ij u_ij`, `u = x Wᵀ + s (x Aᵀ) Bᵀ` the pre-scale output without bias:
/// the forward's saved copy, or recomputed as the forward computed it when there is none.
fn row_scale_grad<T: WithDType>(p: &Backward<T>, xa: MatRef<T>) -> candle_core::Result<Vec<T>> {
    let f = p.fwd;
    let (n, d_out) = (p.g.rows, p.g.cols);
    let recomputed;
    let u: &[T] = match p.u {
        Some(u) if u.len() == n * d_out => u,
        _ => {
            // As the forward computed it (the term in the same route), so the bits agree.
            let mut u = Scratch::overwritten(n * d_out);
            f.w.times_t(&mut u, f.x, Accum::Replace, low_rank_term(f, xa.data)?)?;
            recomputed = u;
            &recomputed
        }
    };
    rowwise::column_dot(p.g, u)
}

#[cfg(test)]
mod tests {
    use super::super::test_values;
    use super::*;

    /// The backward's recompute fallbacks (no saved `x Aᵀ`, no saved `u`) give the same
    /// gradients as the saved intermediates the forward normally hands over.
    #[test]
    fn recomputed_intermediates_match_saved_ones() -> candle_core::Result<()> {
        let (n, d_in, d_out, r) = (5, 7, 6, 3);
        let vals = test_values;
        let (x, w, a, b) = (
            vals(n * d_in, 0.7),
            vals(d_out * d_in, 1.3),
            vals(r * d_in, 2.1),
            vals(d_out * r, 0.4),
        );
        let g = vals(n * d_out, 1.9);
        let mut c = vals(d_out, 3.3);
        c[2] = 0.0; // a zero row scale: the gradient must not need y / c
        let fwd = Forward {
            x: MatRef::contiguous(&x, n, d_in)?,
            w: WeightMat::Dense(MatRef::contiguous(&w, d_out, d_in)?),
            low_rank: Some((
                MatRef::contiguous(&a, r, d_in)?,
                MatRef::contiguous(&b, d_out, r)?,
                0.5,
            )),
            dropped: None,
            row_scale: Some(c),
            bias: Some(vals(d_out, 5.0)),
        };
        let (_, xa, u) = forward(&fwd)?;
        let run = |xa: Option<&[f64]>, u: Option<&[f64]>| {
            backward(&Backward {
                fwd: &fwd,
                g: MatRef::contiguous(&g, n, d_out)?,
                need: Need {
                    x: true,
                    a: true,
                    bc: true,
                },
                xa,
                u,
            })
        };
        let saved = run(Some(&xa[..]), u.as_deref().map(Vec::as_slice))?;
        let recomputed = run(None, None)?;
        for (s, r) in [
            (saved.dx, recomputed.dx),
            (saved.da, recomputed.da),
            (saved.dbc, recomputed.dbc),
        ] {
            let (s, r) = (s.unwrap_or_default(), r.unwrap_or_default());
            assert!(!s.is_empty() && s.len() == r.len());
            for (p, q) in s.iter().zip(&r) {
                assert!((p - q).abs() <= 1e-12 * (1.0 + q.abs()), "{p} vs {q}");
            }
        }
        Ok(())
    }
}
