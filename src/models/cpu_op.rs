//! What the models' fused CPU ops (`swiglu`, `gelu`, `rms_norm`, `layer_norm`, `rope_op`,
//! …) share: reading an input as a contiguous f32 slice, an input with a per-feature
//! weight, and an element-wise map over two inputs.

use candle_core::{CpuStorage, Layout, WithDType};
use rayon::prelude::*;

/// Elements per task of the element-wise maps (inner loops long enough to vectorize).
pub(crate) const CHUNK: usize = 1 << 14;

/// `1 / (1 + e⁻ˣ)` with the vectorizable `exp` (the fused ops' gates).
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + crate::kernels::vector_math::exp(-x))
}

/// The contiguous f32 elements of an op input; `op` names the op in the error.
pub(crate) fn f32_input<'a>(
    op: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let data = f32::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets().and_then(|(a, b)| data.get(a..b)) {
        Some(d) => Ok(d),
        None => candle_core::bail!("{op}: inputs must be contiguous f32"),
    }
}

/// An input `x` and a weight `w` of the size of `x`'s last dimension, as slices (`x`'s
/// rows are then `w.len()` long); `op` names the op in the error.
pub(crate) fn rows_and_weight<'a>(
    op: &str,
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
) -> candle_core::Result<(&'a [f32], &'a [f32])> {
    let (x, w) = (f32_input(op, s1, l1)?, f32_input(op, s2, l2)?);
    if w.is_empty() || x.len() % w.len() != 0 || l1.dims().last() != Some(&w.len()) {
        candle_core::bail!(
            "{op}: weight {:?} does not fit input {:?}",
            l2.dims(),
            l1.dims()
        );
    }
    Ok((x, w))
}

/// A norm's backward inputs: `x` and `w` as [`rows_and_weight`] reads them, and the
/// upstream gradient `g`, as long as `x`.
pub(crate) fn rows_weight_and_grad<'a>(
    op: &str,
    x: (&'a CpuStorage, &Layout),
    w: (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
) -> candle_core::Result<(&'a [f32], &'a [f32], &'a [f32])> {
    let (xs, ws) = rows_and_weight(op, x, w)?;
    let g = f32_input(op, s3, l3)?;
    if g.len() != xs.len() {
        candle_core::bail!("{op}: gradient {:?} vs input {:?}", l3.dims(), x.1.dims());
    }
    Ok((xs, ws, g))
}

/// `f(a[i], b[i])` for every `i` (of the shorter), in parallel chunks of [`CHUNK`] on the
/// CPU's widest vectors (`f` must be `#[inline(always)]`-friendly: a plain closure).
pub(crate) fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len().min(b.len())];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(out, (a, b))| {
            crate::kernels::vector_math::on_widest_vectors(
                #[inline(always)]
                || {
                    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                        *o = f(a, b);
                    }
                },
            )
        });
    out
}

/// `f(out_row, a_row, b_row)` for every row of `n` elements of `a` and `b` (as long as
/// each other), in parallel on the CPU's widest vectors; the output is `a`'s size. `f`
/// should be an `#[inline(always)]` closure (one the compiler does not inline runs as
/// baseline code).
pub(crate) fn map_rows(
    a: &[f32],
    b: &[f32],
    n: usize,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    let n = n.max(1);
    out.par_chunks_mut(n)
        .zip(a.par_chunks(n).zip(b.par_chunks(n)))
        .for_each(|(dst, (a, b))| {
            crate::kernels::vector_math::on_widest_vectors(
                #[inline(always)]
                || f(dst, a, b),
            )
        });
    out
}
