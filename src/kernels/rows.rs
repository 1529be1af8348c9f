//! Any-rank inputs `[.., d]` seen as matrices `(n, d)` and back.

use candle_core::Tensor;

/// Views `x` (`[.., d]`) as a matrix `(n, d)`; returns it with the leading dims.
pub(crate) fn flatten_rows(x: &Tensor) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let dims = x.dims();
    let lead = dims.split_last().map_or(&[][..], |(_, lead)| lead).to_vec();
    let d = dims.last().copied().unwrap_or(1);
    let n: usize = lead.iter().product();
    Ok((x.reshape((n, d))?, lead))
}

/// Inverse of [`flatten_rows`] for an output `(n, d_out)`.
pub(crate) fn unflatten_rows(y: &Tensor, lead: &[usize]) -> candle_core::Result<Tensor> {
    let mut dims = lead.to_vec();
    dims.push(y.dim(1)?);
    y.reshape(dims)
}
