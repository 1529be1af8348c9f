//! Small dense `f64` linear algebra on the host, for what candle has no op for: an
//! orthonormal basis of a few columns, the eigen-decomposition of a small symmetric
//! matrix, and the inverse of a small matrix (LoRA-FA's ridge inverse). The sizes here
//! are a rank or a block of a few tens; products with a layer's weight stay tensor ops.

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
            for q in done.iter() {
                let along = dot(q, column);
                column.iter_mut().zip(q).for_each(|(c, q)| *c -= along * q);
            }
        }
        let after = norm(column);
        if after > 0.0 {
            column.iter_mut().for_each(|c| *c /= after);
        }
        kept.push(if before > 0.0 { after / before } else { 0.0 });
    }
    kept
}

/// `xᵀ y`.
pub(crate) fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

fn norm(x: &[f64]) -> f64 {
    dot(x, x).sqrt()
}

/// The eigenvalues and eigenvectors of the symmetric `n × n` matrix `a` (row-major; only
/// its values are read, symmetry is assumed), by cyclic Jacobi rotations: accurate to a few
/// units of rounding relative to the largest eigenvalue, for the small matrices it is
/// meant for (`O(n³)` per sweep). Eigenvalues come in descending order, each with its unit
/// eigenvector.
pub(crate) fn symmetric_eigen(a: &[f64], n: usize) -> Vec<(f64, Vec<f64>)> {
    let mut m = a.to_vec();
    m.resize(n * n, 0.0);
    // Column j of `v` is the eigenvector of the j-th diagonal entry.
    let mut v = vec![0f64; n * n];
    v.iter_mut().step_by(n + 1).for_each(|d| *d = 1.0);
    // Rotations keep the Frobenius norm; stop once what is off the diagonal is rounding
    // next to it (cyclic Jacobi converges quadratically: a handful of sweeps).
    let total = norm(&m);
    for _sweep in 0..64 {
        if off_diagonal_norm(&m, n) <= 1e-15 * total {
            break;
        }
        jacobi_sweep(&mut m, &mut v, n);
    }
    let mut pairs: Vec<(f64, Vec<f64>)> = (0..n)
        .map(|j| {
            let value = m.get(j * n + j).copied().unwrap_or(0.0);
            let vector = v.iter().skip(j).step_by(n).copied().collect();
            (value, vector)
        })
        .collect();
    pairs.sort_by(|x, y| y.0.total_cmp(&x.0));
    pairs
}

/// `√Σ_{i≠j} m_ij²` of the row-major `n × n` matrix `m`.
fn off_diagonal_norm(m: &[f64], n: usize) -> f64 {
    m.iter()
        .enumerate()
        .filter(|(k, _)| k / n != k % n)
        .map(|(_, x)| x * x)
        .sum::<f64>()
        .sqrt()
}

/// One sweep of rotations over every off-diagonal pair of `m`, each zeroing its pair
/// (`m ← Jᵀ m J`), accumulated into `v ← v J`.
#[allow(clippy::indexing_slicing)] // dense n × n algebra: every index is below n²
fn jacobi_sweep(m: &mut [f64], v: &mut [f64], n: usize) {
    for p in 0..n {
        for q in p + 1..n {
            let apq = m[p * n + q];
            if apq == 0.0 {
                continue;
            }
            let (app, aqq) = (m[p * n + p], m[q * n + q]);
            // The smaller root of t² + 2θt − 1 = 0: a rotation by at most π/4.
            let theta = (aqq - app) / (2.0 * apq);
            let t = if theta.abs() > 1e150 {
                0.5 / theta
            } else {
                theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt())
            };
            let c = 1.0 / (t * t + 1.0).sqrt();
            let s = t * c;
            for k in 0..n {
                let (mkp, mkq) = (m[k * n + p], m[k * n + q]);
                m[k * n + p] = c * mkp - s * mkq;
                m[k * n + q] = s * mkp + c * mkq;
            }
            for k in 0..n {
                let (mpk, mqk) = (m[p * n + k], m[q * n + k]);
                m[p * n + k] = c * mpk - s * mqk;
                m[q * n + k] = s * mpk + c * mqk;
            }
            for k in 0..n {
                let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                v[k * n + p] = c * vkp - s * vkq;
                v[k * n + q] = s * vkp + c * vkq;
            }
        }
    }
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

    /// A symmetric matrix built from known eigenpairs comes apart into them again.
    #[test]
    fn eigen_recovers_a_matrix_built_from_its_eigenpairs() {
        let n = 6;
        // An orthonormal basis: the columns of a pseudo-random matrix, orthonormalized.
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let mut basis: Vec<Vec<f64>> = (0..n).map(|_| (0..n).map(|_| next()).collect()).collect();
        let kept = orthonormalize(&mut basis);
        assert!(kept.iter().all(|&k| k > 1e-3), "{kept:?}");
        for (i, x) in basis.iter().enumerate() {
            for (j, y) in basis.iter().enumerate() {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot(x, y) - want).abs() < 1e-14);
            }
        }
        let values = [9.0, 4.0, 2.5, 1.0, -0.5, -3.0];
        let mut a = vec![0f64; n * n];
        for (value, u) in values.iter().zip(&basis) {
            for i in 0..n {
                for j in 0..n {
                    a[i * n + j] += value * u[i] * u[j];
                }
            }
        }
        let pairs = symmetric_eigen(&a, n);
        for ((value, vector), (want, u)) in pairs.iter().zip(values.iter().zip(&basis)) {
            assert!((value - want).abs() < 1e-12, "{value} vs {want}");
            // The same direction up to sign.
            assert!((dot(vector, u).abs() - 1.0).abs() < 1e-12);
        }
    }

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
