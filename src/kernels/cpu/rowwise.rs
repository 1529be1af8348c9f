//! Row-wise passes shared by the fused ops' forward and backward: the bias pre-fill, the
//! per-column scaling `m ⊙ s` (`g' = c ⊙ g`, `λ_d ⊙ x Aᵀ`, ...) and the column sums
//! `Σ_i g_ij u_ij` behind the gradients of per-column vectors (DoRA's row scale, VeRA's
//! `λ_b` and `λ_d`).
//!
//! Rows are spread over rayon's pool. Column sums are taken over fixed blocks of
//! [`ROWS_PER_BLOCK`] rows, block by block in parallel, and the blocks' partial sums are
//! added in block order, so a gradient does not depend on the thread count or on how
//! rayon split the work.

use candle_core::WithDType;
use rayon::prelude::*;

use super::{MatRef, Scratch};

/// Rows per block of a column sum (a fixed summation order).
const ROWS_PER_BLOCK: usize = 32;

/// `n` copies of `bias`, row after row: an `(n, bias.len())` output pre-filled with it.
/// The rows are written into fresh capacity, without zeroing it first (a pass over the
/// whole output that the copies overwrite).
pub(crate) fn bias_rows<T: WithDType>(n: usize, bias: &[T]) -> candle_core::Result<Vec<T>> {
    let d = bias.len();
    let Some(len) = n.checked_mul(d) else {
        candle_core::bail!("fused linear: {n} rows of a {d}-wide output overflow usize")
    };
    let mut out = Vec::with_capacity(len);
    let rows = out.spare_capacity_mut().get_mut(..len).unwrap_or_default();
    let written = rows.len();
    rows.par_chunks_mut(d.max(1)).for_each(|row| {
        for (slot, &b) in row.iter_mut().zip(bias) {
            slot.write(b);
        }
    });
    // SAFETY: `with_capacity(len)` holds at least `len` elements, so `rows` is the first
    // `len` of them (`written == len`), and every one was written above: each chunk of
    // `d` is one row, zipped with the `d` values of `bias`.
    unsafe { out.set_len(written) };
    Ok(out)
}

/// `n` rows of `d` zeros, contiguous, written in parallel (a fresh output's fill).
pub(crate) fn zero_rows<T: WithDType>(n: usize, d: usize) -> candle_core::Result<Vec<T>> {
    bias_rows(n, &vec![T::zero(); d])
}

/// `m ⊙ s` for an `(n, s.len())` matrix `m` (any strides): each row times `s`, contiguous,
/// and, with `dot_with` (a contiguous `(n, s.len())` matrix `u`), the column sums
/// `Σ_i m_ij u_ij`.
pub(crate) fn scale_columns_and_dot<T: WithDType>(
    m: MatRef<T>,
    s: &[T],
    dot_with: Option<&[T]>,
) -> candle_core::Result<(Scratch<T>, Option<Vec<T>>)> {
    let (n, d) = (m.rows, m.cols);
    let zero = T::from_f64(0.0);
    if s.len() != d || dot_with.is_some_and(|u| u.len() != n * d) {
        candle_core::bail!(
            "fused linear: a {n}x{d} matrix scaled by {} values, summed against {:?}",
            s.len(),
            dot_with.map(<[T]>::len)
        );
    }
    // Every element is written below (each row of `m` times `s`).
    let mut scaled = Scratch::overwritten(n * d);
    let block_len = ROWS_PER_BLOCK * d.max(1);
    let partials: Vec<Vec<T>> = scaled
        .par_chunks_mut(block_len)
        .enumerate()
        .map(|(blk, out)| {
            let mut acc = vec![zero; if dot_with.is_some() { d } else { 0 }];
            let mut buf = Vec::new();
            for (k, out_row) in out.chunks_exact_mut(d.max(1)).enumerate() {
                let i = blk * ROWS_PER_BLOCK + k;
                let m_row = m.row_or_copy(i, &mut buf);
                for ((o, &v), &sj) in out_row.iter_mut().zip(m_row).zip(s) {
                    *o = v * sj;
                }
                if let Some(u_row) = dot_with.and_then(|u| u.get(i * d..(i + 1) * d)) {
                    for ((a, &v), &uj) in acc.iter_mut().zip(m_row).zip(u_row) {
                        *a += v * uj;
                    }
                }
            }
            acc
        })
        .collect();
    let dot = dot_with.map(|_| sum_in_order(partials, d));
    Ok((scaled, dot))
}

/// `m ⊙ s + bias` for a contiguous `(n, s.len())` matrix `m`: each row times `s`, plus the
/// bias when there is one (DoRA's epilogue `c ⊙ u + b`), into a new contiguous matrix.
pub(crate) fn scale_columns_add<T: WithDType>(
    m: &[T],
    s: &[T],
    bias: Option<&[T]>,
) -> candle_core::Result<Vec<T>> {
    let d = s.len();
    if !m.len().is_multiple_of(d.max(1)) || bias.is_some_and(|b| b.len() != d) {
        candle_core::bail!(
            "fused linear: {} values scaled by rows of {d}, bias of {:?}",
            m.len(),
            bias.map(<[T]>::len)
        );
    }
    let mut out = vec![T::from_f64(0.0); m.len()];
    out.par_chunks_mut(d.max(1))
        .zip(m.par_chunks(d.max(1)))
        .for_each(|(out, row)| match bias {
            Some(b) => {
                for (((o, &v), &sj), &bj) in out.iter_mut().zip(row).zip(s).zip(b) {
                    *o = v * sj + bj;
                }
            }
            None => {
                for ((o, &v), &sj) in out.iter_mut().zip(row).zip(s) {
                    *o = v * sj;
                }
            }
        });
    Ok(out)
}

