//! candle's CPU buffers seen as matrices: the 2-D view a layout describes, an input's
//! rows with or without a copy, a strided layout's elements gathered, a tensor's CPU slice.

use super::MatRef;
use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor, WithDType};

/// The 2-D view a candle layout describes over `data` (its start offset and strides).
pub(crate) fn mat_of_layout<'a, T: Copy>(
    data: &'a [T],
    l: &Layout,
) -> candle_core::Result<MatRef<'a, T>> {
    let (r, c) = l.shape().dims2()?;
    let &[rs, cs] = l.stride() else {
        candle_core::bail!("fused linear: a 2-D layout without two strides");
    };
    let data = data.get(l.start_offset()..).unwrap_or(&[]);
    MatRef::new(data, r, c, rs, cs)
}

/// An owned or borrowed row-major-ish matrix of a CPU buffer.
pub(crate) enum Rows<'a, T> {
    /// A view into the original buffer.
    View(MatRef<'a, T>),
    /// A contiguous copy (inputs whose leading dimensions do not merge into one stride).
    Owned(Vec<T>, usize, usize),
}

impl<T: Copy> Rows<'_, T> {
    /// The matrix as a view.
    pub(crate) fn view(&self) -> candle_core::Result<MatRef<'_, T>> {
        match self {
            Rows::View(v) => Ok(*v),
            Rows::Owned(data, r, c) => MatRef::contiguous(data, *r, *c),
        }
    }
}

/// Views a buffer of layout `layout` (`[.., d]`, rank ≥ 1) as an `(n, d)` matrix: without
/// a copy when the leading dimensions collapse into one row stride (contiguous, transposed
/// 2-D, sliced...), through a contiguous copy otherwise.
pub(crate) fn as_rows<'a, T: Copy>(
    data: &'a [T],
    layout: &Layout,
) -> candle_core::Result<Rows<'a, T>> {
    let dims = layout.dims();
    let strides = layout.stride();
    let Some((&d, lead)) = dims.split_last() else {
        candle_core::bail!("fused linear: input must have rank >= 1");
    };
    let cs = strides.last().copied().unwrap_or(1);
    let n: usize = lead.iter().product();
    let data_off = data.get(layout.start_offset()..).unwrap_or(&[]);
    // Leading dims of size > 1, outermost first, with their strides.
    let big: Vec<(usize, usize)> = lead
        .iter()
        .zip(strides.iter())
        .filter(|(&s, _)| s > 1)
        .map(|(&s, &st)| (s, st))
        .collect();
    let mergeable = big
        .iter()
        .zip(big.iter().skip(1))
        .all(|(outer, inner)| outer.1 == inner.1 * inner.0);
    if mergeable {
        let rs = big.last().map_or(d.max(1), |&(_, st)| st);
        return Ok(Rows::View(MatRef::new(data_off, n, d, rs, cs)?));
    }
    Ok(Rows::Owned(gather_strided(data, layout)?, n, d))
}

/// The elements of a strided layout in row-major order (one copy of the run for a
/// contiguous layout: a layer's bias on every call).
pub(crate) fn gather_strided<T: Copy>(data: &[T], layout: &Layout) -> candle_core::Result<Vec<T>> {
    if let Some((start, end)) = layout.contiguous_offsets() {
        return match data.get(start..end) {
            Some(run) => Ok(run.to_vec()),
            None => candle_core::bail!("fused linear: layout {layout:?} overruns its buffer"),
        };
    }
    let (dims, strides) = (layout.dims(), layout.stride());
    let count: usize = dims.iter().product();
    let mut out = Vec::with_capacity(count);
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..count {
        let off =
            layout.start_offset() + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        match data.get(off) {
            Some(&v) => out.push(v),
            None => candle_core::bail!("fused linear: layout {layout:?} overruns its buffer"),
        }
        for (i, &d) in idx.iter_mut().zip(dims).rev() {
            *i += 1;
            if *i < d {
                break;
            }
            *i = 0;
        }
    }
    Ok(out)
}

/// The CPU slice of a tensor's storage, with its layout, for a closure.
pub(crate) fn with_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T], &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(T::cpu_storage_as_slice(cpu)?, layout),
        _ => candle_core::bail!("fused linear: expected a CPU tensor"),
    }
}

/// A CPU storage slice of dtype `T`.
pub(crate) fn slice_of<T: WithDType>(s: &CpuStorage) -> candle_core::Result<&[T]> {
    T::cpu_storage_as_slice(s)
}

/// `x`'s shape with its last dimension replaced by `d_out` (a linear layer's output).
pub(crate) fn output_shape(x: &Layout, d_out: usize) -> Shape {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = d_out;
    }
    Shape::from(dims)
}

/// A 1-D tensor gathered into a vector.
pub(crate) fn gather_vec<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    with_slice(t, gather_strided)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor's elements in row-major order, whatever its layout: contiguous (from the
    /// buffer's start or an offset into it) and strided, against candle's own copy.
    #[test]
    fn gathered_elements_follow_the_layout() -> candle_core::Result<()> {
        let t = Tensor::arange(0f32, 24., &candle_core::Device::Cpu)?.reshape((4, 6))?;
        let views = [
            t.clone(),
            t.narrow(0, 1, 2)?,
            t.narrow(1, 2, 3)?,
            t.t()?,
            t.flatten_all()?.narrow(0, 5, 9)?,
        ];
        for view in &views {
            let gathered = with_slice(view, gather_strided::<f32>)?;
            assert_eq!(
                gathered,
                view.flatten_all()?.to_vec1::<f32>()?,
                "{:?}",
                view.layout()
            );
        }
        let outside = Layout::contiguous_with_offset((3, 4), 20);
        let data = [0f32; 24];
        assert!(gather_strided(&data, &outside).is_err());
        Ok(())
    }
}
