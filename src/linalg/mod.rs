//! Small dense `f64` linear algebra on the host, for what candle has no op for: an
//! orthonormal basis of a few columns, the eigen-decomposition of a small symmetric
//! matrix ([`eigen`]), and the inverse of a small matrix (LoRA-FA's ridge inverse). The
//! sizes here are a rank, a block of a few hundred or a layer's smaller side; products
//! with a layer's weight stay tensor ops.

mod eigen;

pub(crate) use eigen::symmetric_eigen;

/// Orthonormalizes `columns` (each a vector of one length) in order by modified
/// Gram–Schmidt, run twice: the second pass removes what rounding left of the earlier
/// directions. Returns, per column, its norm after the earlier columns were taken out
/// relative to its norm before: near 0 for a column (nearly) in the span of the earlier
/// ones, whose result is then not a meaningful direction (callers check). A zero column
/// stays zero, with a ratio of 0.
pub(crate) fn orthonormalize(columns: &mut [Vec<f64>]) -> Vec<f64> {
    let mut kept = Vec::with_capacity(columns.len());
    for j in 0..columns.len() {
        let (done, rest) = columns.split_at_mut(j);
        let Some(column) = rest.first_mut() else {
            break;
        };
        let before = norm(column);
        for _pass in 0..2 {
            take_out(column, done);
        }
        let after = norm(column);
        if after > 0.0 {
            column.iter_mut().for_each(|c| *c /= after);
        }
        kept.push(if before > 0.0 { after / before } else { 0.0 });
    }
    kept
}

/// Takes out of `column` its component along each of the orthonormal `basis` vectors, in
/// order (one modified Gram–Schmidt pass).
pub(crate) fn take_out(column: &mut [f64], basis: &[Vec<f64>]) {
    for q in basis {
        let along = dot(q, column);
        column.iter_mut().zip(q).for_each(|(c, q)| *c -= along * q);
    }
}

pub(crate) use crate::kernels::vector_math::dot;

/// `‖x‖₂`.
pub(crate) fn norm(x: &[f64]) -> f64 {
    dot(x, x).sqrt()
}

/// Gauss–Jordan inverse with partial pivoting of the row-major `n × n` matrix `m`
/// (overwritten). `None` when singular or not finite.
#[allow(clippy::indexing_slicing)] // dense n × n algebra: every index is below n²
pub(crate) fn invert(m: &mut [f64], n: usize) -> Option<Vec<f64>> {
    let mut inv = vec![0f64; n * n];
    for i in 0..n {
        inv[i * n + i] = 1.0;
    }
    for col in 0..n {
        let pivot =
            (col..n).max_by(|&x, &y| m[x * n + col].abs().total_cmp(&m[y * n + col].abs()))?;
        let p = m[pivot * n + col];
        if p == 0.0 || !p.is_finite() {
            return None;
        }
        if pivot != col {
            for k in 0..n {
                m.swap(pivot * n + k, col * n + k);
                inv.swap(pivot * n + k, col * n + k);
            }
        }
        for k in 0..n {
            m[col * n + k] /= p;
            inv[col * n + k] /= p;
        }
        for row in 0..n {
            let f = m[row * n + col];
            if row == col || f == 0.0 {
                continue;
            }
            for k in 0..n {
                m[row * n + k] -= f * m[col * n + k];
                inv[row * n + k] -= f * inv[col * n + k];
            }
        }
    }
    inv.iter().all(|v| v.is_finite()).then_some(inv)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A column in the span of the earlier ones is reported, not passed off as a direction.
    #[test]
    fn dependent_columns_are_reported() {
        let mut columns = vec![
            vec![1.0, 0.0, 0.0],
            vec![1.0, 1.0, 0.0],
            vec![3.0, -2.0, 0.0],
            vec![0.0, 0.0, 0.0],
        ];
        let kept = orthonormalize(&mut columns);
        assert!(kept[0] == 1.0 && (kept[1] - 0.5f64.sqrt()).abs() < 1e-15);
        assert!(kept[2] < 1e-15 && kept[3] == 0.0, "{kept:?}");
    }
}