/// `diag(s) m` for an `(s.len(), d)` matrix `m` (any strides): row `i` times `s_i`,
/// contiguous.
pub(crate) fn scale_rows<T: WithDType>(m: MatRef<T>, s: &[T]) -> candle_core::Result<Vec<T>> {
    let (n, d) = (m.rows, m.cols);
    if s.len() != n {
        candle_core::bail!(
            "fused linear: a {n}x{d} matrix with its rows scaled by {} values",
            s.len()
        );
    }
    let mut out = vec![T::from_f64(0.0); n * d];
    out.par_chunks_mut(d.max(1))
        .zip(s.par_iter())
        .enumerate()
        .for_each(|(i, (row, &si))| {
            let mut buf = Vec::new();
            for (o, &v) in row.iter_mut().zip(m.row_or_copy(i, &mut buf)) {
                *o = si * v;
            }
        });
    Ok(out)
}

/// The column sums `Σ_i m_ij u_ij` of an `(n, d)` matrix `m` (any strides) against a
/// contiguous `(n, d)` matrix `u`.
pub(crate) fn column_dot<T: WithDType>(m: MatRef<T>, u: &[T]) -> candle_core::Result<Vec<T>> {
    let (n, d) = (m.rows, m.cols);
    if u.len() != n * d {
        candle_core::bail!(
            "fused linear: a {n}x{d} matrix summed against {} values",
            u.len()
        );
    }
    let zero = T::from_f64(0.0);
    let partials: Vec<Vec<T>> = u
        .par_chunks(ROWS_PER_BLOCK * d.max(1))
        .enumerate()
        .map(|(blk, u)| {
            let mut acc = vec![zero; d];
            let mut buf = Vec::new();
            for (k, u_row) in u.chunks_exact(d.max(1)).enumerate() {
                let m_row = m.row_or_copy(blk * ROWS_PER_BLOCK + k, &mut buf);
                for ((a, &v), &uj) in acc.iter_mut().zip(m_row).zip(u_row) {
                    *a += v * uj;
                }
            }
            acc
        })
        .collect();
    Ok(sum_in_order(partials, d))
}

/// The element-wise sum of `d`-long partial sums, in their order.
fn sum_in_order<T: WithDType>(partials: Vec<Vec<T>>, d: usize) -> Vec<T> {
    partials
        .into_iter()
        .fold(vec![T::from_f64(0.0); d], |mut total, part| {
            total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
            total
        })
}

#[cfg(test)]
mod tests {
    use super::super::test_values as vals;
    use super::*;

    /// Against a plain double loop, for a contiguous and a transposed (strided) `m`, over
    /// more rows than one block.
    #[test]
    fn scaling_and_column_sums_match_a_double_loop() -> candle_core::Result<()> {
        let (n, d) = (2 * ROWS_PER_BLOCK + 5, 7);
        let (m, s, u) = (vals(n * d, 0.3), vals(d, 1.7), vals(n * d, 2.9));
        let mt: Vec<f64> = (0..d)
            .flat_map(|j| (0..n).map(move |i| (i, j)))
            .map(|(i, j)| m[i * d + j])
            .collect();
        let views = [
            MatRef::contiguous(&m, n, d)?,
            MatRef::contiguous(&mt, d, n)?.t(),
        ];
        for view in views {
            let (scaled, dot) = scale_columns_and_dot(view, &s, Some(&u))?;
            let dot_only = column_dot(view, &u)?;
            let s_rows = vals(n, 0.8);
            let bias = vals(d, 4.1);
            let with_bias = scale_columns_add(&m, &s, Some(&bias))?;
            let rows_scaled = scale_rows(view, &s_rows)?;
            for j in 0..d {
                let mut want = 0.0;
                for i in 0..n {
                    assert_eq!(scaled[i * d + j], m[i * d + j] * s[j]);
                    assert_eq!(rows_scaled[i * d + j], s_rows[i] * m[i * d + j]);
                    assert_eq!(with_bias[i * d + j], m[i * d + j] * s[j] + bias[j]);
                    want += m[i * d + j] * u[i * d + j];
                }
                for got in [dot.as_ref().map(|v| v[j]), Some(dot_only[j])] {
                    let got = got.unwrap_or(f64::NAN);
                    assert!((got - want).abs() <= 1e-12 * (1.0 + want.abs()));
                }
            }
        }
        assert!(scale_columns_and_dot(views[0], &s[1..], None).is_err());
        assert!(column_dot(views[0], &u[1..]).is_err());
        assert!(scale_rows(views[0], &s).is_err());
        assert!(scale_columns_add(&m, &s, Some(&s[1..])).is_err());
        Ok(())
    }

    /// Every row is the bias; no rows or no columns give nothing; a size past `usize` is
    /// an error, not a short buffer.
    #[test]
    fn bias_rows_repeats_the_bias() -> candle_core::Result<()> {
        let b = [1.0, 2.0, 3.0];
        assert_eq!(bias_rows(2, &b)?, vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        assert!(bias_rows(0, &b)?.is_empty());
        assert!(bias_rows::<f32>(3, &[])?.is_empty());
        assert!(bias_rows(usize::MAX, &b).is_err());
        Ok(())
    }
}
